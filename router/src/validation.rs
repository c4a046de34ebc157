//! Request validation: parameter ranges, tokenization (with the `tokenizers` crate, special
//! tokens added as the Hugging Face tokenizer does), truncation and the length limits.

use crate::adapter::{self, AdapterConfig, AdapterKey, AdapterRequest};
use crate::api::{GenerateParameters, GenerateRequest, SimpleToken};
use crate::errors::ValidationError;
use crate::pb;
use parameters::check_parameters;
use std::path::Path;
use std::sync::Arc;
use tokenizers::{Encoding, Tokenizer, TruncationDirection};
use tokio::sync::Semaphore;
use tokio::task::JoinError;

mod encoder;
mod grammar;
mod parameters;
pub mod schema;

pub use encoder::EncoderTokens;
pub use grammar::schema_grammar;
pub use parameters::{samples, MAX_TOP_N_TOKENS};

/// The limits a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct ValidationLimits {
    pub max_best_of: usize,
    pub max_stop_sequences: usize,
    pub max_input_length: usize,
    pub max_total_tokens: usize,
}

/// A validated request, ready for the queue.
#[derive(Debug, Clone)]
pub struct ValidGenerateRequest {
    /// Prompt token ids (after truncation).
    pub input_ids: Vec<u32>,
    /// `input_ids.len()`.
    pub input_length: u32,
    pub parameters: pb::NextTokenChooserParameters,
    pub stopping_parameters: pb::StoppingCriteriaParameters,
    /// Return prompt log-probabilities.
    pub decoder_input_details: bool,
    pub top_n_tokens: u32,
    /// The adapter to run with; None is the base model. (Its index at the shard is given
    /// when the request is admitted into a batch.)
    pub adapter: Option<AdapterRequest>,
    /// The output constraint (None: unconstrained); compiled by the shards before queueing.
    pub grammar: Option<pb::Grammar>,
}

impl ValidGenerateRequest {
    /// A greedy request of the base model: `max_new_tokens` after `input_ids`, no stop
    /// sequences, no log-probabilities.
    pub fn greedy(input_ids: Vec<u32>, max_new_tokens: u32) -> Self {
        Self {
            input_length: input_ids.len() as u32,
            input_ids,
            parameters: pb::NextTokenChooserParameters {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                typical_p: 1.0,
                do_sample: false,
                seed: 0,
                repetition_penalty: 1.0,
                watermark: false,
                frequency_penalty: 0.0,
                presence_penalty: 0.0,
            },
            stopping_parameters: pb::StoppingCriteriaParameters {
                max_new_tokens,
                stop_sequences: Vec::new(),
                ignore_eos_token: false,
            },
            decoder_input_details: false,
            top_n_tokens: 0,
            adapter: None,
            grammar: None,
        }
    }
}

/// A request whose adapter is resolved (None: the base model).
#[derive(Debug, Clone)]
pub struct ResolvedRequest {
    pub request: GenerateRequest,
    pub adapter: Option<AdapterRequest>,
}

impl ResolvedRequest {
    /// The adapter's key (the request's metrics label; None: the base model).
    pub fn adapter_key(&self) -> Option<Arc<AdapterKey>> {
        self.adapter.as_ref().map(|a| a.key.clone())
    }
}

/// Tokenizations run at once when `Validation::with_workers` is not called (as
/// `--validation-workers`' default).
pub const DEFAULT_VALIDATION_WORKERS: usize = 2;

/// Validates requests; cheap to clone (the tokenizer is shared).
#[derive(Clone)]
pub struct Validation {
    tokenizer: Arc<Tokenizer>,
    limits: ValidationLimits,
    adapters: Arc<AdapterConfig>,
    /// One permit per tokenization that may run at once on the blocking pool.
    workers: Arc<Semaphore>,
}

/// Loads `tokenizer.json` from a directory (or the file itself). Truncation and padding saved in
/// the file are turned off: the router enforces the length limits itself (a silently cut prompt
/// or embedding input would pass them), and padding tokens would be fed to the model.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, String> {
    let file = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    };
    let mut tokenizer =
        Tokenizer::from_file(&file).map_err(|e| format!("cannot load {}: {e}", file.display()))?;
    tokenizer
        .with_truncation(None)
        .map_err(|e| format!("cannot load {}: {e}", file.display()))?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

impl Validation {
    pub fn new(tokenizer: Tokenizer, limits: ValidationLimits) -> Self {
        Self {
            tokenizer: Arc::new(tokenizer),
            limits,
            adapters: Arc::new(AdapterConfig::default()),
            workers: Arc::new(Semaphore::new(DEFAULT_VALIDATION_WORKERS)),
        }
    }

    /// Sets how many prompts may be tokenized at once (at least 1); others wait their turn.
    pub fn with_workers(mut self, workers: usize) -> Self {
        self.workers = Arc::new(Semaphore::new(workers.max(1)));
        self
    }

    /// Sets what requests may say about adapters (default: adapters supported, none by default).
    pub fn with_adapters(mut self, adapters: AdapterConfig) -> Self {
        self.adapters = Arc::new(adapters);
        self
    }

    pub fn limits(&self) -> ValidationLimits {
        self.limits
    }

    pub fn adapter_config(&self) -> &AdapterConfig {
        &self.adapters
    }

    /// Resolves the adapter a request names (default adapter, base model; see
    /// `adapter::resolve`). Done once per request: validation and the request's metrics label
    /// both use the result.
    pub fn resolve(&self, request: GenerateRequest) -> Result<ResolvedRequest, ValidationError> {
        let adapter = self.resolve_adapter(&request.parameters)?;
        Ok(ResolvedRequest { request, adapter })
    }

    /// The adapter a request's parameters name (None: the base model).
    pub fn resolve_adapter(
        &self,
        p: &GenerateParameters,
    ) -> Result<Option<AdapterRequest>, ValidationError> {
        adapter::resolve(&self.adapters, p.adapter.fields())
    }

    /// Validates a request; `best_of` is checked here too (its sequences are queued separately).
    pub async fn validate(
        &self,
        resolved: ResolvedRequest,
    ) -> Result<ValidGenerateRequest, ValidationError> {
        let ResolvedRequest { request, adapter } = resolved;
        if request.inputs.is_empty() {
            return Err(ValidationError::EmptyInput);
        }
        let checked = check_parameters(&self.limits, &request.parameters)?;
        let add_special_tokens = !request.parameters.prompt_has_special_tokens;
        let encoding = self
            .encode(request.inputs, add_special_tokens, checked.truncate)
            .await?;
        let input_ids = encoding.get_ids().to_vec();
        let input_length = input_ids.len();
        if input_length == 0 {
            return Err(ValidationError::EmptyInput);
        }
        if input_length > self.limits.max_input_length {
            return Err(ValidationError::InputLength(
                self.limits.max_input_length,
                input_length,
            ));
        }
        let max_total = self.limits.max_total_tokens;
        let max_new_tokens = match checked.max_new_tokens {
            Some(n) if input_length + n as usize > max_total => {
                return Err(ValidationError::MaxTotalTokens(max_total, input_length, n));
            }
            Some(n) => n,
            None => max_total.saturating_sub(input_length) as u32,
        };
        if max_new_tokens == 0 {
            return Err(ValidationError::MaxTotalTokens(max_total, input_length, 0));
        }
        let p = &request.parameters;
        Ok(ValidGenerateRequest {
            input_ids,
            input_length: input_length as u32,
            parameters: checked.parameters,
            stopping_parameters: pb::StoppingCriteriaParameters {
                max_new_tokens,
                stop_sequences: p.stop.clone(),
                ignore_eos_token: p.ignore_eos_token,
            },
            decoder_input_details: p.decoder_input_details,
            top_n_tokens: checked.top_n_tokens,
            adapter,
            grammar: checked.grammar,
        })
    }

    /// The health probe's request: one greedy token of the base model after a short prompt.
    pub fn probe_request(&self) -> ValidGenerateRequest {
        let mut input_ids = self
            .tokenizer
            .encode("health", true)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default();
        input_ids.truncate(self.limits.max_input_length.max(1));
        if input_ids.is_empty() {
            input_ids.push(0);
        }
        ValidGenerateRequest::greedy(input_ids, 1)
    }

    /// Tokenizes `inputs` for `POST /tokenize`.
    pub async fn tokenize(
        &self,
        inputs: String,
        add_special_tokens: bool,
    ) -> Result<Vec<SimpleToken>, ValidationError> {
        let encoding = self
            .encode(inputs.clone(), add_special_tokens, None)
            .await?;
        let tokens = encoding
            .get_ids()
            .iter()
            .zip(encoding.get_offsets())
            .zip(encoding.get_tokens())
            .map(|((&id, &(start, stop)), token)| {
                let text = match inputs.get(start..stop) {
                    Some(text) if stop > start => text.to_string(),
                    _ => token.clone(),
                };
                SimpleToken {
                    id,
                    text,
                    start,
                    stop,
                }
            })
            .collect();
        Ok(tokens)
    }

    /// Encodes on the blocking pool (tokenization is CPU work, so a long prompt never holds an
    /// async worker), at most `workers` at once; keeps the last `truncate` tokens.
    async fn encode(
        &self,
        inputs: String,
        add_special_tokens: bool,
        truncate: Option<usize>,
    ) -> Result<Encoding, ValidationError> {
        let tokenizer = self.tokenizer.clone();
        let task = run_blocking(&self.workers, move || {
            let mut encoding = tokenizer
                .encode(inputs, add_special_tokens)
                .map_err(|e| ValidationError::Tokenizer(e.to_string()))?;
            if let Some(n) = truncate {
                if n < encoding.len() {
                    encoding.truncate(n, 0, TruncationDirection::Left);
                }
            }
            Ok(encoding)
        });
        task.await
            .map_err(|e| ValidationError::Tokenizer(e.to_string()))?
    }
}

/// Runs `work` on the blocking pool once one of `workers`' permits is free. The permit goes with
/// the work: it is released when the work ends, even if the caller stopped waiting for it.
async fn run_blocking<T: Send + 'static>(
    workers: &Arc<Semaphore>,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, JoinError> {
    // The semaphore is never closed, so acquiring only waits.
    let permit = workers.clone().acquire_owned().await.ok();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        work()
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::parameters::tests::{limits, param_error, params};
    use super::*;
    use crate::testing::test_tokenizer;
    use ValidationError as E;

    async fn check(
        inputs: &str,
        parameters: GenerateParameters,
    ) -> Result<ValidGenerateRequest, E> {
        let request = GenerateRequest {
            inputs: inputs.to_string(),
            parameters,
        };
        let validation = Validation::new(test_tokenizer(), limits());
        validation.validate(validation.resolve(request)?).await
    }

    #[tokio::test]
    async fn adds_special_tokens_and_defaults_max_new_tokens() {
        let valid = check("hello world", params(|_| {})).await.unwrap();
        // <s> hello world
        assert_eq!(valid.input_ids, vec![1, 4, 5]);
        assert_eq!(valid.input_length, 3);
        assert_eq!(valid.stopping_parameters.max_new_tokens, 10 - 3);
        assert_eq!(valid.parameters.temperature, 1.0);
        assert_eq!(valid.parameters.top_p, 1.0);
        assert_eq!(valid.parameters.top_k, 0);
        assert!(valid.adapter.is_none());
    }

    #[tokio::test]
    async fn truncate_keeps_the_last_tokens() {
        let valid = check("a b c d", params(|p| p.truncate = Some(2)))
            .await
            .unwrap();
        // <s> a b c d → keep "c d"
        assert_eq!(valid.input_ids, vec![9, 10]);
    }

    #[tokio::test]
    async fn length_limits() {
        // 7 tokens with <s> > max_input_length 6
        let err = check("a b c d a b", params(|_| {})).await.unwrap_err();
        assert_eq!(err, E::InputLength(6, 7));
        let err = check("a b", params(|p| p.max_new_tokens = Some(8)))
            .await
            .unwrap_err();
        assert_eq!(err, E::MaxTotalTokens(10, 3, 8));
        assert!(check("a b", params(|p| p.max_new_tokens = Some(7)))
            .await
            .is_ok());
        // truncation happens before the length check
        let valid = check("a b c d a b", params(|p| p.truncate = Some(3)))
            .await
            .unwrap();
        assert_eq!(valid.input_length, 3);
    }

    #[tokio::test]
    async fn empty_inputs() {
        assert_eq!(check("", params(|_| {})).await.unwrap_err(), E::EmptyInput);
    }

    #[tokio::test]
    async fn limits_are_inclusive_and_say_at_most() {
        // <s> + 5 words: exactly max_input_length (6) is accepted.
        let valid = check("a b c d a", params(|_| {})).await.unwrap();
        assert_eq!(valid.input_length, 6);
        assert!(check_parameters(&limits(), &params(|p| p.truncate = Some(6))).is_ok());
        assert_eq!(
            E::InputLength(6, 7).to_string(),
            "`inputs` must have at most 6 tokens. Given: 7"
        );
        assert_eq!(
            E::Truncate(6, 7).to_string(),
            "`truncate` must be strictly positive and at most 6. Given: 7"
        );
    }

    #[tokio::test]
    async fn adapters_are_resolved_and_unsupported_features_refused() {
        let named = check(
            "hello",
            params(|p| p.adapter.adapter_id = Some("org/lora".into())),
        )
        .await
        .unwrap();
        assert_eq!(named.adapter.unwrap().key.describe(), "org/lora");
        let source = params(|p| {
            p.adapter.adapter_id = Some("a".into());
            p.adapter.adapter_source = Some("ftp".into());
        });
        assert_eq!(
            check("hello", source).await.unwrap_err(),
            E::AdapterSource("ftp".into())
        );
        let merged = params(|p| {
            p.adapter.merged_adapters = Some(crate::adapter::MergedAdapters {
                ids: vec!["a".into()],
                weights: Some(vec![1.0, 2.0]),
                ..Default::default()
            });
        });
        assert!(matches!(
            check("hello", merged).await.unwrap_err(),
            E::MergedAdapters(_)
        ));
        let format =
            params(|p| p.response_format = Some(serde_json::json!({"type": "json_object"})));
        let grammar = check("hello", format).await.unwrap().grammar.unwrap();
        assert_eq!(grammar.r#type, pb::GrammarType::Json as i32);
        assert_eq!(grammar.value, r#"{"type":"object"}"#);
        let conflict = params(|p| {
            p.response_format = Some(serde_json::json!({"type": "json_object"}));
            p.grammar = Some(serde_json::json!({"type": "regex", "value": "a+"}));
        });
        assert_eq!(param_error(conflict), E::GrammarConflict);
        // An empty adapter id with a source is the base model.
        let base = params(|p| {
            p.adapter.adapter_id = Some(String::new());
            p.adapter.adapter_source = Some("hub".into());
        });
        assert!(check("hello", base).await.unwrap().adapter.is_none());
        let unsupported =
            Validation::new(test_tokenizer(), limits()).with_adapters(AdapterConfig {
                supports_adapters: false,
                architecture: "GPT2LMHeadModel".into(),
                ..Default::default()
            });
        let request = GenerateRequest {
            inputs: "hello".into(),
            parameters: params(|p| p.adapter.adapter_id = Some("org/lora".into())),
        };
        assert_eq!(
            unsupported.resolve(request).unwrap_err(),
            E::AdaptersNotSupported("GPT2LMHeadModel".into())
        );
    }

    #[tokio::test]
    async fn one_worker_serves_concurrent_validations() {
        let validation = Validation::new(test_tokenizer(), limits()).with_workers(1);
        let resolve = |inputs: &str, p: GenerateParameters| {
            let request = GenerateRequest {
                inputs: inputs.into(),
                parameters: p,
            };
            validation.resolve(request).unwrap()
        };
        let (a, b, too_long) = tokio::join!(
            validation.validate(resolve("hello world", params(|_| {}))),
            validation.validate(resolve("a b", params(|_| {}))),
            validation.validate(resolve("a b c d a b", params(|_| {}))),
        );
        assert_eq!(a.unwrap().input_ids, vec![1, 4, 5]);
        assert_eq!(b.unwrap().input_ids, vec![1, 7, 8]);
        assert_eq!(too_long.unwrap_err(), E::InputLength(6, 7));
    }

    #[tokio::test]
    async fn blocking_work_runs_at_most_workers_at_once() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        use std::time::{Duration, Instant};
        for workers in [1, 2, 3] {
            let semaphore = Arc::new(Semaphore::new(workers));
            let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
            let tasks = (0..7).map(|_| {
                let (running, most) = (running.clone(), most.clone());
                run_blocking(&semaphore, move || {
                    most.fetch_max(running.fetch_add(1, SeqCst) + 1, SeqCst);
                    // The first ones let in wait for each other until as many run at once as the
                    // permits allow, so the overlap does not depend on the machine's speed. The
                    // deadline only keeps a broken semaphore (fewer at once) from hanging the test.
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while most.load(SeqCst) < workers && Instant::now() < deadline {
                        std::thread::yield_now();
                    }
                    running.fetch_sub(1, SeqCst);
                })
            });
            for done in futures::future::join_all(tasks).await {
                done.unwrap();
            }
            assert_eq!(most.load(SeqCst), workers);
        }
    }

    #[tokio::test]
    async fn tokenize_reports_offsets() {
        let validation = Validation::new(test_tokenizer(), limits());
        let tokens = validation
            .tokenize("hello world".into(), true)
            .await
            .unwrap();
        let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
        assert_eq!(ids, vec![1, 4, 5]);
        assert_eq!(tokens[1].text, "hello");
        assert_eq!((tokens[2].start, tokens[2].stop), (6, 11));
        assert_eq!(tokens[0].text, "<s>");
    }
}
