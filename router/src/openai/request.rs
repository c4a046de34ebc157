//! OpenAI request bodies and their native parameters. A body is read in two parts (the
//! endpoint's own fields, and the sampling fields both endpoints share) from the same JSON, each
//! with its own path tracking, so a wrong type is refused naming its field (`#[serde(flatten)]`
//! would lose the path).

use super::body::Logprobs;
use crate::adapter::{AdapterParams, ApiToken};
use crate::api::GenerateParameters;
use crate::errors::ValidationError;
use crate::template::ChatMessage;
use crate::tools::ToolFields;
use crate::validation::MAX_TOP_N_TOKENS;
use serde::de::{DeserializeOwned, Deserializer, Error as _};
use serde::Deserialize;
use serde_json::Value;
use std::borrow::Cow;
use utoipa::openapi::schema::{AllOfBuilder, Schema};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{PartialSchema, ToSchema};

/// `stop` (and `prompt`) as a string or a list of strings.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send one more chunk with the usage (and no choices) before `[DONE]`.
    #[serde(default)]
    #[schema(default = false)]
    pub include_usage: bool,
}

/// Fields both endpoints take (OpenAI's, plus LoRAX's extras).
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
pub struct SamplingFields {
    /// The adapter; `""`, the served model's id and the placeholders "dummy" and "tgi" name
    /// none (see `adapter_of_model`).
    #[serde(default)]
    #[schema(example = "org/adapter")]
    pub model: String,
    /// Most tokens to generate (default: up to `max_total_tokens`).
    #[schema(minimum = 1)]
    pub max_tokens: Option<u32>,
    /// OpenAI's newer name for `max_tokens` (used when `max_tokens` is absent).
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<u32>,
    /// 0 means greedy.
    #[schema(minimum = 0.0)]
    pub temperature: Option<f32>,
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f32>,
    /// Choices to generate (each its own sequence; at most `--max-best-of`).
    #[schema(minimum = 1, default = 1)]
    pub n: Option<u32>,
    /// Answer with server-sent events of chunks, ending with `data: [DONE]`.
    #[serde(default)]
    #[schema(default = false)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<StringOrList>,
    pub seed: Option<u64>,
    #[schema(minimum = -2.0, maximum = 2.0, default = 0.0)]
    pub frequency_penalty: Option<f32>,
    #[schema(minimum = -2.0, maximum = 2.0, default = 0.0)]
    pub presence_penalty: Option<f32>,
    /// Only null (or `{}`) is accepted.
    #[schema(value_type = Option<Object>)]
    pub logit_bias: Option<Value>,
    /// Accepted and not used.
    pub user: Option<String>,
    #[schema(exclusive_minimum = 0.0)]
    pub repetition_penalty: Option<f32>,
    #[schema(minimum = 1)]
    pub top_k: Option<i32>,
    pub ignore_eos_token: Option<bool>,
    #[schema(value_type = Option<crate::adapter::AdapterSource>)]
    pub adapter_source: Option<String>,
    /// Token for a private adapter; default: the `Authorization: Bearer` token.
    #[schema(value_type = Option<String>)]
    pub api_token: Option<ApiToken>,
    /// `{type: json_object, schema?}`, `{type: json_schema, json_schema: {schema}}` or
    /// `{type: text}`.
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<Value>,
}

/// An OpenAI body: the endpoint's own fields and the shared sampling fields.
#[derive(Clone, Debug)]
pub struct OpenAiRequest<T> {
    pub fields: T,
    pub sampling: SamplingFields,
}

/// `POST /v1/completions`' own fields.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct CompletionFields {
    /// One prompt (a list must hold exactly one).
    pub prompt: StringOrList,
    /// Prepend the prompt to the text.
    #[serde(default)]
    #[schema(default = false)]
    pub echo: bool,
    #[schema(minimum = 1)]
    pub best_of: Option<usize>,
    /// Log-probabilities of the generated tokens with this many alternatives each.
    #[schema(maximum = 10)]
    pub logprobs: Option<u32>,
}

/// `POST /v1/chat/completions`' own fields.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct ChatFields {
    pub messages: Vec<ChatMessage>,
    /// `tools`, `tool_choice`, `tool_prompt`, `parallel_tool_calls`.
    #[serde(flatten)]
    pub tools: ToolFields,
    /// Log-probabilities of the generated tokens.
    #[serde(default)]
    #[schema(default = false)]
    pub logprobs: bool,
    /// Alternatives per token with `logprobs` (0..=MAX_TOP_N_TOKENS).
    #[schema(maximum = 10)]
    pub top_logprobs: Option<u32>,
}

pub type CompletionRequest = OpenAiRequest<CompletionFields>;
pub type ChatCompletionRequest = OpenAiRequest<ChatFields>;

/// The schema of a body: the endpoint's fields and the sampling fields, both of one object.
fn body_schema<T: ToSchema>() -> RefOr<Schema> {
    AllOfBuilder::new()
        .item(Ref::from_schema_name(T::name()))
        .item(Ref::from_schema_name(SamplingFields::name()))
        .into()
}

/// Registers the two parts `body_schema` refers to.
fn body_parts<T: ToSchema>(schemas: &mut Vec<(String, RefOr<Schema>)>) {
    schemas.push((T::name().into(), T::schema()));
    T::schemas(schemas);
    schemas.push((SamplingFields::name().into(), SamplingFields::schema()));
    SamplingFields::schemas(schemas);
}

impl PartialSchema for CompletionRequest {
    fn schema() -> RefOr<Schema> {
        body_schema::<CompletionFields>()
    }
}

impl ToSchema for CompletionRequest {
    fn name() -> Cow<'static, str> {
        "CompletionRequest".into()
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        body_parts::<CompletionFields>(schemas);
    }
}

impl PartialSchema for ChatCompletionRequest {
    fn schema() -> RefOr<Schema> {
        body_schema::<ChatFields>()
    }
}

impl ToSchema for ChatCompletionRequest {
    fn name() -> Cow<'static, str> {
        "ChatCompletionRequest".into()
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        body_parts::<ChatFields>(schemas);
    }
}

/// A part of the body, with the path of a wrong field in the error.
fn part<T: DeserializeOwned, E: serde::de::Error>(body: &Value) -> Result<T, E> {
    serde_path_to_error::deserialize(body).map_err(|e| E::custom(e.to_string()))
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for OpenAiRequest<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let body = Value::deserialize(deserializer)?;
        if !body.is_object() {
            return Err(D::Error::custom("the body must be a JSON object"));
        }
        Ok(Self {
            fields: part(&body)?,
            sampling: part(&body)?,
        })
    }
}

/// `model` values that clients send when they have no model to name: huggingface_hub's
/// `InferenceClient.chat_completion` sends "dummy", TGI's documentation uses "tgi". They mean
/// the same as an empty `model`.
pub const MODEL_PLACEHOLDERS: [&str; 2] = ["dummy", "tgi"];

/// Whether `model` names no adapter: empty, or a placeholder.
pub fn is_unnamed(model: &str) -> bool {
    model.is_empty() || MODEL_PLACEHOLDERS.contains(&model)
}

/// The adapter `model` names: None for `""` and the placeholders (the default adapter, else the
/// base model); the served model's id is passed on and resolves to the base model.
pub fn adapter_of_model(model: &str) -> Option<String> {
    (!is_unnamed(model)).then(|| model.to_string())
}

impl SamplingFields {
    /// Choices asked for: 1..=max.
    pub fn choices(&self, max: usize) -> Result<usize, ValidationError> {
        match self.n.unwrap_or(1) {
            n if n == 0 || n as usize > max => Err(ValidationError::N(max, n)),
            n => Ok(n as usize),
        }
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }

    /// The native parameters of the request (`top_n_tokens` is set by the endpoint).
    pub fn parameters(&self) -> Result<GenerateParameters, ValidationError> {
        let unset_bias = match &self.logit_bias {
            None | Some(Value::Null) => true,
            Some(Value::Object(map)) => map.is_empty(),
            Some(_) => false,
        };
        if !unset_bias {
            return Err(ValidationError::NotSupported("logit_bias"));
        }
        // OpenAI's temperature 0 means greedy; ours must be > 0, so it becomes "unset".
        let temperature = self.temperature.filter(|t| *t != 0.0);
        let top_p = self.top_p;
        Ok(GenerateParameters {
            adapter: AdapterParams {
                adapter_id: adapter_of_model(&self.model),
                adapter_source: self.adapter_source.clone(),
                merged_adapters: None,
                api_token: self.api_token.clone(),
            },
            temperature,
            top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            do_sample: temperature.is_some()
                || top_p.is_some_and(|p| p < 1.0)
                || self.top_k.is_some(),
            max_new_tokens: self.max_tokens.or(self.max_completion_tokens),
            ignore_eos_token: self.ignore_eos_token.unwrap_or(false),
            stop: self
                .stop
                .clone()
                .map(StringOrList::into_vec)
                .unwrap_or_default(),
            seed: self.seed,
            response_format: self.response_format.clone(),
            details: true,
            ..Default::default()
        })
    }
}

/// Chat's log-probabilities: which, and how many alternatives (`top_n_tokens`).
pub fn chat_logprobs(fields: &ChatFields) -> Result<(Logprobs, u32), ValidationError> {
    let top = fields.top_logprobs.unwrap_or(0);
    if top > MAX_TOP_N_TOKENS {
        return Err(ValidationError::TopLogprobs(
            "top_logprobs",
            MAX_TOP_N_TOKENS,
            top,
        ));
    }
    match (fields.logprobs, top) {
        (true, top) => Ok((Logprobs::Chat, top)),
        (false, 0) => Ok((Logprobs::None, 0)),
        (false, _) => Err(ValidationError::TopLogprobsWithoutLogprobs),
    }
}

/// Completions' log-probabilities: `logprobs: k` asks for them with k alternatives.
pub fn completion_logprobs(fields: &CompletionFields) -> Result<(Logprobs, u32), ValidationError> {
    match fields.logprobs {
        None => Ok((Logprobs::None, 0)),
        Some(k) if k > MAX_TOP_N_TOKENS => Err(ValidationError::TopLogprobs(
            "logprobs",
            MAX_TOP_N_TOKENS,
            k,
        )),
        Some(k) => Ok((Logprobs::Completion, k)),
    }
}

/// The request of choice `index` of `n`: a given seed becomes `seed + index`, so sampled
/// choices differ and each stays reproducible.
pub fn choice_parameters(parameters: &GenerateParameters, index: usize) -> GenerateParameters {
    let mut p = parameters.clone();
    p.seed = p.seed.map(|s| s.wrapping_add(index as u64));
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(body: Value) -> Result<ChatCompletionRequest, String> {
        serde_json::from_value(body).map_err(|e| e.to_string())
    }

    #[test]
    fn wrong_types_name_their_field() {
        let messages = json!([{"role": "user", "content": "hi"}]);
        for (field, value, says) in [
            (
                "presence_penalty",
                json!("0.5"),
                "invalid type: string \"0.5\", expected f32",
            ),
            (
                "frequency_penalty",
                json!(true),
                "invalid type: boolean `true`, expected f32",
            ),
            ("n", json!(-1), "invalid value: integer `-1`, expected u32"),
            ("logprobs", json!(2), "expected a boolean"),
            ("top_logprobs", json!("3"), "expected u32"),
            (
                "stream_options",
                json!({"include_usage": 1}),
                "expected a boolean",
            ),
            ("seed", json!(1.5), "expected u64"),
            ("user", json!(5), "expected a string"),
        ] {
            let mut body = json!({"messages": messages});
            body[field] = value;
            let error = chat(body).unwrap_err();
            assert!(error.starts_with(field), "{field}: {error}");
            assert!(error.contains(says), "{field}: {error}");
        }
        let error = chat(json!({"model": "x"})).unwrap_err();
        assert!(error.contains("missing field `messages`"), "{error}");
        let error = chat(json!([1])).unwrap_err();
        assert!(error.contains("JSON object"), "{error}");
        let error = chat(json!({"messages": [{"role": "user", "content": 4}]})).unwrap_err();
        assert!(error.starts_with("messages[0].content"), "{error}");
    }

    #[test]
    fn fields_reach_the_native_parameters() {
        let body = json!({"messages": [], "model": "org/adapter", "temperature": 0,
            "frequency_penalty": 0.5, "presence_penalty": -1.0, "stop": "x", "seed": 9,
            "user": "u", "logit_bias": null, "max_completion_tokens": 7,
            "response_format": {"type": "json_object"}});
        let request = chat(body).unwrap();
        let p = request.sampling.parameters().unwrap();
        assert_eq!(p.adapter.adapter_id.as_deref(), Some("org/adapter"));
        assert_eq!(p.temperature, None);
        assert!(!p.do_sample);
        assert_eq!(
            (p.frequency_penalty, p.presence_penalty),
            (Some(0.5), Some(-1.0))
        );
        assert_eq!(p.stop, vec!["x".to_string()]);
        assert_eq!(p.seed, Some(9));
        assert_eq!(p.max_new_tokens, Some(7));
        assert_eq!(p.response_format, Some(json!({"type": "json_object"})));
        assert!(p.details);
    }

    #[test]
    fn logit_bias_only_when_empty() {
        let with = |bias: Value| SamplingFields {
            logit_bias: Some(bias),
            ..Default::default()
        };
        assert!(with(Value::Null).parameters().is_ok());
        assert!(with(json!({})).parameters().is_ok());
        assert_eq!(
            with(json!({"50256": -100})).parameters().unwrap_err(),
            ValidationError::NotSupported("logit_bias")
        );
    }

    #[test]
    fn model_placeholders_name_no_adapter() {
        for model in ["", "dummy", "tgi"] {
            assert_eq!(adapter_of_model(model), None, "{model}");
            assert!(is_unnamed(model));
        }
        assert_eq!(
            adapter_of_model("test/model").as_deref(),
            Some("test/model")
        );
        assert_eq!(adapter_of_model("Dummy").as_deref(), Some("Dummy"));
    }

    #[test]
    fn n_is_bounded() {
        let with = |n: Option<u32>| SamplingFields {
            n,
            ..Default::default()
        };
        assert_eq!(with(None).choices(3), Ok(1));
        assert_eq!(with(Some(3)).choices(3), Ok(3));
        assert_eq!(with(Some(4)).choices(3), Err(ValidationError::N(3, 4)));
        assert_eq!(with(Some(0)).choices(3), Err(ValidationError::N(3, 0)));
        assert_eq!(
            ValidationError::N(3, 4).to_string(),
            "`n` must be between 1 and 3. Given: 4"
        );
    }

    #[test]
    fn logprobs_rules() {
        let chat_fields = |logprobs: bool, top: Option<u32>| ChatFields {
            messages: vec![],
            logprobs,
            top_logprobs: top,
            tools: Default::default(),
        };
        assert_eq!(
            chat_logprobs(&chat_fields(false, None)),
            Ok((Logprobs::None, 0))
        );
        assert_eq!(
            chat_logprobs(&chat_fields(true, None)),
            Ok((Logprobs::Chat, 0))
        );
        assert_eq!(
            chat_logprobs(&chat_fields(true, Some(MAX_TOP_N_TOKENS))),
            Ok((Logprobs::Chat, MAX_TOP_N_TOKENS))
        );
        assert_eq!(
            chat_logprobs(&chat_fields(true, Some(11))),
            Err(ValidationError::TopLogprobs("top_logprobs", 10, 11))
        );
        assert_eq!(
            chat_logprobs(&chat_fields(false, Some(2))),
            Err(ValidationError::TopLogprobsWithoutLogprobs)
        );
        let completion = |k: Option<u32>| CompletionFields {
            prompt: StringOrList::One("x".into()),
            echo: false,
            best_of: None,
            logprobs: k,
        };
        assert_eq!(
            completion_logprobs(&completion(Some(0))),
            Ok((Logprobs::Completion, 0))
        );
        assert_eq!(
            completion_logprobs(&completion(Some(11))),
            Err(ValidationError::TopLogprobs("logprobs", 10, 11))
        );
    }

    #[test]
    fn choices_get_consecutive_seeds() {
        let p = GenerateParameters {
            seed: Some(u64::MAX),
            ..Default::default()
        };
        assert_eq!(choice_parameters(&p, 0).seed, Some(u64::MAX));
        assert_eq!(choice_parameters(&p, 1).seed, Some(0));
        let unseeded = GenerateParameters::default();
        assert_eq!(choice_parameters(&unseeded, 3).seed, None);
    }
}
