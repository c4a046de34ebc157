//! What the command line cannot say by itself: the listen address resolved, and the relations
//! between flags checked (`Args::validate`), each refusal a sentence naming the flags.

use std::net::{IpAddr, ToSocketAddrs};

use clap::parser::ValueSource;
use clap::{ArgMatches, FromArgMatches};

use super::{Args, AttentionBackend, ModelSource};

impl Args {
    /// The arguments from clap's matches, with `--hostname` made an IP address (see
    /// [`listen_address`]).
    pub fn from_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut args = Args::from_arg_matches(matches)?;
        let from_env = matches.value_source("hostname") == Some(ValueSource::EnvVariable);
        let invalid = |e: String| clap::Error::raw(clap::error::ErrorKind::ValueValidation, e);
        args.hostname = listen_address(&args.hostname, from_env).map_err(invalid)?;
        args.split_model_revision().map_err(invalid)?;
        Ok(args)
    }

    /// `--model-id org/model@revision` (LoRAX's form) into the id and `--revision`. A local path is
    /// left whole, `@` and all.
    fn split_model_revision(&mut self) -> Result<(), String> {
        if std::path::Path::new(&self.model_id).exists() {
            return Ok(());
        }
        let Some((model, revision)) = self.model_id.split_once('@') else {
            return Ok(());
        };
        if self.revision.is_some() {
            return Err(format!(
                "--model-id {} names a revision and so does --revision: give one of them",
                self.model_id
            ));
        }
        if model.is_empty() || revision.is_empty() {
            return Err(format!(
                "--model-id {}: expected <model id>@<revision>",
                self.model_id
            ));
        }
        (self.model_id, self.revision) = (model.to_string(), Some(revision.to_string()));
        Ok(())
    }

    /// Checks what clap cannot: relations between limits and features that are not built yet.
    /// The error is a complete sentence naming the flags involved.
    pub fn validate(&self) -> Result<(), String> {
        self.validate_sharding()?;
        self.validate_limits()?;
        self.validate_fractions()?;
        self.validate_sources()?;
        self.validate_features()?;
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
        // Equal is allowed, as LoRAX allows it: an embedding model generates nothing, and a
        // generation request of the longest prompt is then refused by the router for want of room.
        if self.max_input_length > self.max_total_tokens {
            return Err(format!(
                "--max-input-length ({}) must not exceed --max-total-tokens ({}): a request's \
                 prompt counts against its total",
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

    /// Where the model and the adapters come from, and what is loaded at start.
    fn validate_sources(&self) -> Result<(), String> {
        match self.source {
            ModelSource::Hub => {}
            ModelSource::Local if std::path::Path::new(&self.model_id).is_dir() => {}
            ModelSource::Local => {
                return Err(format!(
                    "--source local needs --model-id to be a directory ({} is not one)",
                    self.model_id
                ))
            }
            ModelSource::S3 | ModelSource::Pbase => {
                return Err(format!(
                    "--source {}: this server loads base models from the Hugging Face Hub or a \
                     local directory; download the model and give its directory as --model-id",
                    self.source
                ))
            }
        }
        let preloaded: std::collections::HashSet<&str> = self
            .preloaded_adapter_ids
            .iter()
            .map(|id| id.trim())
            .filter(|id| !id.is_empty())
            .collect();
        if preloaded.len() >= self.max_active_adapters {
            return Err(format!(
                "--preloaded-adapter-ids names more adapters than can stay loaded: at most \
                 --max-active-adapters - 1 ({}), so that one slot always rotates",
                self.max_active_adapters - 1
            ));
        }
        if self.merge_adapter_weights {
            if self.adapter_id.as_deref().unwrap_or_default().is_empty() {
                return Err(
                    "--merge-adapter-weights needs the adapter to merge: --adapter-id".into(),
                );
            }
            if !self.preloaded_adapter_ids.is_empty() {
                return Err(
                    "--preloaded-adapter-ids cannot be used with --merge-adapter-weights, \
                            which turns dynamic adapters off"
                        .into(),
                );
            }
            if let Some(quantize) = self.quantize {
                return Err(format!(
                    "--merge-adapter-weights needs an unquantized base model: an update cannot \
                     be added exactly to --quantize {quantize} weights"
                ));
            }
        }
        Ok(())
    }

    /// Features that exclude each other, and LoRAX's that this server does not have.
    fn validate_features(&self) -> Result<(), String> {
        if self.eager && self.compile {
            return Err("--eager and --compile exclude each other: choose one".into());
        }
        positive("--validation-workers", self.validation_workers)?;
        positive("--compile-max-batch-size", self.compile_max_batch_size)?;
        if let Some(room) = self.memory_wiggle_room {
            if !(room > 0.0 && room <= 1.0) {
                return Err(format!(
                    "--memory-wiggle-room must be in (0, 1] (got {room})"
                ));
            }
        }
        if self.disable_custom_kernels
            && matches!(
                self.attention_backend,
                Some(AttentionBackend::Triton | AttentionBackend::Flash)
            )
        {
            return Err(
                "--disable-custom-kernels leaves only the torch kernels: --attention-backend \
                 must then be torch (or unset)"
                    .into(),
            );
        }
        if let Some(gamma) = self.watermark_gamma.filter(|g| !(*g > 0.0 && *g < 1.0)) {
            return Err(format!("--watermark-gamma must be in (0, 1) (got {gamma})"));
        }
        if let Some(delta) = self
            .watermark_delta
            .filter(|d| !(d.is_finite() && *d >= 0.0))
        {
            return Err(format!(
                "--watermark-delta must be a number of at least 0 (got {delta})"
            ));
        }
        if self.ngrok || self.ngrok_authtoken.is_some() || self.ngrok_edge.is_some() {
            return Err(
                "--ngrok is not supported: put the server behind your own proxy or \
                        load balancer"
                    .into(),
            );
        }
        Ok(())
    }

    /// LoRAX flags given that this server accepts and does not use, each with the reason: the
    /// launcher logs them at start rather than refusing a LoRAX command line.
    pub fn unused_flags(&self) -> Vec<String> {
        let mut unused = Vec::new();
        let mut note = |given: bool, message: &str| {
            if given {
                unused.push(message.to_string());
            }
        };
        note(
            self.backend.is_some(),
            "--backend is LoRAX's choice of attention kernels: this server's is --attention-backend",
        );
        note(
            self.compile_max_rank.is_some(),
            "--compile-max-rank: CUDA graphs here serve adapters of any rank",
        );
        note(
            self.compile_batch_size.is_some(),
            "--compile-batch-size: CUDA graphs here are captured for a batch size once it is seen",
        );
        note(
            self.embedding_dim.is_some(),
            "--embedding-dim: decoder models are not served for embeddings here (encoder models are; \
             their modules set the size)",
        );
        note(
            self.predibase_api_token.is_some(),
            "--predibase-api-token: the pbase adapter source is not supported",
        );
        unused
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
