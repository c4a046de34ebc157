//! The launcher's command line: one typed struct, read once at start (flags or their environment
//! variables), then checked by [`Args::validate`]. The doc comments are the `--help` text and the
//! reference page `docs/reference/launcher.md`.

use std::fmt;
use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::{Parser, ValueEnum};

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

/// Where the base model comes from (LoRAX's `--source`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModelSource {
    /// The Hugging Face Hub; a `--model-id` that is a local directory is read from it.
    Hub,
    /// A directory on the local file system (`--model-id` must be one).
    Local,
    /// An S3 bucket: not supported for base models (adapters only); refused at start.
    S3,
    /// Predibase's service: not reachable from this server; refused at start.
    Pbase,
}

/// LoRAX's attention kernels (`--backend`); this server picks its own (`--attention-backend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LoraxBackend {
    Fa2,
    Flashinfer,
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

/// A token from the command line: printed as `***`, so that logging the arguments leaks nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
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

impl fmt::Display for ModelSource {
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
    /// The base model: a Hugging Face Hub model id (`org/name`, or `org/name@revision` instead of
    /// `--revision`) or a local directory in Hugging Face layout (`config.json`,
    /// `*.safetensors`, tokenizer files).
    #[arg(long, env)]
    pub model_id: String,
    /// Where `--model-id` comes from: `hub` (a local directory is also read where it is) or
    /// `local` (it must be a directory). LoRAX's `s3` and `pbase` base models are refused at
    /// start: download the model and give its directory.
    #[arg(long, env, value_enum, default_value_t = ModelSource::Hub)]
    pub source: ModelSource,
    /// Read the base model's files from this directory instead of downloading them (it must hold
    /// `config.json`, the tokenizer and `*.safetensors`). Passed to the shards and the download as
    /// `WEIGHTS_CACHE_OVERRIDE`.
    #[arg(long, env)]
    pub weights_cache_override: Option<PathBuf>,

    /// The default LoRA adapter: loaded when the server starts and used by every request that
    /// names no adapter (a request naming the base model's id still gets the base model).
    #[arg(long, env)]
    pub adapter_id: Option<String>,

    /// Where `--adapter-id` is fetched from; also the default of `--default-adapter-source` and
    /// `--preloaded-adapter-source`.
    #[arg(long, env, value_enum, default_value_t = AdapterSource::Hub)]
    pub adapter_source: AdapterSource,
    /// The source of requests that name an adapter without an `adapter_source`. Unset:
    /// `--adapter-source`.
    #[arg(long, env, value_enum)]
    pub default_adapter_source: Option<AdapterSource>,
    /// Adapters loaded before the server answers `/health`, and pinned: never offloaded, so their
    /// requests never wait for a load. Repeat the flag, or separate ids with commas in the
    /// environment variable. One that cannot be loaded stops the launcher with the reason.
    #[arg(long, env, value_delimiter = ',')]
    pub preloaded_adapter_ids: Vec<String>,
    /// Where `--preloaded-adapter-ids` are fetched from. Unset: `--adapter-source`.
    #[arg(long, env, value_enum)]
    pub preloaded_adapter_source: Option<AdapterSource>,
    /// Add `--adapter-id`'s LoRA update to the base model's weights when the shards load them: its
    /// requests then cost what the base model's do. Dynamic adapters are off: requests may name
    /// no adapter, `--adapter-id` or the base model (all get the merged model); any other adapter
    /// is a 422. Needs `--adapter-id` and an unquantized base model.
    #[arg(long, env, value_parser = BoolishValueParser::new())]
    pub merge_adapter_weights: bool,
    /// LoRAX's token for its `pbase` adapter source, which this server cannot reach: exported to
    /// the shards as `PREDIBASE_API_TOKEN` and otherwise unused.
    #[arg(long, env)]
    pub predibase_api_token: Option<Secret>,

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
    /// Decode without CUDA graphs. The default here (LoRAX captures graphs unless `--eager`; here
    /// `--compile` asks for them); refused together with `--compile`.
    #[arg(long, env, value_parser = BoolishValueParser::new())]
    pub eager: bool,
    /// With `--compile`, decode batches of more requests than this run without graphs (graphs are
    /// captured for 1, 2, 4, 8, 16, 24, 32, 48, 64, 96 and 128 requests, up to this).
    #[arg(long, env, default_value_t = 128)]
    pub compile_max_batch_size: usize,
    /// LoRAX's largest adapter rank for CUDA graphs. Accepted and unused: graphs here serve
    /// adapters of any rank.
    #[arg(long, env)]
    pub compile_max_rank: Option<usize>,
    /// LoRAX's first batch size captured. Accepted and unused: graphs here are captured for a
    /// batch size when it has been seen for a few steps.
    #[arg(long, env)]
    pub compile_batch_size: Option<usize>,
    /// LoRAX's attention kernels (`fa2`, `flashinfer`). Accepted and unused: choose this server's
    /// with `--attention-backend`.
    #[arg(long, env, value_enum)]
    pub backend: Option<LoraxBackend>,

    /// Data type of the weights and activations. Unset: the shard's default for the device
    /// (bfloat16 or float16 on GPU, float32 on CPU).
    #[arg(long, env, value_enum)]
    pub dtype: Option<Dtype>,

    /// Allow the model's own Python code from the Hub to run (`trust_remote_code` in
    /// transformers). Only for models you trust.
    #[arg(long, env, value_parser = BoolishValueParser::new())]
    pub trust_remote_code: bool,

    /// Most requests handled at once; more are rejected with 429 (overloaded).
    #[arg(long, env, default_value_t = 1024)]
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
    /// After prefilling waiting requests, prefill more of them (each batch within the prefill and
    /// total token budgets) before the next decode step, to grow the batch (throughput); `false`:
    /// at most one prefill between two decode steps (the running requests' latency).
    #[arg(
        long,
        env,
        num_args = 0..=1,
        default_missing_value = "true",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub eager_prefill: bool,

    /// Most decode steps the shards run per call from the router while no request waits
    /// (1-32). More save the router-shard round trip of every step. Each step's tokens still reach
    /// clients at once, and a request that arrives, or a client that leaves, ends the call after
    /// the step in progress.
    #[arg(long, env, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=32))]
    pub decode_steps_per_call: u32,

    /// Most adapters loaded on the device at once; others wait in host memory or on disk. The
    /// adapter memory budget (`--adapter-memory-fraction`) bounds them too.
    #[arg(long, env, default_value_t = 1024)]
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

    /// Threads that tokenize prompts in the router, off its request-handling threads.
    #[arg(long, env, default_value_t = 2)]
    pub validation_workers: usize,
    /// A `tokenizer_config.json` whose `chat_template` replaces the model's for
    /// `/v1/chat/completions` (an adapter's own template still wins for its requests).
    #[arg(long, env)]
    pub tokenizer_config_path: Option<PathBuf>,
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
    /// A request header browsers may send (CORS). Repeatable, or comma-separated in the variable.
    #[arg(long, env, value_delimiter = ',')]
    pub cors_allow_header: Vec<String>,
    /// A response header browsers may read (CORS). Repeatable, or comma-separated in the variable.
    #[arg(long, env, value_delimiter = ',')]
    pub cors_expose_header: Vec<String>,
    /// An HTTP method browsers may use (CORS). Repeatable, or comma-separated in the variable.
    #[arg(long, env, value_delimiter = ',')]
    pub cors_allow_method: Vec<String>,
    /// Whether browsers may send credentials (CORS). Needs explicit origins, headers and methods.
    #[arg(long, env)]
    pub cors_allow_credentials: Option<bool>,
    /// Share of the vocabulary on a watermarked request's green list, in (0, 1) (requests with
    /// `watermark: true`). Unset: 0.5. Passed to the shards as `WATERMARK_GAMMA`.
    #[arg(long, env)]
    pub watermark_gamma: Option<f32>,
    /// Added to the logits of a watermarked request's green tokens, at least 0. Unset: 2.0.
    /// Passed to the shards as `WATERMARK_DELTA`.
    #[arg(long, env)]
    pub watermark_delta: Option<f32>,
    /// LoRAX's ngrok tunnel: not supported (refused at start); put the server behind your own
    /// proxy or load balancer.
    #[arg(long, env, value_parser = BoolishValueParser::new())]
    pub ngrok: bool,
    /// ngrok's token; refused at start, as `--ngrok`.
    #[arg(long, env)]
    pub ngrok_authtoken: Option<Secret>,
    /// ngrok's edge; refused at start, as `--ngrok`.
    #[arg(long, env)]
    pub ngrok_edge: Option<String>,

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

    /// Use only the reference (pure PyTorch) kernels in the shards: no C++ CPU kernels, no Triton
    /// kernels (attention defaults to `torch`). Passed as `DISABLE_CUSTOM_KERNELS=true`.
    #[arg(long, env, value_parser = BoolishValueParser::new())]
    pub disable_custom_kernels: bool,
    /// Compute LoRA updates with the reference torch path (per-adapter matmuls) instead of the
    /// batched LoRA kernels (Triton's SGMV/BGMV on a GPU, the C++ kernel on the CPU). Passed as
    /// `DISABLE_SGMV=1`.
    #[arg(long, env, value_parser = BoolishValueParser::new())]
    pub disable_sgmv: bool,
    /// Share of the free GPU memory (after the model, the adapters' share and the largest
    /// prefill) the KV cache takes, in (0, 1]. Unset: all of it. Passed as `MEMORY_WIGGLE_ROOM`.
    #[arg(long, env)]
    pub memory_wiggle_room: Option<f32>,
    /// LoRAX's embedding size for decoder models served for embeddings (the `2_Dense_<dim>`
    /// module of a Qwen2 embedding model). Accepted and unused: embeddings are served from
    /// encoder models (BERT family), whose modules set the size (docs/embeddings.md).
    #[arg(long, env)]
    pub embedding_dim: Option<usize>,

    /// Seconds to wait for every shard to load the model and open its socket before giving up.
    #[arg(long, env, default_value_t = 1800)]
    pub shard_startup_timeout_s: u64,
}

mod checks;
#[cfg(test)]
use checks::listen_address;

#[cfg(test)]
mod tests;
