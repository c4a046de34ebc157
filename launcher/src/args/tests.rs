//! Unit tests of the flags: defaults, environment variables and the checks of `validate`.

use super::*;
use clap::CommandFactory;

fn parse(extra: &[&str]) -> Args {
    let mut argv = vec!["lorax-launcher", "--model-id", "m"];
    argv.extend_from_slice(extra);
    Args::try_parse_from(argv).expect("parses")
}

fn error_of(extra: &[&str]) -> String {
    parse(extra).validate().expect_err("must be rejected")
}

#[test]
fn clap_definition_is_consistent() {
    Args::command().debug_assert();
}

#[test]
fn defaults_match_lorax() {
    let a = parse(&[]);
    assert_eq!(a.num_shard, 1);
    assert_eq!(a.adapter_source, AdapterSource::Hub);
    assert_eq!(a.max_concurrent_requests, 1024);
    assert_eq!(a.max_best_of, 2);
    assert_eq!(a.max_stop_sequences, 4);
    assert_eq!(a.max_input_length, 1024);
    assert_eq!(a.max_total_tokens, 2048);
    assert_eq!(a.waiting_served_ratio, 1.2);
    assert_eq!(a.max_batch_prefill_tokens, 4096);
    assert_eq!(a.max_batch_total_tokens, None);
    assert_eq!(a.max_waiting_tokens, 20);
    assert_eq!(a.decode_steps_per_call, 8);
    assert_eq!(a.max_active_adapters, 1024);
    assert_eq!(a.adapter_cycle_time_s, 2);
    assert_eq!(a.adapter_memory_fraction, 0.1);
    assert_eq!(a.hostname, "0.0.0.0");
    assert_eq!(a.port, 3000);
    assert_eq!(a.shard_uds_path, "/tmp/lorax-server");
    assert_eq!(a.master_addr, "localhost");
    assert_eq!(a.master_port, 29500);
    assert_eq!(a.cuda_memory_fraction, 1.0);
    assert!(!a.json_output && !a.download_only && !a.trust_remote_code);
    assert!(a.cors_allow_origin.is_empty());
    a.validate().expect("defaults are valid");
}

#[test]
fn every_flag_has_an_environment_variable_named_after_it() {
    for arg in Args::command().get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if long == "help" || long == "version" {
            continue;
        }
        let env = arg
            .get_env()
            .unwrap_or_else(|| panic!("--{long} has no env var"));
        assert_eq!(env.to_str().unwrap(), long.replace('-', "_").to_uppercase());
    }
}

#[test]
fn hostname_becomes_an_ip_address() {
    assert_eq!(listen_address("::", false).unwrap(), "::");
    assert_eq!(listen_address("127.0.0.1", true).unwrap(), "127.0.0.1");
    // Docker sets HOSTNAME to the container's name.
    assert_eq!(listen_address("3f2a9c1b7d", true).unwrap(), "0.0.0.0");
    let local = listen_address("localhost", false).unwrap();
    assert!(local == "127.0.0.1" || local == "::1", "{local}");
    let err = listen_address("no-such-host.invalid", false).unwrap_err();
    assert!(err.contains("--hostname no-such-host.invalid"), "{err}");
    let matches = Args::command()
        .try_get_matches_from(["l", "--model-id", "m", "--hostname", "localhost"])
        .unwrap();
    let host = Args::from_matches(&matches).unwrap().hostname;
    assert!(host == "127.0.0.1" || host == "::1", "{host}");
}

#[test]
fn model_id_is_required() {
    let err = Args::try_parse_from(["lorax-launcher"]).unwrap_err();
    assert!(err.to_string().contains("--model-id"), "{err}");
}

#[test]
fn enums_parse_by_their_lorax_names() {
    let a = parse(&["--dtype", "bfloat16", "--adapter-source", "s3"]);
    assert_eq!(a.dtype, Some(Dtype::BFloat16));
    assert_eq!(a.adapter_source, AdapterSource::S3);
    assert_eq!(parse(&["--dtype", "fp16"]).dtype, Some(Dtype::Float16));
    for name in [
        "bitsandbytes",
        "bitsandbytes-nf4",
        "bitsandbytes-fp4",
        "gptq",
        "awq",
        "eetq",
        "hqq-4bit",
        "hqq-3bit",
        "hqq-2bit",
        "fp8",
        "fp8-kv",
        "exl2",
    ] {
        let q = parse(&["--quantize", name]).quantize.unwrap();
        assert_eq!(q.to_string(), name);
    }
    assert!(Args::try_parse_from(["l", "--model-id", "m", "--dtype", "int8"]).is_err());
}

#[test]
fn every_quantize_method_reaches_the_shard() {
    // The shard knows what its build can serve (exl2 needs CUDA kernels) and says so at start-up.
    for name in ["gptq", "bitsandbytes-nf4", "hqq-2bit", "fp8-kv", "exl2"] {
        parse(&["--quantize", name]).validate().unwrap();
    }
}

#[test]
fn cors_origins_repeat_or_split_on_commas() {
    let a = parse(&[
        "--cors-allow-origin",
        "http://a",
        "--cors-allow-origin",
        "http://b,http://c",
    ]);
    assert_eq!(a.cors_allow_origin, ["http://a", "http://b", "http://c"]);
}

#[test]
fn input_must_not_exceed_total() {
    let err = error_of(&["--max-input-length", "2049", "--max-total-tokens", "2048"]);
    assert!(
        err.contains("--max-input-length (2049) must not exceed"),
        "{err}"
    );
    // Equal limits are LoRAX's for embedding models (`--max-input-length 512 --max-total-tokens 512`).
    let equal = parse(&["--max-input-length", "512", "--max-total-tokens", "512"]);
    assert_eq!(equal.validate(), Ok(()));
}

#[test]
fn prefill_budget_must_fit_the_longest_prompt() {
    let err = error_of(&["--max-batch-prefill-tokens", "512"]);
    assert!(err.contains("--max-batch-prefill-tokens (512)"), "{err}");
}

#[test]
fn batch_total_must_fit_prefill_and_one_request() {
    let err = error_of(&["--max-batch-total-tokens", "1000"]);
    assert!(err.contains("--max-batch-total-tokens (1000)"), "{err}");
    let err = error_of(&[
        "--max-batch-total-tokens",
        "4096",
        "--max-total-tokens",
        "8192",
    ]);
    assert!(err.contains("at least --max-total-tokens (8192)"), "{err}");
    parse(&["--max-batch-total-tokens", "4096"])
        .validate()
        .unwrap();
}

#[test]
fn sharded_must_agree_with_num_shard() {
    assert!(error_of(&["--sharded", "true"]).contains("--num-shard"));
    assert!(error_of(&["--sharded", "false", "--num-shard", "2"]).contains("contradicts"));
    let a = parse(&["--sharded", "true", "--num-shard", "2"]);
    a.validate().unwrap();
    assert!(a.is_sharded());
}

#[test]
fn fractions_and_counts_are_range_checked() {
    assert!(error_of(&["--num-shard", "0"]).contains("--num-shard must be at least 1"));
    assert!(error_of(&["--cuda-memory-fraction", "1.5"]).contains("(0, 1]"));
    assert!(error_of(&["--cuda-memory-fraction", "0"]).contains("(0, 1]"));
    assert!(error_of(&["--adapter-memory-fraction", "1"]).contains("[0, 1)"));
    assert!(error_of(&["--kv-cache-blocks", "0"]).contains("--kv-cache-blocks"));
    assert!(error_of(&["--max-best-of", "0"]).contains("--max-best-of"));
    assert!(error_of(&["--health-stall-timeout-s", "0"]).contains("above 0"));
    assert!(error_of(&["--health-probe-interval-s", "nan"]).contains("above 0"));
    for steps in ["0", "33"] {
        let err = Args::try_parse_from(["l", "--model-id", "m", "--decode-steps-per-call", steps])
            .expect_err("out of 1..=32")
            .to_string();
        assert!(err.contains("--decode-steps-per-call"), "{err}");
    }
    assert_eq!(
        parse(&["--decode-steps-per-call", "32"]).decode_steps_per_call,
        32
    );
}

#[test]
fn lorax_flags_are_accepted_with_lorax_defaults() {
    let a = parse(&[]);
    assert_eq!(a.source, ModelSource::Hub);
    assert_eq!(a.validation_workers, 2);
    assert!(a.eager_prefill && !a.eager && !a.merge_adapter_weights && !a.disable_sgmv);
    assert_eq!(a.compile_max_batch_size, 128);
    assert_eq!(a.default_adapter_source, None);
    assert!(a.preloaded_adapter_ids.is_empty() && a.unused_flags().is_empty());
    let given = parse(&[
        "--backend",
        "fa2",
        "--compile-max-rank",
        "64",
        "--compile-batch-size",
        "32",
        "--watermark-gamma",
        "0.5",
        "--embedding-dim",
        "768",
        "--eager",
        "--eager-prefill",
        "false",
        "--preloaded-adapter-ids",
        "a,b",
        "--default-adapter-source",
        "local",
    ]);
    given.validate().expect("valid");
    assert!(!given.eager_prefill);
    assert_eq!(given.preloaded_adapter_ids, ["a", "b"]);
    let unused = given.unused_flags().join("\n");
    assert!(
        !unused.contains("--watermark"),
        "watermarking is implemented: {unused}"
    );
    for flag in [
        "--backend",
        "--compile-max-rank",
        "--compile-batch-size",
        "--embedding-dim",
    ] {
        assert!(unused.contains(flag), "{flag} not reported in {unused}");
    }
}

#[test]
fn lorax_flags_that_cannot_work_here_are_refused_with_the_reason() {
    let local_dir = std::env::temp_dir();
    let local = local_dir.to_str().unwrap();
    assert!(
        Args::try_parse_from(["lorax-launcher", "--model-id", local, "--source", "local"])
            .unwrap()
            .validate()
            .is_ok()
    );
    for (extra, expected) in [
        (
            &["--source", "local"][..],
            "--source local needs --model-id to be a directory",
        ),
        (&["--source", "s3"][..], "download the model"),
        (&["--source", "pbase"][..], "download the model"),
        (
            &["--merge-adapter-weights"][..],
            "needs the adapter to merge",
        ),
        (
            &[
                "--adapter-id",
                "x",
                "--merge-adapter-weights",
                "--preloaded-adapter-ids",
                "y",
            ][..],
            "cannot be used with --merge-adapter-weights",
        ),
        (
            &[
                "--adapter-id",
                "x",
                "--merge-adapter-weights",
                "--quantize",
                "eetq",
            ][..],
            "unquantized",
        ),
        (&["--eager", "--compile"][..], "exclude each other"),
        (
            &["--validation-workers", "0"][..],
            "--validation-workers must be at least 1",
        ),
        (
            &["--memory-wiggle-room", "0"][..],
            "--memory-wiggle-room must be in (0, 1]",
        ),
        (
            &["--memory-wiggle-room", "1.5"][..],
            "--memory-wiggle-room must be in (0, 1]",
        ),
        (
            &["--disable-custom-kernels", "--attention-backend", "triton"][..],
            "must then be torch",
        ),
        (&["--ngrok"][..], "--ngrok is not supported"),
        (
            &["--watermark-gamma", "1"][..],
            "--watermark-gamma must be in (0, 1)",
        ),
        (
            &["--watermark-delta=-1"][..],
            "--watermark-delta must be a number of at least 0",
        ),
        (&["--ngrok-authtoken", "t"][..], "--ngrok is not supported"),
        (
            &[
                "--max-active-adapters",
                "2",
                "--preloaded-adapter-ids",
                "a,b",
            ][..],
            "at most --max-active-adapters - 1 (1)",
        ),
    ] {
        let err = error_of(extra);
        assert!(err.contains(expected), "{extra:?}: {err}");
    }
    assert!(Args::try_parse_from([
        "lorax-launcher",
        "--model-id",
        "m",
        "--adapter-source",
        "pbase"
    ])
    .is_err());
}

#[test]
fn a_revision_may_follow_the_model_id_after_an_at_sign() {
    let from =
        |argv: &[&str]| Args::from_matches(&Args::command().try_get_matches_from(argv).unwrap());
    let a = from(&["lorax-launcher", "--model-id", "org/model@v1.0"]).unwrap();
    assert_eq!(
        (a.model_id.as_str(), a.revision.as_deref()),
        ("org/model", Some("v1.0"))
    );
    let plain = from(&["lorax-launcher", "--model-id", "org/model"]).unwrap();
    assert_eq!(
        (plain.model_id.as_str(), plain.revision),
        ("org/model", None)
    );
    let both = from(&[
        "lorax-launcher",
        "--model-id",
        "org/m@main",
        "--revision",
        "v2",
    ]);
    assert!(both.unwrap_err().to_string().contains("give one of them"));
    assert!(from(&["lorax-launcher", "--model-id", "org/m@"]).is_err());
    // A local directory keeps its name, @ included.
    let dir = std::env::temp_dir().join(format!("lorax-at@{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let local = from(&["lorax-launcher", "--model-id", dir.to_str().unwrap()]).unwrap();
    assert_eq!(
        (local.model_id.as_str(), local.revision),
        (dir.to_str().unwrap(), None)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
