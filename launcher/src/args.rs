//! The launcher's command line: one typed struct, read once at start (flags or their environment
//! variables), then checked by [`Args::validate`]. The doc comments are the `--help` text and the
//! reference page `docs/reference/launcher.md`.

use std::fmt;
use std::net::{IpAddr, ToSocketAddrs};
use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::parser::ValueSource;
use clap::{ArgMatches, FromArgMatches, Parser, ValueEnum};

/// Where adapters named by `--adapter-id` or by a request's `adapter_id` are fetched from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AdapterSource {
    /// The Hugging Face Hub (or the endpoint named by `HF_ENDPOINT`).
    Hub,
    /// A directory on the local file system.
    Local,
    /// An S3 bucket.
    S3,
}

/// Quantization schemes for the base model's weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Quantization {
    /// bitsandbytes 8-bit.
    Bitsandbytes,
    /// bitsandbytes 4-bit NormalFloat.
    #[value(name = "bitsandbytes-nf4")]
    BitsandbytesNf4,
    /// bitsandbytes 4-bit float.
    #[value(name = "bitsandbytes-fp4")]
    BitsandbytesFp4,
    /// GPTQ checkpoints.
    Gptq,
    /// AWQ checkpoints.
    Awq,
    /// EETQ 8-bit.
    Eetq,
    /// HQQ 4-bit.
    #[value(name = "hqq-4bit")]
    Hqq4bit,
    /// HQQ 3-bit.
    #[value(name = "hqq-3bit")]
    Hqq3bit,
    /// HQQ 2-bit.
    #[value(name = "hqq-2bit")]
    Hqq2bit,
    /// FP8 (e4m3) weights.
    Fp8,
    /// FP8 KV cache.
    #[value(name = "fp8-kv")]
    Fp8Kv,
    /// ExLlamaV2 checkpoints (CUDA kernels only).
    Exl2,
}

/// Data type of the base model's weights and activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    #[value(name = "float32", alias = "fp32")]
    Float32,
    #[value(name = "float16", alias = "fp16")]
    Float16,
    #[value(name = "bfloat16", alias = "bf16")]
    BFloat16,
}

/// Attention kernels of the shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AttentionBackend {
    /// Pure torch: runs anywhere; the reference the others are tested against.
    Torch,
    /// Triton kernels over the paged KV cache (CUDA).
    Triton,
    /// The `flash_attn` package (CUDA; float16/bfloat16), when installed.
    Flash,
}

/// Prints an enum the way it is spelled on the command line.
fn cli_name(value: &impl ValueEnum, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let possible = value.to_possible_value().expect("no skipped variants");
    f.write_str(possible.get_name())
}

impl fmt::Display for AdapterSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        cli_name(self, f)
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        cli_name(self, f)
    }
}

impl fmt::Display for AttentionBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        cli_name(self, f)
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        cli_name(self, f)
    }
}

/// Serve a base LLM and any number of LoRA adapters of it: downloads the weights, starts one
/// `lorax-server` shard per GPU, waits for them, then starts `lorax-router` (the HTTP server)
/// and supervises all of them.
#[derive(Parser, Clone, Debug)]
#[command(name = "lorax-launcher", version, about, long_about = None)]
pub struct Args {
    /// The base model: a Hugging Face Hub model id (`org/name`) or a local directory in
    /// Hugging Face layout (`config.json`, `*.safetensors`, tokenizer files).
    #[arg(long, env)]
    pub model_id: String,

    /// The default LoRA adapter: loaded when the server starts and used by every request that
    /// names no adapter (a request naming the base model's id still gets the base model).
    #[arg(long, env)]
    pub adapter_id: Option<String>,

    /// Where `--adapter-id` is fetched from, and the source of requests that name an adapter
    /// without an `adapter_source`.
    #[arg(long, env, value_enum, default_value_t = AdapterSource::Hub)]
    pub adapter_source: AdapterSource,

    /// The revision of the model on the Hub: a branch, tag or commit hash.
    #[arg(long, env)]
    pub revision: Option<String>,

    /// Number of shards: tensor-parallel ranks, one process each (one GPU each on CUDA, NCCL; on
    /// CPU they share the cores, gloo). The attention heads, the intermediate size and the key/value
    /// heads must divide over the shards (fewer key/value heads than shards must divide the shard
    /// count: they are replicated). See docs/sharding.md.
    #[arg(long, env, default_value_t = 1)]
    pub num_shard: usize,

    /// Whether to shard the model across GPUs. Must agree with `--num-shard`: `true` needs more
    /// than one shard, `false` exactly one. Unset: follows `--num-shard`.
    #[arg(long, env)]
    pub sharded: Option<bool>,

    /// Quantize the base model's linear weights; adapters keep their own precision. Quantized
    /// while loading a full-precision checkpoint: `bitsandbytes` (int8), `bitsandbytes-nf4`,
    /// `bitsandbytes-fp4`, `eetq`, `fp8`, `fp8-kv` (also a float8 KV cache), `hqq-4bit`,
    /// `hqq-3bit`, `hqq-2bit`. Pre-quantized checkpoints: `gptq`, `awq`, and FP8 ones (detected
    /// from config.json without this flag). `exl2` needs CUDA kernels. See docs/quantization.md.
    #[arg(long, env, value_enum)]
    pub quantize: Option<Quantization>,

    /// Reuse the KV cache of prompt prefixes seen before, for the same adapter, instead of
    /// computing them again (`--prefix-caching` or `--prefix-caching true|false`). See
    /// docs/operations.md.
    #[arg(
        long,
        env,
        num_args = 0..=1,
        default_missing_value = "true",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub prefix_caching: bool,

    /// Prefill prompts longer than `--max-batch-prefill-tokens` in chunks of that many tokens,
    /// each computed with a decode step of the running batch, so a long prompt never stalls the
    /// requests already generating (`--chunked-prefill` or `--chunked-prefill true|false`).
    /// `--max-input-length` may then exceed `--max-batch-prefill-tokens`.
    #[arg(
        long,
        env,
        num_args = 0..=1,
        default_missing_value = "true",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub chunked_prefill: bool,

    /// Speculative decoding by prompt lookup: each decode step drafts up to this many tokens per
    /// request by copying what followed the last occurrence of its latest tokens in its prompt or
    /// output, checks them in the same forward pass and keeps those the request's own sampling
    /// agrees with. Outputs are unchanged; copy-heavy requests (extraction, rewriting, code edits)
    /// take fewer steps. Unset or 0: off.
    #[arg(long, env)]
    pub speculative_tokens: Option<u32>,

    /// Decode steps over more requests than this draft nothing (large batches are already
    /// compute-bound, where drafts that get rejected cost more than they save).
    #[arg(long, env, default_value_t = 32)]
    pub speculation_max_batch_size: u32,

    /// Attention kernels, chosen once when the shards start. Unset: the best available (`triton`
    /// on a GPU when Triton imports, else `torch`). `flash` needs the `flash_attn` package; a
    /// backend that cannot run on the machine stops the shard at start-up with the reason.
    #[arg(long, env, value_enum)]
    pub attention_backend: Option<AttentionBackend>,

    /// Replay decode steps from CUDA graphs, one captured per batch size (up to 128 requests),
    /// which saves the kernel launches that bound small decode batches on a GPU; costs a little GPU
    /// memory. Needs a CUDA device and the `triton` attention backend, and is not used for sharded
    /// models yet: elsewhere the shard logs why and decodes eagerly. Outputs are unchanged.
    #[arg(long, env)]
    pub compile: bool,

    /// Data type of the weights and activations. Unset: the shard's default for the device
    /// (bfloat16 or float16 on GPU, float32 on CPU).
    #[arg(long, env, value_enum)]
    pub dtype: Option<Dtype>,

    /// Allow the model's own Python code from the Hub to run (`trust_remote_code` in
    /// transformers). Only for models you trust.
    #[arg(long, env, value_parser = BoolishValueParser::new())]
    pub trust_remote_code: bool,

    /// Most requests handled at once; more are rejected with 429 (overloaded).
    #[arg(long, env, default_value_t = 128)]
    pub max_concurrent_requests: usize,

    /// Largest `best_of` a request may ask for.
    #[arg(long, env, default_value_t = 2)]
    pub max_best_of: usize,

    /// Most `stop` sequences a request may give.
    #[arg(long, env, default_value_t = 4)]
    pub max_stop_sequences: usize,

    /// Longest prompt, in tokens. Longer prompts are rejected (422) unless the request sets
    /// `truncate`.
    #[arg(long, env, default_value_t = 1024)]
    pub max_input_length: usize,

    /// Most tokens of one request: prompt plus `max_new_tokens`. The unit of memory budgeting.
    #[arg(long, env, default_value_t = 2048)]
    pub max_total_tokens: usize,

    /// How long the batch of waiting requests may be relative to the running batch before new
    /// requests are prefilled: they are prefilled once waiting tokens exceed this ratio times the
    /// tokens being decoded, or after `--max-waiting-tokens` decode steps.
    #[arg(long, env, default_value_t = 1.2)]
    pub waiting_served_ratio: f32,

    /// Most prompt tokens prefilled in one forward pass; bounds the memory and latency of a
    /// prefill.
    #[arg(long, env, default_value_t = 4096)]
    pub max_batch_prefill_tokens: usize,

    /// Most tokens (prompts plus generated) of all running requests together. Unset: the router
    /// takes the number the shards report after sizing the KV cache in Warmup (recommended).
    #[arg(long, env)]
    pub max_batch_total_tokens: Option<usize>,

    /// Most decode steps the running batch makes before waiting requests are let in.
    #[arg(long, env, default_value_t = 20)]
    pub max_waiting_tokens: usize,

    /// Most decode steps the shards run per call from the router while no request waits
    /// (1-32). More save the router-shard round trip of every step. Each step's tokens still reach
    /// clients at once, and a request that arrives, or a client that leaves, ends the call after
    /// the step in progress.
    #[arg(long, env, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=32))]
    pub decode_steps_per_call: u32,

    /// Most adapters loaded on the device at once; others wait in host memory or on disk.
    #[arg(long, env, default_value_t = 128)]
    pub max_active_adapters: usize,

    /// Seconds the scheduler serves one set of active adapters before rotating to adapters whose
    /// requests are waiting (fairness between adapters).
    #[arg(long, env, default_value_t = 2)]
    pub adapter_cycle_time_s: u64,

    /// `/health` answers 503 when one prefill or decode step has run this many seconds, or when
    /// no step (nor a health probe) completed for this long while requests wait. Keep it above
    /// the longest prefill.
    #[arg(long, env, default_value_t = 60.0)]
    pub health_stall_timeout_s: f64,

    /// When no step succeeded this recently (an idle server), `/health` proves the server can
    /// generate with a one-token generation of the base model, at most this often (seconds).
    #[arg(long, env, default_value_t = 5.0)]
    pub health_probe_interval_s: f64,

    /// Fraction of the device memory kept free for adapter weights when the KV cache is sized
    /// (passed to the shards as `ADAPTER_MEMORY_FRACTION`).
    #[arg(long, env, default_value_t = 0.1)]
    pub adapter_memory_fraction: f32,

    /// Address the HTTP server listens on. A name is resolved to its address. From the `HOSTNAME`
    /// variable, which shells and Docker set to the machine's name, only an IP address is taken;
    /// anything else there means `0.0.0.0`.
    #[arg(long, env, default_value = "0.0.0.0")]
    pub hostname: String,

    /// Port the HTTP server listens on.
    #[arg(long, short, env, default_value_t = 3000)]
    pub port: u16,

    /// Base path of the shards' unix sockets; shard `r` listens on `<path>-<r>`.
    #[arg(long, env, default_value = "/tmp/lorax-server")]
    pub shard_uds_path: String,

    /// Address of shard 0 for torch.distributed (`MASTER_ADDR`).
    #[arg(long, env, default_value = "localhost")]
    pub master_addr: String,

    /// Port of shard 0 for torch.distributed (`MASTER_PORT`).
    #[arg(long, env, default_value_t = 29500)]
    pub master_port: u16,

    /// Directory of the Hugging Face Hub cache where models and adapters are downloaded. Unset:
    /// the Hub library's default (`HF_HOME`, else `~/.cache/huggingface/hub`).
    #[arg(long, env)]
    pub huggingface_hub_cache: Option<PathBuf>,

    /// Write the log as JSON lines instead of text (the children's lines included).
    #[arg(long, env, value_parser = BoolishValueParser::new())]
    pub json_output: bool,

    /// OpenTelemetry collector (OTLP over gRPC, e.g. `http://collector:4317`) that receives the
    /// router's and the shards' spans: request, validation, queue wait, each prefill and decode.
    #[arg(long, env)]
    pub otlp_endpoint: Option<String>,

    /// An origin allowed to call the HTTP API from a browser (CORS). Repeat the flag, or separate
    /// origins with commas in the environment variable.
    #[arg(long, env, value_delimiter = ',')]
    pub cors_allow_origin: Vec<String>,

    /// Download the model's weights, then exit without serving.
    #[arg(long, env, value_parser = BoolishValueParser::new())]
    pub download_only: bool,

    /// Fraction of the device memory the shards may use (model, KV cache, adapters).
    #[arg(long, env, default_value_t = 1.0)]
    pub cuda_memory_fraction: f32,

    /// Number of KV cache blocks each shard allocates, instead of sizing the cache from free
    /// memory. For small machines and tests.
    #[arg(long, env)]
    pub kv_cache_blocks: Option<usize>,

    /// Use only the reference (pure PyTorch) kernels in the shards (passed as
    /// `DISABLE_CUSTOM_KERNELS=true`).
    #[arg(long, env, value_parser = BoolishValueParser::new())]
    pub disable_custom_kernels: bool,

    /// Seconds to wait for every shard to load the model and open its socket before giving up.
    #[arg(long, env, default_value_t = 1800)]
    pub shard_startup_timeout_s: u64,
}

impl Args {
    /// The arguments from clap's matches, with `--hostname` made an IP address (see
    /// [`listen_address`]).
    pub fn from_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut args = Args::from_arg_matches(matches)?;
        let from_env = matches.value_source("hostname") == Some(ValueSource::EnvVariable);
        args.hostname = listen_address(&args.hostname, from_env)
            .map_err(|e| clap::Error::raw(clap::error::ErrorKind::ValueValidation, e))?;
        Ok(args)
    }

    /// Checks what clap cannot: relations between limits and features that are not built yet.
    /// The error is a complete sentence naming the flags involved.
    pub fn validate(&self) -> Result<(), String> {
        self.validate_sharding()?;
        self.validate_limits()?;
        self.validate_fractions()?;
        if self.kv_cache_blocks == Some(0) {
            return Err("--kv-cache-blocks must be at least 1".to_string());
        }
        if self.model_id.trim().is_empty() {
            return Err("--model-id must not be empty".to_string());
        }
        Ok(())
    }

    fn validate_sharding(&self) -> Result<(), String> {
        positive("--num-shard", self.num_shard)?;
        match self.sharded {
            Some(true) if self.num_shard < 2 => Err(format!(
                "--sharded true needs --num-shard of at least 2 (got {})",
                self.num_shard
            )),
            Some(false) if self.num_shard > 1 => Err(format!(
                "--sharded false contradicts --num-shard {}",
                self.num_shard
            )),
            _ => Ok(()),
        }
    }

    /// The request and batch limits against each other.
    fn validate_limits(&self) -> Result<(), String> {
        positive("--max-concurrent-requests", self.max_concurrent_requests)?;
        positive("--max-best-of", self.max_best_of)?;
        positive("--max-input-length", self.max_input_length)?;
        positive("--max-active-adapters", self.max_active_adapters)?;
        if self.max_input_length >= self.max_total_tokens {
            return Err(format!(
                "--max-input-length ({}) must be less than --max-total-tokens ({}): a request \
                 needs room for at least one generated token",
                self.max_input_length, self.max_total_tokens
            ));
        }
        if self.max_batch_prefill_tokens < self.max_input_length && !self.chunked_prefill {
            return Err(format!(
                "--max-batch-prefill-tokens ({}) must be at least --max-input-length ({}), or \
                 the longest prompts could never be prefilled (unless --chunked-prefill)",
                self.max_batch_prefill_tokens, self.max_input_length
            ));
        }
        if let Some(total) = self.max_batch_total_tokens {
            if total < self.max_batch_prefill_tokens {
                return Err(format!(
                    "--max-batch-total-tokens ({total}) must be at least \
                     --max-batch-prefill-tokens ({})",
                    self.max_batch_prefill_tokens
                ));
            }
            if total < self.max_total_tokens {
                return Err(format!(
                    "--max-batch-total-tokens ({total}) must be at least --max-total-tokens ({})",
                    self.max_total_tokens
                ));
            }
        }
        Ok(())
    }

    /// Ratios, fractions and durations within their ranges.
    fn validate_fractions(&self) -> Result<(), String> {
        if !(self.waiting_served_ratio.is_finite() && self.waiting_served_ratio >= 0.0) {
            return Err(format!(
                "--waiting-served-ratio must be a number of at least 0 (got {})",
                self.waiting_served_ratio
            ));
        }
        if !(self.cuda_memory_fraction > 0.0 && self.cuda_memory_fraction <= 1.0) {
            return Err(format!(
                "--cuda-memory-fraction must be in (0, 1] (got {})",
                self.cuda_memory_fraction
            ));
        }
        if !(0.0..1.0).contains(&self.adapter_memory_fraction) {
            return Err(format!(
                "--adapter-memory-fraction must be in [0, 1) (got {})",
                self.adapter_memory_fraction
            ));
        }
        for (flag, seconds) in [
            ("--health-stall-timeout-s", self.health_stall_timeout_s),
            ("--health-probe-interval-s", self.health_probe_interval_s),
        ] {
            if !(seconds.is_finite() && seconds > 0.0) {
                return Err(format!(
                    "{flag} must be a number of seconds above 0 (got {seconds})"
                ));
            }
        }
        Ok(())
    }

    /// Whether the shards run as one tensor-parallel group of several ranks.
    pub fn is_sharded(&self) -> bool {
        self.num_shard > 1
    }
}

/// The address the router listens on. Shells and Docker set `HOSTNAME` to the machine's name,
/// which is not meant as a listen address: from the environment only an IP address counts, and
/// anything else means `0.0.0.0`. A name given with `--hostname` is resolved to its address.
pub fn listen_address(host: &str, from_env: bool) -> Result<String, String> {
    if host.parse::<IpAddr>().is_ok() {
        return Ok(host.to_string());
    }
    if from_env {
        return Ok("0.0.0.0".to_string());
    }
    let addresses: Vec<IpAddr> = (host, 0)
        .to_socket_addrs()
        .map(|found| found.map(|a| a.ip()).collect())
        .unwrap_or_default();
    addresses
        .iter()
        .find(|ip| ip.is_ipv4())
        .or(addresses.first())
        .map(|ip| ip.to_string())
        .ok_or_else(|| format!("--hostname {host} is neither an IP address nor a resolvable name"))
}

fn positive(flag: &str, value: usize) -> Result<(), String> {
    if value == 0 {
        return Err(format!("{flag} must be at least 1"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
