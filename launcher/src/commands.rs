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
    /// `--weights-cache-override`: where the download and the shards read the model's files.
    pub weights_cache_override: Option<PathBuf>,
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
            weights_cache_override: args.weights_cache_override.clone(),
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
        if let Some(dir) = &self.weights_cache_override {
            spec = spec.env("WEIGHTS_CACHE_OVERRIDE", dir);
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
        spec = spec
            .arg("--compile")
            .arg("--compile-max-batch-size")
            .arg(args.compile_max_batch_size.to_string());
    }
    if let Some(adapter) = &args.adapter_id {
        // Its Medusa heads, if it has some, draft for the requests whose adapter has none.
        spec = spec
            .arg("--default-adapter-id")
            .arg(adapter)
            .arg("--default-adapter-source")
            .arg(args.adapter_source.to_string());
        if args.merge_adapter_weights {
            spec = spec.arg("--merge-adapter-weights");
        }
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
    if args.disable_sgmv {
        spec = spec.env("DISABLE_SGMV", "1");
    }
    if let Some(room) = args.memory_wiggle_room {
        spec = spec.env("MEMORY_WIGGLE_ROOM", room.to_string());
    }
    if let Some(gamma) = args.watermark_gamma {
        spec = spec.env("WATERMARK_GAMMA", gamma.to_string());
    }
    if let Some(delta) = args.watermark_delta {
        spec = spec.env("WATERMARK_DELTA", delta.to_string());
    }
    if let Some(token) = &args.predibase_api_token {
        spec = spec.env("PREDIBASE_API_TOKEN", &token.0);
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
        .arg("--validation-workers")
        .arg(args.validation_workers.to_string())
        .arg("--eager-prefill")
        .arg(args.eager_prefill.to_string())
        .arg("--default-adapter-source")
        .arg(
            args.default_adapter_source
                .unwrap_or(args.adapter_source)
                .to_string(),
        )
        .arg("--adapter-source")
        .arg(args.adapter_source.to_string());
    if let Some(adapter) = &args.adapter_id {
        spec = spec.arg("--default-adapter-id").arg(adapter);
        if args.merge_adapter_weights {
            spec = spec.arg("--merge-adapter-weights");
        }
    }
    for adapter in args
        .preloaded_adapter_ids
        .iter()
        .filter(|id| !id.trim().is_empty())
    {
        spec = spec.arg("--preloaded-adapter-ids").arg(adapter);
    }
    if let Some(source) = args.preloaded_adapter_source {
        spec = spec
            .arg("--preloaded-adapter-source")
            .arg(source.to_string());
    }
    if let Some(path) = &args.tokenizer_config_path {
        spec = spec.arg("--tokenizer-config-path").arg(path);
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
    let cors = [
        ("--cors-allow-origin", &args.cors_allow_origin),
        ("--cors-allow-header", &args.cors_allow_header),
        ("--cors-expose-header", &args.cors_expose_header),
        ("--cors-allow-method", &args.cors_allow_method),
    ];
    for (flag, values) in cors {
        for value in values {
            spec = spec.arg(flag).arg(value);
        }
    }
    if let Some(allow) = args.cors_allow_credentials {
        spec = spec.arg("--cors-allow-credentials").arg(allow.to_string());
    }
    env.apply(spec)
}

#[cfg(test)]
mod tests;
