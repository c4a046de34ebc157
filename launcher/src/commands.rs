//! The command lines of the launcher's children, built from the launcher's arguments. Pure
//! functions: where the programs live is decided by `locate`, running them by `process`.
//!
//! The contract with the shard (`lorax-server`, the Python package's console script):
//! - `lorax-server download-weights MODEL_ID [--revision R]` fetches the weights (a local
//!   directory passes through) and prints the model's local directory as its last stdout line.
//! - `lorax-server serve MODEL_ID --uds-path P [--revision R] [--dtype D] [--sharded]
//!   [--kv-cache-blocks N] [--memory-fraction F] [--trust-remote-code]` serves rank `RANK` of `WORLD_SIZE` on the unix
//!   socket `P-RANK`, with `MASTER_ADDR`, `MASTER_PORT` and `LOCAL_RANK` set for
//!   torch.distributed, and `ADAPTER_MEMORY_FRACTION` (and `DISABLE_CUSTOM_KERNELS=true` when
//!   asked) in its environment.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

use crate::args::Args;
use crate::process::CommandSpec;

/// Environment variables every child gets on top of the launcher's own environment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChildEnv {
    /// `--huggingface-hub-cache`, exported under both names the Hub library reads.
    pub hub_cache: Option<PathBuf>,
    /// `HUGGING_FACE_HUB_TOKEN` when `HF_TOKEN` is unset: newer Hub libraries read only `HF_TOKEN`.
    pub hf_token: Option<OsString>,
}

impl ChildEnv {
    /// Reads what it needs from the launcher's arguments and environment, once.
    pub fn from_args(args: &Args) -> Self {
        let hf_token = match std::env::var_os("HF_TOKEN") {
            Some(_) => None,
            None => std::env::var_os("HUGGING_FACE_HUB_TOKEN"),
        };
        ChildEnv {
            hub_cache: args.huggingface_hub_cache.clone(),
            hf_token,
        }
    }

    fn apply(&self, mut spec: CommandSpec) -> CommandSpec {
        if let Some(cache) = &self.hub_cache {
            spec = spec
                .env("HUGGINGFACE_HUB_CACHE", cache)
                .env("HF_HUB_CACHE", cache);
        }
        if let Some(token) = &self.hf_token {
            spec = spec.env("HF_TOKEN", token);
        }
        spec
    }
}

/// `lorax-server download-weights MODEL_ID [--revision R]`.
pub fn download(server: &Path, args: &Args, env: &ChildEnv) -> CommandSpec {
    let mut spec = CommandSpec::new(server)
        .arg("download-weights")
        .arg(&args.model_id);
    if let Some(revision) = &args.revision {
        spec = spec.arg("--revision").arg(revision);
    }
    env.apply(spec).env("PYTHONUNBUFFERED", "1")
}

/// The unix socket shard `rank` listens on.
pub fn shard_socket(args: &Args, rank: usize) -> PathBuf {
    PathBuf::from(format!("{}-{rank}", args.shard_uds_path))
}

/// `lorax-server serve ...` for shard `rank`, with the torch.distributed environment.
pub fn shard(server: &Path, args: &Args, env: &ChildEnv, rank: usize) -> CommandSpec {
    let mut spec = CommandSpec::new(server)
        .arg("serve")
        .arg(&args.model_id)
        .arg("--uds-path")
        .arg(&args.shard_uds_path);
    if let Some(revision) = &args.revision {
        spec = spec.arg("--revision").arg(revision);
    }
    if let Some(dtype) = args.dtype {
        spec = spec.arg("--dtype").arg(dtype.to_string());
    }
    if args.is_sharded() {
        spec = spec.arg("--sharded");
    }
    if let Some(blocks) = args.kv_cache_blocks {
        spec = spec.arg("--kv-cache-blocks").arg(blocks.to_string());
    }
    if args.cuda_memory_fraction != 1.0 {
        spec = spec
            .arg("--memory-fraction")
            .arg(args.cuda_memory_fraction.to_string());
    }
    if args.trust_remote_code {
        spec = spec.arg("--trust-remote-code");
    }
    if let Some(quantize) = args.quantize {
        spec = spec.arg("--quantize").arg(quantize.to_string());
    }
    if args.prefix_caching {
        spec = spec.arg("--prefix-caching");
    }
    if args.chunked_prefill {
        spec = spec.arg("--chunked-prefill");
    }
    if let Some(backend) = args.attention_backend {
        spec = spec.arg("--attention-backend").arg(backend.to_string());
    }
    if args.compile {
        spec = spec.arg("--compile");
    }
    if let Some(adapter) = &args.adapter_id {
        // Its Medusa heads, if it has some, draft for the requests whose adapter has none.
        spec = spec
            .arg("--default-adapter-id")
            .arg(adapter)
            .arg("--default-adapter-source")
            .arg(args.adapter_source.to_string());
    }
    if let Some(tokens) = args.speculative_tokens.filter(|&n| n > 0) {
        spec = spec
            .arg("--speculative-tokens")
            .arg(tokens.to_string())
            .arg("--speculation-max-batch-size")
            .arg(args.speculation_max_batch_size.to_string());
    }
    if let Some(endpoint) = &args.otlp_endpoint {
        spec = spec.arg("--otlp-endpoint").arg(endpoint);
    }
    spec = spec
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", args.num_shard.to_string())
        .env("MASTER_ADDR", &args.master_addr)
        .env("MASTER_PORT", args.master_port.to_string())
        .env(
            "ADAPTER_MEMORY_FRACTION",
            args.adapter_memory_fraction.to_string(),
        )
        .env("PYTHONUNBUFFERED", "1");
    if args.disable_custom_kernels {
        spec = spec.env("DISABLE_CUSTOM_KERNELS", "true");
    }
    env.apply(spec)
}

/// `lorax-router ...`: connects to shard 0, tokenizes with the files in `tokenizer_dir`.
///
/// The router reads environment variables of the same names as the launcher's flags; the
/// launcher has already read them and passes every setting as a flag, so they are removed from
/// the router's environment (a `JSON_OUTPUT=0` the launcher accepts cannot trip the router).
pub fn router(router: &Path, args: &Args, env: &ChildEnv, tokenizer: &Path) -> CommandSpec {
    let mut spec = CommandSpec::new(router);
    for arg in Args::command().get_arguments() {
        if let Some(name) = arg.get_env() {
            spec = spec.env_remove(name);
        }
    }
    spec = spec
        .arg("--master-shard-uds-path")
        .arg(shard_socket(args, 0))
        .arg("--tokenizer-name")
        .arg(tokenizer)
        .arg("--model-id")
        .arg(&args.model_id)
        .arg("--hostname")
        .arg(&args.hostname)
        .arg("--port")
        .arg(args.port.to_string());
    let limits = [
        ("--max-concurrent-requests", args.max_concurrent_requests),
        ("--max-best-of", args.max_best_of),
        ("--max-stop-sequences", args.max_stop_sequences),
        ("--max-input-length", args.max_input_length),
        ("--max-total-tokens", args.max_total_tokens),
        ("--max-batch-prefill-tokens", args.max_batch_prefill_tokens),
        ("--max-waiting-tokens", args.max_waiting_tokens),
        ("--max-active-adapters", args.max_active_adapters),
    ];
    for (flag, value) in limits {
        spec = spec.arg(flag).arg(value.to_string());
    }
    spec = spec
        .arg("--waiting-served-ratio")
        .arg(args.waiting_served_ratio.to_string())
        .arg("--decode-steps-per-call")
        .arg(args.decode_steps_per_call.to_string())
        .arg("--adapter-cycle-time-s")
        .arg(args.adapter_cycle_time_s.to_string())
        .arg("--health-stall-timeout-s")
        .arg(args.health_stall_timeout_s.to_string())
        .arg("--health-probe-interval-s")
        .arg(args.health_probe_interval_s.to_string())
        .arg("--default-adapter-source")
        .arg(args.adapter_source.to_string());
    if let Some(adapter) = &args.adapter_id {
        spec = spec.arg("--default-adapter-id").arg(adapter);
    }
    if let Some(total) = args.max_batch_total_tokens {
        spec = spec.arg("--max-batch-total-tokens").arg(total.to_string());
    }
    if args.chunked_prefill {
        spec = spec.arg("--chunked-prefill");
    }
    if let Some(endpoint) = &args.otlp_endpoint {
        spec = spec.arg("--otlp-endpoint").arg(endpoint);
    }
    // Always JSON: the launcher re-logs each line at its level, in the launcher's format.
    spec = spec.arg("--json-output");
    for origin in &args.cors_allow_origin {
        spec = spec.arg("--cors-allow-origin").arg(origin);
    }
    env.apply(spec)
}

#[cfg(test)]
mod tests {
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
        };
        let spec = shard(Path::new("srv"), &a, &cache, 1);
        assert_eq!(
            spec.args_lossy().join(" "),
            "serve org/model --uds-path /run/s --revision main --dtype bfloat16 --sharded \
             --kv-cache-blocks 64 --memory-fraction 0.5 --trust-remote-code --quantize eetq \
             --prefix-caching --attention-backend triton --compile --otlp-endpoint http://otel:4317"
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
            line.contains("--default-adapter-source local --default-adapter-id org/lora"),
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
             --max-concurrent-requests 128 --max-best-of 2 --max-stop-sequences 4 \
             --max-input-length 1024 --max-total-tokens 2048 --max-batch-prefill-tokens 4096 \
             --max-waiting-tokens 20 --max-active-adapters 128 --waiting-served-ratio 1.2 \
             --decode-steps-per-call 8 --adapter-cycle-time-s 2 --health-stall-timeout-s 60 --health-probe-interval-s 5 \
             --default-adapter-source hub \
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
}
