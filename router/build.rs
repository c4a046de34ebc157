//! Compiles `../proto/generate.proto` (the router ⇄ shard contract) with tonic-build, using the
//! protoc binary shipped in the `protoc-bin-vendored` crate so a fresh machine needs no protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let proto_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let proto = proto_dir.join("generate.proto");
    println!("cargo:rerun-if-changed={}", proto.display());

    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos_with_config(config, &[proto], &[proto_dir])?;
    Ok(())
}
