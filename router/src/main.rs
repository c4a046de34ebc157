//! `lorax-router`: command line, start-up (shard discovery, Info, Warmup) and the HTTP server.

use clap::Parser;
use lorax_router::adapter::{AdapterConfig, AdapterSource};
use lorax_router::api::Info;
use lorax_router::app::AppState;
use lorax_router::batcher::BatcherConfig;
use lorax_router::client::{ShardClient, ShardedClient};
use lorax_router::entry::round_up;
use lorax_router::exchange::ExchangeConfig;
use lorax_router::health::HealthConfig;
use lorax_router::infer::Infer;
use lorax_router::server::router;
use lorax_router::template::ChatTemplate;
use lorax_router::validation::{load_tokenizer, Validation, ValidationLimits};
use lorax_router::{metrics, pb, telemetry, VERSION};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokenizers::Tokenizer;

/// HTTP router of the LoRAX-compatible inference server: validates and tokenizes requests,
/// batches them continuously and streams tokens from the model shards.
#[derive(Parser, Debug)]
#[command(name = "lorax-router", version, about)]
struct Args {
    /// Most requests in flight at once; further ones are refused with 429 `overloaded`.
    #[arg(long, env, default_value_t = 128)]
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
    /// Source of the default adapter and of requests that give no `adapter_source`: hub, local
    /// or s3.
    #[arg(long, env, default_value = "hub")]
    default_adapter_source: String,
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
    /// Origins allowed by CORS (repeatable); any origin when absent.
    #[arg(long, env, value_delimiter = ',')]
    cors_allow_origin: Vec<String>,
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
    if args.max_input_length >= args.max_total_tokens {
        return Err("--max-input-length must be < --max-total-tokens".into());
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
    if AdapterSource::parse(&args.default_adapter_source).is_none() {
        return Err(format!(
            "--default-adapter-source must be one of hub, local, s3 (got {})",
            args.default_adapter_source
        ));
    }
    Ok(())
}

/// Connects to the shards, retrying for a while (they may still be binding their sockets).
async fn connect(path: &str) -> Result<ShardedClient, String> {
    let mut last_error = String::new();
    for _ in 0..40 {
        match ShardedClient::connect_uds(path).await {
            Ok(client) => return Ok(client),
            Err(err) => last_error = err.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(format!(
        "cannot connect to the shard at {path}: {last_error}"
    ))
}

async fn run(args: Args) -> Result<(), String> {
    check_args(&args)?;
    let (tokenizer, tokenizer_dir) = tokenizer_files(&args)?;
    let client = connect(&args.master_shard_uds_path).await?;
    tracing::info!("connected to {} shard(s)", client.len());
    let shards = warm_up(&client, &args).await?;
    let prometheus = metrics::install();
    metrics::spawn_upkeep(prometheus.clone());
    let client: Arc<dyn ShardClient> = Arc::new(client);
    let infer = start_inference(&args, &shards, tokenizer, client.clone())?;
    let chat_template = ChatTemplate::load(&tokenizer_dir)?.map(Arc::new);
    if chat_template.is_none() {
        tracing::info!("the tokenizer has no chat template: /v1/chat/completions answers 422");
    }
    let state = AppState {
        infer,
        info: Arc::new(build_info(&args, &shards)),
        client,
        prometheus,
        chat_template,
    };
    serve(&args, router(state, &args.cors_allow_origin)).await
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

/// What the shards said at start-up, and the token budgets derived from it.
struct Shards {
    info: pb::InfoResponse,
    max_batch_total_tokens: u32,
    max_batch_prefill_tokens: u32,
    block_size: u32,
}

/// Asks the shards for their Info and runs Warmup; checks the token budget against the flags.
async fn warm_up(client: &ShardedClient, args: &Args) -> Result<Shards, String> {
    let info = client.info().await.map_err(|e| e.to_string())?;
    let supported = client
        .warmup(
            args.max_input_length as u32,
            args.max_batch_prefill_tokens,
            args.max_total_tokens as u32,
        )
        .await
        .map_err(|e| format!("warmup failed: {e}"))?;
    let max_batch_total_tokens = match args.max_batch_total_tokens {
        Some(tokens) if tokens > supported => {
            return Err(format!(
                "--max-batch-total-tokens {tokens} is more than the shards support ({supported})"
            ))
        }
        Some(tokens) => tokens,
        None => supported,
    };
    let block_size = info.block_size.max(1);
    let longest = round_up(args.max_total_tokens as u32, block_size);
    if max_batch_total_tokens < longest {
        return Err(format!(
            "the KV cache holds {max_batch_total_tokens} tokens, less than one request of \
             --max-total-tokens {} needs ({longest}); lower --max-total-tokens",
            args.max_total_tokens
        ));
    }
    tracing::info!("max_batch_total_tokens = {max_batch_total_tokens}");
    Ok(Shards {
        info,
        max_batch_total_tokens,
        max_batch_prefill_tokens: args.max_batch_prefill_tokens.min(max_batch_total_tokens),
        block_size,
    })
}

/// What requests may say about adapters, from the flags and the shards' architecture.
fn adapter_config(args: &Args, shards: &Shards) -> Result<AdapterConfig, String> {
    let adapters = AdapterConfig {
        supports_adapters: shards.info.supports_adapters,
        architecture: shards.info.architecture.clone(),
        model_id: args.model_id.clone(),
        default_adapter_id: args.default_adapter_id.clone().filter(|id| !id.is_empty()),
        default_source: AdapterSource::parse(&args.default_adapter_source)
            .unwrap_or(AdapterSource::Hub),
    };
    if adapters.default_adapter_id.is_some() && !adapters.supports_adapters {
        return Err(format!(
            "--default-adapter-id: architecture {} does not support dynamic adapter loading",
            adapters.architecture
        ));
    }
    Ok(adapters)
}

/// Starts the queue and batching tasks, and the default adapter's load.
fn start_inference(
    args: &Args,
    shards: &Shards,
    tokenizer: Tokenizer,
    client: Arc<dyn ShardClient>,
) -> Result<Infer, String> {
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
    };
    let exchange = ExchangeConfig {
        max_active_adapters: args.max_active_adapters,
        cycle_time: Duration::from_secs(args.adapter_cycle_time_s),
    };
    let health = HealthConfig {
        stall_timeout: Duration::from_secs_f64(args.health_stall_timeout_s),
        probe_interval: Duration::from_secs_f64(args.health_probe_interval_s),
    };
    let adapters = adapter_config(args, shards)?;
    let default_adapter = adapters.default_adapter();
    let validation = Validation::new(tokenizer, limits).with_adapters(adapters);
    let infer = Infer::new(
        client,
        validation,
        config,
        exchange,
        health,
        args.max_concurrent_requests,
    );
    if let Some(adapter) = default_adapter {
        preload(&infer, adapter);
    }
    Ok(infer)
}

/// Serves HTTP until SIGINT or SIGTERM.
async fn serve(args: &Args, app: axum::Router) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind((args.hostname.as_str(), args.port))
        .await
        .map_err(|e| format!("cannot listen on {}:{}: {e}", args.hostname, args.port))?;
    tracing::info!("listening on {}:{}", args.hostname, args.port);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!("stopped");
    Ok(())
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
        validation_workers: 1,
        version: VERSION,
        sha: None,
        docker_label: None,
        request_logger_url: None,
        default_adapter_id: args.default_adapter_id.clone().filter(|id| !id.is_empty()),
        adapters: Vec::new(),
    }
}

/// Loads the default adapter in the background; a failure is logged (requests retry it).
fn preload(infer: &Infer, adapter: lorax_router::adapter::AdapterRequest) {
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

/// Resolves on SIGINT or SIGTERM; open streams then get a few seconds to finish.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down");
    tokio::spawn(async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        std::process::exit(0);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
