//! Request validation: parameter ranges, tokenization (with the `tokenizers` crate, special
//! tokens added as the Hugging Face tokenizer does), truncation and the length limits.

use crate::adapter::{self, AdapterConfig, AdapterFields, AdapterRequest};
use crate::api::{GenerateParameters, GenerateRequest, SimpleToken};
use crate::pb;
use std::path::Path;
use std::sync::Arc;
use tokenizers::{Encoding, Tokenizer, TruncationDirection};

/// Most alternatives a request may ask for per generated token.
pub const MAX_TOP_N_TOKENS: u32 = 10;

/// Why a request is invalid (answered with 422 `validation`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    #[error("`best_of` must be > 0 and <= {0}. Given: {1}")]
    BestOf(usize, usize),
    #[error("you must use sampling when `best_of` is > 1")]
    BestOfSampling,
    #[error("`seed` must not be set when `best_of` > 1")]
    BestOfSeed,
    #[error("`best_of` != 1 is not supported when streaming tokens")]
    BestOfStream,
    #[error("`decoder_input_details` == true is not supported when streaming tokens")]
    PrefillDetailsStream,
    #[error("`temperature` must be strictly positive")]
    Temperature,
    #[error("`repetition_penalty` must be strictly positive")]
    RepetitionPenalty,
    #[error("`top_p` must be > 0.0 and <= 1.0")]
    TopP,
    #[error("`top_k` must be strictly positive")]
    TopK,
    #[error("`typical_p` must be > 0.0 and <= 1.0")]
    TypicalP,
    #[error("`top_n_tokens` must be <= {0}. Given: {1}")]
    TopNTokens(u32, u32),
    #[error("`truncate` must be strictly positive and at most {0}. Given: {1}")]
    Truncate(usize, usize),
    #[error("`max_new_tokens` must be strictly positive")]
    NegativeMaxNewTokens,
    #[error("`inputs` tokens + `max_new_tokens` must be <= {0}. Given: {1} `inputs` tokens and {2} `max_new_tokens`")]
    MaxTotalTokens(usize, usize, u32),
    #[error("`inputs` must have at most {0} tokens. Given: {1}")]
    InputLength(usize, usize),
    #[error("`inputs` cannot be empty")]
    EmptyInput,
    #[error("`stop` supports up to {0} stop sequences. Given: {1}")]
    StopSequence(usize, usize),
    #[error("`adapter_source` must be one of hub, local, s3. Given: {0}")]
    AdapterSource(String),
    #[error("architecture {0} does not support dynamic adapter loading")]
    AdaptersNotSupported(String),
    #[error("`adapter_id` and `merged_adapters` cannot both be set")]
    AdapterConflict,
    #[error("`adapter_id` {0}")]
    AdapterId(String),
    #[error("{0}")]
    MergedAdapters(String),
    #[error("`{0}` is not supported yet")]
    NotSupported(&'static str),
    #[error("watermark is not supported")]
    Watermark,
    #[error("{0}")]
    ChatTemplate(String),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
}

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
}

/// Parameters checked before tokenization (pure; no tokenizer needed).
#[derive(Debug, Clone)]
struct CheckedParameters {
    parameters: pb::NextTokenChooserParameters,
    max_new_tokens: Option<u32>,
    truncate: Option<usize>,
    top_n_tokens: u32,
}

/// Validates requests; cheap to clone (the tokenizer is shared).
#[derive(Clone)]
pub struct Validation {
    tokenizer: Arc<Tokenizer>,
    limits: ValidationLimits,
    adapters: Arc<AdapterConfig>,
}

/// Loads `tokenizer.json` from a directory (or the file itself).
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, String> {
    let file = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    };
    Tokenizer::from_file(&file).map_err(|e| format!("cannot load {}: {e}", file.display()))
}

impl Validation {
    pub fn new(tokenizer: Tokenizer, limits: ValidationLimits) -> Self {
        Self {
            tokenizer: Arc::new(tokenizer),
            limits,
            adapters: Arc::new(AdapterConfig::default()),
        }
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

    /// The adapter a request's parameters name (default adapter, base model; see
    /// `adapter::resolve`).
    pub fn resolve_adapter(
        &self,
        p: &GenerateParameters,
    ) -> Result<Option<AdapterRequest>, ValidationError> {
        let fields = AdapterFields {
            adapter_id: p.adapter_id.as_deref(),
            merged_adapters: p.merged_adapters.as_ref(),
            adapter_source: p.adapter_source.as_deref(),
            api_token: p.api_token.as_ref(),
        };
        adapter::resolve(&self.adapters, fields)
    }

    /// Validates a request; `best_of` is checked here too (its sequences are queued separately).
    pub async fn validate(
        &self,
        request: GenerateRequest,
    ) -> Result<ValidGenerateRequest, ValidationError> {
        if request.inputs.is_empty() {
            return Err(ValidationError::EmptyInput);
        }
        let checked = check_parameters(&self.limits, &request.parameters)?;
        let adapter = self.resolve_adapter(&request.parameters)?;
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
        })
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

    /// Encodes on the blocking pool (tokenization is CPU work); keeps the last `truncate` tokens.
    async fn encode(
        &self,
        inputs: String,
        add_special_tokens: bool,
        truncate: Option<usize>,
    ) -> Result<Encoding, ValidationError> {
        let tokenizer = self.tokenizer.clone();
        let task = tokio::task::spawn_blocking(move || {
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

/// Checks every parameter range and limit that does not need the token count.
fn check_parameters(
    limits: &ValidationLimits,
    p: &GenerateParameters,
) -> Result<CheckedParameters, ValidationError> {
    check_unsupported(p)?;
    let best_of = p.best_of.unwrap_or(1);
    if best_of == 0 || best_of > limits.max_best_of {
        return Err(ValidationError::BestOf(limits.max_best_of, best_of));
    }
    let temperature = p.temperature.unwrap_or(1.0);
    if temperature <= 0.0 || temperature.is_nan() {
        return Err(ValidationError::Temperature);
    }
    let repetition_penalty = p.repetition_penalty.unwrap_or(1.0);
    if repetition_penalty <= 0.0 || repetition_penalty.is_nan() {
        return Err(ValidationError::RepetitionPenalty);
    }
    let top_p = p.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ValidationError::TopP);
    }
    let typical_p = p.typical_p.unwrap_or(1.0);
    if !(typical_p > 0.0 && typical_p <= 1.0) {
        return Err(ValidationError::TypicalP);
    }
    let top_k = match p.top_k {
        Some(k) if k <= 0 => return Err(ValidationError::TopK),
        Some(k) => k as u32,
        None => 0,
    };
    // `best_of` needs the request to ask for sampling: `do_sample`, or any warper given (as
    // LoRAX checks it: given at all, whatever its value).
    let asks_sampling = p.do_sample
        || p.temperature.is_some()
        || p.top_k.is_some()
        || p.top_p.is_some()
        || p.typical_p.is_some();
    if best_of > 1 && !asks_sampling {
        return Err(ValidationError::BestOfSampling);
    }
    if best_of > 1 && p.seed.is_some() {
        return Err(ValidationError::BestOfSeed);
    }
    let do_sample = samples(p.do_sample, temperature, top_k, top_p, typical_p) || best_of > 1;
    let top_n_tokens = p.top_n_tokens.or(p.return_k_alternatives).unwrap_or(0);
    if top_n_tokens > MAX_TOP_N_TOKENS {
        return Err(ValidationError::TopNTokens(MAX_TOP_N_TOKENS, top_n_tokens));
    }
    if p.max_new_tokens == Some(0) {
        return Err(ValidationError::NegativeMaxNewTokens);
    }
    if p.stop.len() > limits.max_stop_sequences {
        return Err(ValidationError::StopSequence(
            limits.max_stop_sequences,
            p.stop.len(),
        ));
    }
    if let Some(t) = p.truncate {
        if t == 0 || t > limits.max_input_length {
            return Err(ValidationError::Truncate(limits.max_input_length, t));
        }
    }
    Ok(CheckedParameters {
        parameters: pb::NextTokenChooserParameters {
            temperature,
            top_k,
            top_p,
            typical_p,
            do_sample,
            seed: p.seed.unwrap_or_else(rand::random),
            repetition_penalty,
            watermark: p.watermark,
        },
        max_new_tokens: p.max_new_tokens,
        truncate: p.truncate,
        top_n_tokens,
    })
}

/// Whether a request samples. As in LoRAX (and TGI), any logits warper that changes the
/// distribution (`temperature` != 1, `top_k` > 0, `top_p` < 1, `typical_p` < 1) turns sampling
/// on even without `do_sample`; otherwise the request is greedy and its warpers are no-ops.
pub fn samples(do_sample: bool, temperature: f32, top_k: u32, top_p: f32, typical_p: f32) -> bool {
    do_sample || temperature != 1.0 || top_k > 0 || top_p < 1.0 || typical_p < 1.0
}

/// Features that are not implemented: refused clearly rather than silently ignored (or failed
/// by the shard).
fn check_unsupported(p: &GenerateParameters) -> Result<(), ValidationError> {
    if p.response_format.as_ref().is_some_and(|f| !f.is_null()) {
        return Err(ValidationError::NotSupported("response_format"));
    }
    if p.watermark {
        return Err(ValidationError::Watermark);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::test_tokenizer;
    use ValidationError as E;

    fn limits() -> ValidationLimits {
        ValidationLimits {
            max_best_of: 2,
            max_stop_sequences: 2,
            max_input_length: 6,
            max_total_tokens: 10,
        }
    }

    /// Default parameters changed by `f`.
    fn params(f: impl FnOnce(&mut GenerateParameters)) -> GenerateParameters {
        let mut p = GenerateParameters::default();
        f(&mut p);
        p
    }

    async fn check(
        inputs: &str,
        parameters: GenerateParameters,
    ) -> Result<ValidGenerateRequest, E> {
        let request = GenerateRequest {
            inputs: inputs.to_string(),
            parameters,
        };
        Validation::new(test_tokenizer(), limits())
            .validate(request)
            .await
    }

    fn param_error(p: GenerateParameters) -> E {
        check_parameters(&limits(), &p).unwrap_err()
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

    #[test]
    fn parameter_ranges() {
        let cases = [
            (params(|p| p.temperature = Some(0.0)), E::Temperature),
            (params(|p| p.temperature = Some(-1.0)), E::Temperature),
            (params(|p| p.top_p = Some(0.0)), E::TopP),
            (params(|p| p.top_p = Some(1.01)), E::TopP),
            (params(|p| p.typical_p = Some(0.0)), E::TypicalP),
            (params(|p| p.typical_p = Some(1.5)), E::TypicalP),
            (params(|p| p.top_k = Some(0)), E::TopK),
            (
                params(|p| p.repetition_penalty = Some(0.0)),
                E::RepetitionPenalty,
            ),
            (
                params(|p| p.max_new_tokens = Some(0)),
                E::NegativeMaxNewTokens,
            ),
            (params(|p| p.truncate = Some(0)), E::Truncate(6, 0)),
            (params(|p| p.truncate = Some(7)), E::Truncate(6, 7)),
            (params(|p| p.top_n_tokens = Some(11)), E::TopNTokens(10, 11)),
            (
                params(|p| p.stop = vec!["a".into(), "b".into(), "c".into()]),
                E::StopSequence(2, 3),
            ),
        ];
        for (p, expected) in cases {
            assert_eq!(param_error(p), expected);
        }
        let ok = params(|p| {
            p.top_p = Some(1.0);
            p.typical_p = Some(0.5);
            p.top_k = Some(5);
            p.temperature = Some(0.7);
            p.repetition_penalty = Some(1.2);
            p.stop = vec!["x".into(), "y".into()];
        });
        let checked = check_parameters(&limits(), &ok).unwrap();
        assert_eq!(checked.parameters.top_k, 5);
        assert_eq!(checked.parameters.temperature, 0.7);
    }

    #[test]
    fn best_of_rules() {
        assert_eq!(
            param_error(params(|p| p.best_of = Some(0))),
            E::BestOf(2, 0)
        );
        let too_many = params(|p| {
            p.best_of = Some(3);
            p.do_sample = true;
        });
        assert_eq!(param_error(too_many), E::BestOf(2, 3));
        assert_eq!(
            param_error(params(|p| p.best_of = Some(2))),
            E::BestOfSampling
        );
        let seeded = params(|p| {
            p.best_of = Some(2);
            p.do_sample = true;
            p.seed = Some(1);
        });
        assert_eq!(param_error(seeded), E::BestOfSeed);
        let ok = params(|p| {
            p.best_of = Some(2);
            p.temperature = Some(0.5);
        });
        assert!(check_parameters(&limits(), &ok).is_ok());
    }

    #[test]
    fn warpers_turn_sampling_on() {
        let do_sample = |f: fn(&mut GenerateParameters)| {
            check_parameters(&limits(), &params(f))
                .unwrap()
                .parameters
                .do_sample
        };
        assert!(!do_sample(|_| {}));
        // Warpers at their neutral values do not sample.
        assert!(!do_sample(|p| {
            p.temperature = Some(1.0);
            p.top_p = Some(1.0);
            p.typical_p = Some(1.0);
            p.repetition_penalty = Some(1.3);
        }));
        assert!(do_sample(|p| p.do_sample = true));
        assert!(do_sample(|p| p.temperature = Some(0.7)));
        assert!(do_sample(|p| p.temperature = Some(1.5)));
        assert!(do_sample(|p| p.top_k = Some(1)));
        assert!(do_sample(|p| p.top_p = Some(0.9)));
        assert!(do_sample(|p| p.typical_p = Some(0.5)));
        // best_of > 1 always samples (a warper given at any value asks for it, as in LoRAX).
        assert!(do_sample(|p| {
            p.best_of = Some(2);
            p.temperature = Some(1.0);
        }));
        // Edge values are still refused before anything else.
        assert_eq!(
            param_error(params(|p| {
                p.do_sample = true;
                p.temperature = Some(0.0);
            })),
            E::Temperature
        );
        assert_eq!(
            param_error(params(|p| p.temperature = Some(f32::NAN))),
            E::Temperature
        );
    }

    #[test]
    fn watermark_is_refused() {
        assert_eq!(param_error(params(|p| p.watermark = true)), E::Watermark);
        assert_eq!(E::Watermark.to_string(), "watermark is not supported");
        assert!(check_parameters(&limits(), &params(|p| p.watermark = false)).is_ok());
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

    #[test]
    fn seeds_are_kept_or_drawn() {
        let checked = check_parameters(&limits(), &params(|p| p.seed = Some(42))).unwrap();
        assert_eq!(checked.parameters.seed, 42);
    }

    #[tokio::test]
    async fn adapters_are_resolved_and_unsupported_features_refused() {
        let named = check("hello", params(|p| p.adapter_id = Some("org/lora".into())))
            .await
            .unwrap();
        assert_eq!(named.adapter.unwrap().key.describe(), "org/lora");
        let source = params(|p| {
            p.adapter_id = Some("a".into());
            p.adapter_source = Some("ftp".into());
        });
        assert_eq!(
            check("hello", source).await.unwrap_err(),
            E::AdapterSource("ftp".into())
        );
        let merged = params(|p| {
            p.merged_adapters = Some(crate::adapter::MergedAdapters {
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
        assert_eq!(param_error(format), E::NotSupported("response_format"));
        // An empty adapter id with a source is the base model.
        let base = params(|p| {
            p.adapter_id = Some(String::new());
            p.adapter_source = Some("hub".into());
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
            parameters: params(|p| p.adapter_id = Some("org/lora".into())),
        };
        assert_eq!(
            unsupported.validate(request).await.unwrap_err(),
            E::AdaptersNotSupported("GPT2LMHeadModel".into())
        );
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
