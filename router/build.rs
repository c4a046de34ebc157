//! Compiles `../proto/generate.proto` (the router ⇄ shard contract) with tonic-build, using the
//! protoc binary shipped in the `protoc-bin-vendored` crate so a fresh machine needs no protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Read at run time: a build script compiled for one checkout may be reused for another.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let proto_dir = std::path::Path::new(&manifest_dir).join("../proto");
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
