//! `lorax-router`: command line, start-up (shard discovery, Info, Warmup) and the HTTP server.

use clap::Parser;
use lorax_router::adapter::{resolve, AdapterConfig, AdapterFields, AdapterSource};
use lorax_router::api::Info;
use lorax_router::app::AppState;
use lorax_router::batcher::BatcherConfig;
use lorax_router::client::ShardClient;
use lorax_router::cors::CorsOptions;
use lorax_router::encoder::{EncoderConfig, Encoders};
use lorax_router::exchange::ExchangeConfig;
use lorax_router::health::HealthConfig;
use lorax_router::infer::Infer;
use lorax_router::server::{router, serve};
use lorax_router::template::ChatTemplate;
use lorax_router::validation::{load_tokenizer, Validation, ValidationLimits};
use lorax_router::{metrics, telemetry, VERSION};
use shards::{connect, warm_up, Shards};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokenizers::Tokenizer;

mod shards;

/// HTTP router of the LoRAX-compatible inference server: validates and tokenizes requests,
/// batches them continuously and streams tokens from the model shards.
#[derive(Parser, Debug)]
#[command(name = "lorax-router", version, about)]
struct Args {
    /// Most requests in flight at once; further ones are refused with 429 `overloaded`.
    #[arg(long, env, default_value_t = 1024)]
    max_concurrent_requests: usize,
    /// Largest `best_of` a request may ask for.
    #[arg(long, env, default_value_t = 2)]
    max_best_of: usize,
    /// Most stop sequences per request.
    #[arg(long, env, default_value_t = 4)]
    max_stop_sequences: usize,
    /// Most prompt tokens per request (after `truncate`).
    #[arg(long, env, default_value_t = 1024)]
    max_input_length: usize,
    /// Most prompt + generated tokens per request.
    #[arg(long, env, default_value_t = 2048)]
    max_total_tokens: usize,
    /// Waiting requests join the running batch early only when waiting / running >= this ratio.
    #[arg(long, env, default_value_t = 1.2)]
    waiting_served_ratio: f32,
    /// Most prompt tokens in one prefill.
    #[arg(long, env, default_value_t = 4096)]
    max_batch_prefill_tokens: u32,
    /// The shards prefill prompts longer than `--max-batch-prefill-tokens` in chunks, so
    /// `--max-input-length` may exceed it.
    #[arg(
        long,
        env,
        num_args = 0..=1,
        default_missing_value = "true",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    chunked_prefill: bool,
    /// Most tokens (prompts + max_new_tokens) in flight at once; by default what the shards'
    /// Warmup reports. Refused when larger than that.
    #[arg(long, env)]
    max_batch_total_tokens: Option<u32>,
    /// Decode steps after which waiting requests are prefilled regardless of the ratio.
    #[arg(long, env, default_value_t = 20)]
    max_waiting_tokens: usize,
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
    eager_prefill: bool,
    /// Most decode steps the shards run per decode call while no request waits (1-32). More
    /// save the router-shard round trip per step. Each step's tokens still reach clients at once,
    /// and a request that arrives, or a client that leaves, ends the call after the step in
    /// progress.
    #[arg(long, env, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=32))]
    decode_steps_per_call: u32,
    /// Most adapters on the device at once (loading or active); others wait in host memory.
    #[arg(long, env, default_value_t = 128)]
    max_active_adapters: usize,
    /// Seconds an adapter keeps its device slot, while other adapters' requests wait for one,
    /// before it stops admitting requests and is exchanged (once its running requests finish).
    #[arg(long, env, default_value_t = 2)]
    adapter_cycle_time_s: u64,
    /// Adapter used by requests that name none (loaded at start); otherwise the base model.
    #[arg(long, env)]
    default_adapter_id: Option<String>,
    /// Source of requests that name an adapter without an `adapter_source`: hub, local or s3.
    #[arg(long, env, default_value = "hub")]
    default_adapter_source: String,
    /// Source of `--default-adapter-id`: hub, local or s3. Unset: `--default-adapter-source`.
    #[arg(long, env)]
    adapter_source: Option<String>,
    /// Adapters loaded before the server listens, and pinned: never offloaded, so their requests
    /// never wait for a load. Repeat the flag, or separate ids with commas in the environment
    /// variable. One that cannot be loaded stops the router with the reason.
    #[arg(long, env, value_delimiter = ',')]
    preloaded_adapter_ids: Vec<String>,
    /// Source of `--preloaded-adapter-ids`: hub, local or s3. Unset: `--adapter-source`'s.
    #[arg(long, env)]
    preloaded_adapter_source: Option<String>,
    /// The shards merged `--default-adapter-id` into the base weights: requests naming no
    /// adapter, it, or the base model get the merged model; naming another adapter is a 422.
    #[arg(long, env)]
    merge_adapter_weights: bool,
    /// Address to listen on.
    #[arg(long, env, default_value = "0.0.0.0")]
    hostname: String,
    /// Port to listen on.
    #[arg(long, short, env, default_value_t = 3000)]
    port: u16,
    /// Unix socket of the first shard; the others are found through it.
    #[arg(long, env, default_value = "/tmp/lorax-server-0")]
    master_shard_uds_path: String,
    /// Local directory holding tokenizer.json (or the file itself); defaults to --model-id.
    #[arg(long, env)]
    tokenizer_name: Option<String>,
    /// Prompts tokenized at once, each on a blocking thread, off the threads that serve HTTP
    /// (others wait their turn). Reported by `/info`.
    #[arg(
        long,
        env,
        default_value_t = 2,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    validation_workers: usize,
    /// A `tokenizer_config.json` whose `chat_template` (and `bos_token`, `eos_token`) replaces the
    /// model's for `/v1/chat/completions` and `apply_chat_template`. An adapter that ships its own
    /// template still renders its requests with it. A file that cannot be used stops the router.
    #[arg(long, env)]
    tokenizer_config_path: Option<PathBuf>,
    /// Model id reported by /info (and the tokenizer directory when --tokenizer-name is absent).
    #[arg(long, env, default_value = "unknown")]
    model_id: String,
    /// Log as JSON lines.
    #[arg(long, env)]
    json_output: bool,
    /// OpenTelemetry collector (OTLP/gRPC, e.g. `http://collector:4317`) that receives the
    /// request, queue and batch spans.
    #[arg(long, env)]
    otlp_endpoint: Option<String>,
    /// `GET /health` answers 503 when a shard step has run this long, or when no step (nor a
    /// health probe) completed this long while requests wait. Larger than the longest prefill.
    #[arg(long, env, default_value_t = 60.0)]
    health_stall_timeout_s: f64,
    /// When no step succeeded this recently (an idle server), `GET /health` proves the server
    /// can generate with a one-token generation of the base model, at most this often.
    #[arg(long, env, default_value_t = 5.0)]
    health_probe_interval_s: f64,
    #[command(flatten)]
    cors: CorsOptions,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let telemetry = telemetry::init(
        "lorax-router",
        args.json_output,
        args.otlp_endpoint.as_deref(),
    );
    let code = match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            ExitCode::FAILURE
        }
    };
    // Flushes the spans not exported yet (blocking: off the async workers).
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    code
}

/// Limits that do not need the shards.
fn check_args(args: &Args) -> Result<(), String> {
    // Equal is allowed, as LoRAX allows it: an encoder model generates nothing (its inputs may
    // take the whole length), and a generation of the longest prompt is refused for want of room.
    if args.max_input_length > args.max_total_tokens {
        return Err("--max-input-length must be <= --max-total-tokens".into());
    }
    if (args.max_batch_prefill_tokens as usize) < args.max_input_length && !args.chunked_prefill {
        return Err(
            "--max-batch-prefill-tokens must be >= --max-input-length (unless --chunked-prefill)"
                .into(),
        );
    }
    if args.max_best_of == 0 || args.max_concurrent_requests == 0 {
        return Err("--max-best-of and --max-concurrent-requests must be > 0".into());
    }
    if args.max_active_adapters == 0 {
        return Err("--max-active-adapters must be > 0".into());
    }
    let positive = |s: f64| s.is_finite() && s > 0.0;
    if !positive(args.health_stall_timeout_s) || !positive(args.health_probe_interval_s) {
        return Err("--health-stall-timeout-s and --health-probe-interval-s must be > 0".into());
    }
    for (flag, source) in [
        (
            "--default-adapter-source",
            Some(&args.default_adapter_source),
        ),
        ("--adapter-source", args.adapter_source.as_ref()),
        (
            "--preloaded-adapter-source",
            args.preloaded_adapter_source.as_ref(),
        ),
    ] {
        if let Some(name) = source.filter(|name| AdapterSource::parse(name).is_none()) {
            return Err(format!("{flag} must be one of hub, local, s3 (got {name})"));
        }
    }
    let preloaded = preloaded_ids(args).len();
    if args.merge_adapter_weights {
        if args
            .default_adapter_id
            .as_deref()
            .unwrap_or_default()
            .is_empty()
        {
            return Err(
                "--merge-adapter-weights needs the adapter to merge: --default-adapter-id".into(),
            );
        }
        if preloaded > 0 {
            return Err(
                "--preloaded-adapter-ids cannot be loaded with --merge-adapter-weights, which turns \
                 dynamic adapters off"
                    .into(),
            );
        }
    }
    if preloaded >= args.max_active_adapters {
        return Err(format!(
            "--preloaded-adapter-ids names {} adapters: at most --max-active-adapters - 1 ({}) \
             can stay loaded, so that one slot always rotates",
            preloaded,
            args.max_active_adapters - 1
        ));
    }
    Ok(())
}

/// `--preloaded-adapter-ids` without empty names or repeats, in the order given.
fn preloaded_ids(args: &Args) -> Vec<&str> {
    let mut ids: Vec<&str> = Vec::new();
    for id in args.preloaded_adapter_ids.iter().map(|id| id.trim()) {
        if !id.is_empty() && !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

/// A source flag's value (checked by `check_args`), or `fallback` when unset.
fn source_or(name: Option<&String>, fallback: AdapterSource) -> AdapterSource {
    name.and_then(|name| AdapterSource::parse(name))
        .unwrap_or(fallback)
}

async fn run(args: Args) -> Result<(), String> {
    check_args(&args)?;
    let (tokenizer, tokenizer_dir) = tokenizer_files(&args)?;
    let chat_template = chat_template(&args, &tokenizer_dir)?;
    let cors = args.cors.layer()?;
    let client = connect(&args.master_shard_uds_path).await?;
    tracing::info!("connected to {} shard(s)", client.len());
    let shards = warm_up(&client, &args).await?;
    let prometheus = metrics::install();
    metrics::spawn_upkeep(prometheus.clone());
    let client: Arc<dyn ShardClient> = Arc::new(client);
    let adapters = adapter_config(&args, &shards)?;
    let infer = start_inference(&args, &shards, adapters.clone(), tokenizer, client.clone());
    load_preloaded(&infer, &args, &adapters).await?;
    let encoders = Encoders::spawn(
        client.clone(),
        EncoderConfig::new(
            args.max_input_length,
            shards.info.max_position_embeddings,
            shards.max_batch_prefill_tokens,
        ),
        health_config(&args),
    );
    let state = AppState {
        infer,
        encoders,
        info: Arc::new(build_info(&args, &shards)),
        client,
        prometheus,
        chat_template,
    };
    serve(&args.hostname, args.port, router(state, cors)).await
}

/// The tokenizer, and the directory of its files (where the chat template is found).
fn tokenizer_files(args: &Args) -> Result<(Tokenizer, PathBuf), String> {
    let path = PathBuf::from(args.tokenizer_name.as_deref().unwrap_or(&args.model_id));
    let tokenizer = load_tokenizer(&path)?;
    let dir = if path.is_dir() {
        path
    } else {
        path.parent().map(PathBuf::from).unwrap_or_default()
    };
    Ok((tokenizer, dir))
}

/// The chat template: `--tokenizer-config-path`'s, else the model's (None: it has none).
fn chat_template(args: &Args, model_dir: &Path) -> Result<Option<Arc<ChatTemplate>>, String> {
    let template = match &args.tokenizer_config_path {
        Some(path) => Some(
            ChatTemplate::from_tokenizer_config(path, model_dir)
                .map_err(|e| format!("--tokenizer-config-path {}: {e}", path.display()))?,
        ),
        None => ChatTemplate::load(model_dir)?,
    };
    if template.is_none() {
        tracing::info!("the tokenizer has no chat template: /v1/chat/completions answers 422");
    }
    Ok(template.map(Arc::new))
}

/// What requests may say about adapters, from the flags and the shards' architecture.
fn adapter_config(args: &Args, shards: &Shards) -> Result<AdapterConfig, String> {
    let request_source = source_or(Some(&args.default_adapter_source), AdapterSource::Hub);
    let adapters = AdapterConfig {
        supports_adapters: shards.info.supports_adapters,
        architecture: shards.info.architecture.clone(),
        model_id: args.model_id.clone(),
        default_adapter_id: args.default_adapter_id.clone().filter(|id| !id.is_empty()),
        default_source: request_source,
        default_adapter_source: source_or(args.adapter_source.as_ref(), request_source),
        merged: args.merge_adapter_weights,
    };
    if !adapters.supports_adapters && !adapters.merged {
        let flag = if adapters.default_adapter_id.is_some() {
            Some("--default-adapter-id")
        } else if !preloaded_ids(args).is_empty() {
            Some("--preloaded-adapter-ids")
        } else {
            None
        };
        if let Some(flag) = flag {
            return Err(format!(
                "{flag}: architecture {} does not support dynamic adapter loading",
                adapters.architecture
            ));
        }
    }
    Ok(adapters)
}

/// Starts the queue and batching tasks, and the default adapter's load.
fn start_inference(
    args: &Args,
    shards: &Shards,
    adapters: AdapterConfig,
    tokenizer: Tokenizer,
    client: Arc<dyn ShardClient>,
) -> Infer {
    let limits = ValidationLimits {
        max_best_of: args.max_best_of,
        max_stop_sequences: args.max_stop_sequences,
        max_input_length: args.max_input_length,
        max_total_tokens: args.max_total_tokens,
    };
    let config = BatcherConfig {
        max_batch_prefill_tokens: shards.max_batch_prefill_tokens,
        max_batch_total_tokens: shards.max_batch_total_tokens,
        max_waiting_tokens: args.max_waiting_tokens,
        decode_steps_per_call: args.decode_steps_per_call,
        waiting_served_ratio: args.waiting_served_ratio,
        block_size: shards.block_size,
        chunked_prefill: args.chunked_prefill,
        prefix_caching: shards.info.prefix_caching,
        eager_prefill: args.eager_prefill,
    };
    let exchange = ExchangeConfig {
        max_active_adapters: args.max_active_adapters,
        cycle_time: Duration::from_secs(args.adapter_cycle_time_s),
    };
    let health = health_config(args);
    let default_adapter = adapters.default_adapter();
    let validation = Validation::new(tokenizer, limits)
        .with_workers(args.validation_workers)
        .with_adapters(adapters);
    let infer = Infer::new(
        client,
        validation,
        config,
        exchange,
        health,
        args.max_concurrent_requests,
    );
    if let Some(adapter) = default_adapter {
        load_default_adapter(&infer, adapter);
    }
    infer
}

/// The bounds of `GET /health` (`--health-*`).
fn health_config(args: &Args) -> HealthConfig {
    HealthConfig {
        stall_timeout: Duration::from_secs_f64(args.health_stall_timeout_s),
        probe_interval: Duration::from_secs_f64(args.health_probe_interval_s),
    }
}

/// The `GET /info` answer (its `adapters` are filled per request).
fn build_info(args: &Args, shards: &Shards) -> Info {
    let shard_info = &shards.info;
    Info {
        model_id: args.model_id.clone(),
        model_sha: None,
        model_dtype: shard_info.dtype.clone(),
        model_device_type: shard_info.device_type.clone(),
        // LoRAX reports the tag the hub API gives for a hub model, and null for a local model
        // directory (or when the hub cannot be asked). This router never asks the hub, so it
        // does not know the tag: null rather than a guess.
        model_pipeline_tag: None,
        architecture: shard_info.architecture.clone(),
        quantize: shard_info.quantize.clone(),
        speculate: shard_info.speculate,
        max_concurrent_requests: args.max_concurrent_requests,
        max_best_of: args.max_best_of,
        max_stop_sequences: args.max_stop_sequences,
        max_input_length: args.max_input_length,
        max_total_tokens: args.max_total_tokens,
        waiting_served_ratio: args.waiting_served_ratio,
        max_batch_total_tokens: shards.max_batch_total_tokens,
        max_batch_prefill_tokens: shards.max_batch_prefill_tokens,
        max_waiting_tokens: args.max_waiting_tokens,
        max_active_adapters: args.max_active_adapters,
        adapter_cycle_time_s: args.adapter_cycle_time_s,
        block_size: shards.block_size,
        eos_token_ids: shard_info.eos_token_ids.clone(),
        supports_adapters: shard_info.supports_adapters,
        supports_generation: shard_info.supports_generation,
        supports_embeddings: shard_info.supports_embeddings,
        supports_classification: shard_info.supports_classification,
        embedding_dim: shard_info.embedding_dim,
        validation_workers: args.validation_workers,
        eager_prefill: args.eager_prefill,
        version: VERSION,
        sha: None,
        docker_label: None,
        request_logger_url: None,
        default_adapter_id: args.default_adapter_id.clone().filter(|id| !id.is_empty()),
        adapters: Vec::new(),
    }
}

/// Loads `--preloaded-adapter-ids` at once, pinned, before the server listens: LoRAX's shards
/// load them at start, so a deployment counts on them being ready when `/health` first answers.
async fn load_preloaded(infer: &Infer, args: &Args, config: &AdapterConfig) -> Result<(), String> {
    let ids = preloaded_ids(args);
    if ids.is_empty() {
        return Ok(());
    }
    let source = source_or(
        args.preloaded_adapter_source.as_ref(),
        config.default_adapter_source,
    );
    let mut requests = Vec::with_capacity(ids.len());
    for id in &ids {
        let fields = AdapterFields {
            adapter_id: Some(id),
            adapter_source: Some(source.as_str()),
            ..Default::default()
        };
        match resolve(config, fields) {
            Ok(Some(request)) => requests.push(request),
            Ok(None) => return Err(format!("--preloaded-adapter-ids: {id} is the base model")),
            Err(err) => return Err(format!("--preloaded-adapter-ids: {id}: {err}")),
        }
    }
    let started = std::time::Instant::now();
    let loads = requests.into_iter().map(|request| {
        let queue = infer.queue().clone();
        async move {
            let name = request.key.describe();
            queue.load_adapter(request, true).await.map_err(|err| {
                let reason = lorax_router::errors::ApiError::from(err).body.error;
                format!("--preloaded-adapter-ids: {name} could not be loaded: {reason}")
            })
        }
    });
    futures::future::try_join_all(loads).await?;
    tracing::info!(
        "{} preloaded adapter(s) active and pinned in {:.1} s",
        ids.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Loads the default adapter in the background; a failure is logged (requests retry it).
fn load_default_adapter(infer: &Infer, adapter: lorax_router::adapter::AdapterRequest) {
    let queue = infer.queue().clone();
    tokio::spawn(async move {
        let name = adapter.key.describe();
        match queue.load_adapter(adapter, false).await {
            Ok(status) => tracing::info!(
                "default adapter {name} is active at index {}",
                status.index.unwrap_or_default()
            ),
            Err(err) => tracing::error!(
                "default adapter {name} could not be loaded: {}",
                lorax_router::errors::ApiError::from(err).body.error
            ),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use lorax_router::pb;

    #[test]
    fn info_has_no_pipeline_tag_it_cannot_know() {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().to_str().unwrap();
        for model_id in [local, "org/some-hub-model"] {
            let args = Args::parse_from(["lorax-router", "--model-id", model_id]);
            let shard = pb::InfoResponse {
                dtype: "float32".into(),
                device_type: "cpu".into(),
                architecture: "LlamaForCausalLM".into(),
                ..Default::default()
            };
            let shards = Shards {
                info: shard,
                max_batch_total_tokens: 1000,
                max_batch_prefill_tokens: 100,
                block_size: 16,
            };
            let info = build_info(&args, &shards);
            assert_eq!(info.model_id, model_id);
            assert_eq!(info.model_pipeline_tag, None);
            let json = serde_json::to_value(&info).unwrap();
            assert!(json["model_pipeline_tag"].is_null());
            assert_eq!(json["max_batch_prefill_tokens"], 100);
        }
    }

    #[test]
    fn info_reports_what_the_shards_serve() {
        let args = Args::parse_from(["lorax-router", "--max-input-length", "512"]);
        let shard = pb::InfoResponse {
            architecture: "BertModel".into(),
            supports_embeddings: true,
            embedding_dim: 384,
            ..Default::default()
        };
        let shards = Shards {
            info: shard,
            max_batch_total_tokens: 4096,
            max_batch_prefill_tokens: 4096,
            block_size: 1,
        };
        let json = serde_json::to_value(build_info(&args, &shards)).unwrap();
        assert_eq!(json["supports_generation"], false);
        assert_eq!(json["supports_embeddings"], true);
        assert_eq!(json["supports_classification"], false);
        assert_eq!(json["embedding_dim"], 384);
    }

    #[test]
    fn input_length_may_equal_total_tokens_as_in_lorax() {
        let equal = [
            "lorax-router",
            "--max-input-length",
            "512",
            "--max-total-tokens",
            "512",
        ];
        assert_eq!(check_args(&Args::parse_from(equal)), Ok(()));
        let over = [
            "lorax-router",
            "--max-input-length",
            "513",
            "--max-total-tokens",
            "512",
        ];
        let err = check_args(&Args::parse_from(over)).unwrap_err();
        assert!(
            err.contains("--max-input-length must be <= --max-total-tokens"),
            "{err}"
        );
    }

    #[test]
    fn the_tokenizer_config_flag_replaces_the_models_template() {
        let model = tempfile::tempdir().unwrap();
        std::fs::write(model.path().join("chat_template.jinja"), "model").unwrap();
        let with = |extra: &[&str]| {
            let base = ["lorax-router", "--model-id", model.path().to_str().unwrap()];
            Args::parse_from(base.iter().chain(extra))
        };
        let own = chat_template(&with(&[]), model.path()).unwrap().unwrap();
        assert_eq!(own.apply(&[]).unwrap(), "model");
        let path = model.path().join("other.json");
        std::fs::write(&path, r#"{"chat_template": "flag"}"#).unwrap();
        let flag = with(&["--tokenizer-config-path", path.to_str().unwrap()]);
        let replaced = chat_template(&flag, model.path()).unwrap().unwrap();
        assert_eq!(replaced.apply(&[]).unwrap(), "flag");
        let missing = model.path().join("missing.json");
        let flag = with(&["--tokenizer-config-path", missing.to_str().unwrap()]);
        let error = chat_template(&flag, model.path()).unwrap_err();
        let expected = format!(
            "--tokenizer-config-path {}: cannot be read",
            missing.display()
        );
        assert!(error.starts_with(&expected), "{error}");
    }

    #[test]
    fn new_flags_defaults_and_values() {
        let args = Args::parse_from(["lorax-router"]);
        assert!(args.eager_prefill);
        assert_eq!(args.validation_workers, 2);
        assert!(args.tokenizer_config_path.is_none());
        let args = Args::parse_from(["lorax-router", "--eager-prefill", "false"]);
        assert!(!args.eager_prefill);
        let args = Args::parse_from(["lorax-router", "--eager-prefill", "--validation-workers=5"]);
        assert!(args.eager_prefill);
        assert_eq!(args.validation_workers, 5);
        assert!(Args::try_parse_from(["lorax-router", "--validation-workers", "0"]).is_err());
    }
}
