//! The children's command lines, built from the launcher's flags.

use super::*;
use clap::Parser;

fn args(extra: &[&str]) -> Args {
    let mut argv = vec!["lorax-launcher", "--model-id", "org/model"];
    argv.extend_from_slice(extra);
    Args::try_parse_from(argv).unwrap()
}

fn env_of(spec: &CommandSpec, key: &str) -> Option<String> {
    spec.env
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.to_string_lossy().into_owned())
}

#[test]
fn download_passes_model_and_revision() {
    let a = args(&["--revision", "v2"]);
    let spec = download(Path::new("srv"), &a, &ChildEnv::default());
    assert_eq!(
        spec.args_lossy(),
        ["download-weights", "org/model", "--revision", "v2"]
    );
}

#[test]
fn single_shard_command_is_minimal() {
    let a = args(&[]);
    let spec = shard(Path::new("srv"), &a, &ChildEnv::default(), 0);
    assert_eq!(
        spec.args_lossy(),
        ["serve", "org/model", "--uds-path", "/tmp/lorax-server"]
    );
    assert_eq!(env_of(&spec, "RANK").as_deref(), Some("0"));
    assert_eq!(env_of(&spec, "WORLD_SIZE").as_deref(), Some("1"));
    assert_eq!(env_of(&spec, "MASTER_PORT").as_deref(), Some("29500"));
    assert_eq!(env_of(&spec, "DISABLE_CUSTOM_KERNELS"), None);
}

#[test]
fn sharded_command_carries_every_shard_option() {
    let a = args(&[
        "--num-shard",
        "2",
        "--dtype",
        "bfloat16",
        "--kv-cache-blocks",
        "64",
        "--cuda-memory-fraction",
        "0.5",
        "--trust-remote-code",
        "--revision",
        "main",
        "--master-addr",
        "10.0.0.1",
        "--master-port",
        "1234",
        "--disable-custom-kernels",
        "--shard-uds-path",
        "/run/s",
        "--otlp-endpoint",
        "http://otel:4317",
        "--quantize",
        "eetq",
        "--prefix-caching",
        "--attention-backend",
        "triton",
        "--compile",
    ]);
    let cache = ChildEnv {
        hub_cache: Some("/data".into()),
        hf_token: Some("tok".into()),
        weights_cache_override: None,
    };
    let spec = shard(Path::new("srv"), &a, &cache, 1);
    assert_eq!(
        spec.args_lossy().join(" "),
        "serve org/model --uds-path /run/s --revision main --dtype bfloat16 --sharded \
         --kv-cache-blocks 64 --memory-fraction 0.5 --trust-remote-code --quantize eetq \
         --prefix-caching --attention-backend triton --compile --compile-max-batch-size 128 --otlp-endpoint http://otel:4317"
    );
    assert_eq!(env_of(&spec, "RANK").as_deref(), Some("1"));
    assert_eq!(env_of(&spec, "LOCAL_RANK").as_deref(), Some("1"));
    assert_eq!(env_of(&spec, "WORLD_SIZE").as_deref(), Some("2"));
    assert_eq!(env_of(&spec, "MASTER_ADDR").as_deref(), Some("10.0.0.1"));
    assert_eq!(env_of(&spec, "MASTER_PORT").as_deref(), Some("1234"));
    assert_eq!(
        env_of(&spec, "HUGGINGFACE_HUB_CACHE").as_deref(),
        Some("/data")
    );
    assert_eq!(env_of(&spec, "HF_HUB_CACHE").as_deref(), Some("/data"));
    assert_eq!(env_of(&spec, "HF_TOKEN").as_deref(), Some("tok"));
    assert_eq!(
        env_of(&spec, "ADAPTER_MEMORY_FRACTION").as_deref(),
        Some("0.1")
    );
    assert_eq!(
        env_of(&spec, "DISABLE_CUSTOM_KERNELS").as_deref(),
        Some("true")
    );
    assert_eq!(shard_socket(&a, 1), PathBuf::from("/run/s-1"));
}

#[test]
fn prefix_caching_as_a_switch_or_with_a_value() {
    let cache = ChildEnv::default();
    for (extra, on) in [
        (&[][..], false),
        (&["--prefix-caching"][..], true),
        (&["--prefix-caching", "true"][..], true),
        (&["--prefix-caching", "false"][..], false),
    ] {
        let spec = shard(Path::new("srv"), &args(extra), &cache, 0);
        let passed = spec.args_lossy().iter().any(|a| a == "--prefix-caching");
        assert_eq!(passed, on, "{extra:?}");
    }
}

#[test]
fn chunked_prefill_reaches_the_shard_and_the_router() {
    let cache = ChildEnv::default();
    let long = ["--max-input-length", "3000", "--max-total-tokens", "4000"];
    let small_budget = ["--max-batch-prefill-tokens", "512"];
    let a = args(&[&["--chunked-prefill"][..], &long, &small_budget].concat());
    assert!(a.validate().is_ok(), "{:?}", a.validate());
    for spec in [
        shard(Path::new("srv"), &a, &cache, 0),
        router(Path::new("rt"), &a, &cache, Path::new("tok")),
    ] {
        assert!(spec.args_lossy().iter().any(|x| x == "--chunked-prefill"));
    }
    let unchunked = args(&[&long[..], &small_budget].concat());
    let err = unchunked.validate().unwrap_err();
    assert!(err.contains("unless --chunked-prefill"), "{err}");
}

#[test]
fn speculation_flags_reach_the_shard() {
    let cache = ChildEnv::default();
    let line = |extra: &[&str]| {
        shard(Path::new("srv"), &args(extra), &cache, 0)
            .args_lossy()
            .join(" ")
    };
    let on = line(&[
        "--speculative-tokens",
        "3",
        "--speculation-max-batch-size",
        "8",
    ]);
    assert!(
        on.contains("--speculative-tokens 3 --speculation-max-batch-size 8"),
        "{on}"
    );
    for off in [&[][..], &["--speculative-tokens", "0"][..]] {
        assert!(!line(off).contains("--speculative-tokens"), "{off:?}");
    }
}

#[test]
fn router_and_shards_get_the_default_adapter() {
    let a = args(&["--adapter-id", "org/lora", "--adapter-source", "local"]);
    let shard_line = shard(Path::new("srv"), &a, &ChildEnv::default(), 0)
        .args_lossy()
        .join(" ");
    assert!(
        shard_line.contains("--default-adapter-id org/lora --default-adapter-source local"),
        "{shard_line}"
    );
    let spec = router(Path::new("rtr"), &a, &ChildEnv::default(), Path::new("/m"));
    let line = spec.args_lossy().join(" ");
    assert!(
        line.contains(
            "--default-adapter-source local --adapter-source local --default-adapter-id org/lora"
        ),
        "{line}"
    );
    for name in ["ADAPTER_ID", "ADAPTER_SOURCE"] {
        assert!(spec.env_remove.iter().any(|r| r == name), "{name}");
    }
}

#[test]
fn router_gets_shard_zero_tokenizer_and_limits() {
    let a = args(&[
        "--port",
        "8080",
        "--max-batch-total-tokens",
        "10000",
        "--cors-allow-origin",
        "http://a,http://b",
    ]);
    let spec = router(Path::new("rtr"), &a, &ChildEnv::default(), Path::new("/m"));
    assert_eq!(
        spec.args_lossy().join(" "),
        "--master-shard-uds-path /tmp/lorax-server-0 --tokenizer-name /m \
         --model-id org/model --hostname 0.0.0.0 --port 8080 \
         --max-concurrent-requests 1024 --max-best-of 2 --max-stop-sequences 4 \
         --max-input-length 1024 --max-total-tokens 2048 --max-batch-prefill-tokens 4096 \
         --max-waiting-tokens 20 --max-active-adapters 1024 --waiting-served-ratio 1.2 \
         --decode-steps-per-call 8 --adapter-cycle-time-s 2 --health-stall-timeout-s 60 --health-probe-interval-s 5 \
         --validation-workers 2 --eager-prefill true \
         --default-adapter-source hub --adapter-source hub \
         --max-batch-total-tokens 10000 --json-output \
         --cors-allow-origin http://a --cors-allow-origin http://b"
    );
    for name in [
        "PORT",
        "JSON_OUTPUT",
        "MODEL_ID",
        "HOSTNAME",
        "HUGGINGFACE_HUB_CACHE",
    ] {
        assert!(spec.env_remove.iter().any(|r| r == name), "{name}");
    }
}

#[test]
fn adapter_sources_preloads_and_merging_reach_the_router_and_shards() {
    let a = args(&[
        "--adapter-id",
        "org/lora",
        "--adapter-source",
        "s3",
        "--default-adapter-source",
        "local",
        "--preloaded-adapter-ids",
        "org/a,org/b",
        "--preloaded-adapter-ids",
        "/adapters/c",
        "--preloaded-adapter-source",
        "hub",
    ]);
    let line = router(Path::new("rtr"), &a, &ChildEnv::default(), Path::new("/m"))
        .args_lossy()
        .join(" ");
    for part in [
        "--default-adapter-source local --adapter-source s3 --default-adapter-id org/lora",
        "--preloaded-adapter-ids org/a --preloaded-adapter-ids org/b \
         --preloaded-adapter-ids /adapters/c --preloaded-adapter-source hub",
    ] {
        assert!(line.contains(part), "{part} not in {line}");
    }
    assert!(!line.contains("--merge-adapter-weights"));

    let merged = args(&["--adapter-id", "org/lora", "--merge-adapter-weights"]);
    let shard_line = shard(Path::new("srv"), &merged, &ChildEnv::default(), 0)
        .args_lossy()
        .join(" ");
    assert!(
        shard_line.ends_with("--default-adapter-source hub --merge-adapter-weights"),
        "{shard_line}"
    );
    let router_line = router(
        Path::new("rtr"),
        &merged,
        &ChildEnv::default(),
        Path::new("/m"),
    )
    .args_lossy()
    .join(" ");
    assert!(
        router_line.contains("--default-adapter-id org/lora --merge-adapter-weights"),
        "{router_line}"
    );
}

#[test]
fn router_settings_and_cors_pass_through() {
    let a = args(&[
        "--validation-workers",
        "4",
        "--eager-prefill",
        "false",
        "--tokenizer-config-path",
        "/cfg/tokenizer_config.json",
        "--cors-allow-origin",
        "http://a",
        "--cors-allow-header",
        "x-a,x-b",
        "--cors-expose-header",
        "x-c",
        "--cors-allow-method",
        "GET",
        "--cors-allow-method",
        "POST",
        "--cors-allow-credentials",
        "true",
    ]);
    let line = router(Path::new("rtr"), &a, &ChildEnv::default(), Path::new("/m"))
        .args_lossy()
        .join(" ");
    for part in [
        "--validation-workers 4 --eager-prefill false",
        "--tokenizer-config-path /cfg/tokenizer_config.json",
        "--cors-allow-origin http://a --cors-allow-header x-a --cors-allow-header x-b \
         --cors-expose-header x-c --cors-allow-method GET --cors-allow-method POST \
         --cors-allow-credentials true",
    ] {
        assert!(line.contains(part), "{part} not in {line}");
    }
}

#[test]
fn kernel_memory_and_cache_settings_reach_the_shards() {
    let a = args(&[
        "--compile",
        "--compile-max-batch-size",
        "48",
        "--disable-sgmv",
        "--memory-wiggle-room",
        "0.8",
        "--weights-cache-override",
        "/weights",
        "--predibase-api-token",
        "pb-secret",
        "--watermark-gamma",
        "0.25",
        "--watermark-delta",
        "4",
    ]);
    let env = ChildEnv::from_args(&a);
    let spec = shard(Path::new("srv"), &a, &env, 0);
    assert!(spec
        .args_lossy()
        .join(" ")
        .contains("--compile --compile-max-batch-size 48"));
    assert_eq!(env_of(&spec, "DISABLE_SGMV").as_deref(), Some("1"));
    assert_eq!(env_of(&spec, "MEMORY_WIGGLE_ROOM").as_deref(), Some("0.8"));
    assert_eq!(
        env_of(&spec, "WEIGHTS_CACHE_OVERRIDE").as_deref(),
        Some("/weights")
    );
    assert_eq!(
        env_of(&spec, "PREDIBASE_API_TOKEN").as_deref(),
        Some("pb-secret")
    );
    assert_eq!(env_of(&spec, "WATERMARK_GAMMA").as_deref(), Some("0.25"));
    assert_eq!(env_of(&spec, "WATERMARK_DELTA").as_deref(), Some("4"));
    let download = download(Path::new("srv"), &a, &env);
    assert_eq!(
        env_of(&download, "WEIGHTS_CACHE_OVERRIDE").as_deref(),
        Some("/weights")
    );
    // Unset, none of them is passed.
    let plain = args(&[]);
    let spec = shard(Path::new("srv"), &plain, &ChildEnv::from_args(&plain), 0);
    for name in [
        "DISABLE_SGMV",
        "MEMORY_WIGGLE_ROOM",
        "WEIGHTS_CACHE_OVERRIDE",
        "PREDIBASE_API_TOKEN",
        "WATERMARK_GAMMA",
        "WATERMARK_DELTA",
    ] {
        assert_eq!(env_of(&spec, name), None, "{name}");
    }
    assert!(!spec.args_lossy().join(" ").contains("--compile"));
    // Tokens never reach the log: the arguments print them as ***.
    let printed = format!("{a:?}");
    assert!(
        !printed.contains("pb-secret") && printed.contains("***"),
        "{printed}"
    );
}
