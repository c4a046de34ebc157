//! Adapter identity: what a request names (one LoRA adapter, or a per-request merge of several),
//! where it comes from, and which token fetched it. Two requests share a loaded adapter exactly
//! when their `AdapterKey`s are equal. The token itself is a secret: it travels to the shard and
//! nowhere else (it prints as `***`; keys hold only a keyed hash of it).

use crate::errors::ValidationError;
use crate::pb;
use serde::{Deserialize, Serialize};
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, OnceLock};
use utoipa::openapi::schema::{Object, ObjectBuilder, SchemaType, Type};
use utoipa::ToSchema;

/// Merge strategies the shard implements.
pub const MERGE_STRATEGIES: [&str; 4] = ["linear", "ties", "dare_linear", "dare_ties"];
/// TIES sign-election methods.
pub const SIGN_METHODS: [&str; 2] = ["total", "frequency"];
/// Longest adapter id accepted (ids end up in logs and metric labels).
pub const MAX_ADAPTER_ID_LENGTH: usize = 512;

/// Where an adapter's files come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AdapterSource {
    Hub,
    Local,
    S3,
}

impl AdapterSource {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "hub" => Some(Self::Hub),
            "local" => Some(Self::Local),
            "s3" => Some(Self::S3),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hub => "hub",
            Self::Local => "local",
            Self::S3 => "s3",
        }
    }

    pub fn to_proto(self) -> pb::AdapterSource {
        match self {
            Self::Hub => pb::AdapterSource::Hub,
            Self::Local => pb::AdapterSource::Local,
            Self::S3 => pb::AdapterSource::S3,
        }
    }
}

/// A token for private adapters. Never printed, logged or serialized.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct ApiToken(String);

impl ApiToken {
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The token itself, for the shard call that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// 128-bit keyed hash (SipHash with random per-process keys): tells tokens apart without
    /// keeping anything that could be turned back into the token outside this process.
    fn fingerprint(&self) -> u128 {
        static KEYS: OnceLock<[RandomState; 2]> = OnceLock::new();
        let [a, b] = KEYS.get_or_init(|| [RandomState::new(), RandomState::new()]);
        (u128::from(a.hash_one(&self.0)) << 64) | u128::from(b.hash_one(&self.0))
    }
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(***)")
    }
}

/// `merged_adapters` of a request (LoRAX's JSON). Absent fields take LoRAX's defaults.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, ToSchema)]
pub struct MergedAdapters {
    /// The adapters to merge (an absent or empty list is refused).
    #[serde(default)]
    #[schema(required = true, min_items = 1, example = json!(["org/adapter-a", "org/adapter-b"]))]
    pub ids: Vec<String>,
    /// One weight per id; default 1.0 each.
    #[serde(default)]
    pub weights: Option<Vec<f32>>,
    #[serde(default)]
    #[schema(schema_with = merge_strategy_schema)]
    pub merge_strategy: Option<String>,
    /// Fraction kept by TIES/DARE, in (0, 1]; default 1.0.
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, maximum = 1.0, default = 1.0)]
    pub density: Option<f32>,
    #[serde(default)]
    #[schema(schema_with = sign_method_schema)]
    pub majority_sign_method: Option<String>,
}

/// A nullable string field that takes one of `names` (null: `names[0]`), for the document.
fn choice_schema(names: &[&str], description: &str) -> Object {
    let values = names.iter().map(|n| serde_json::json!(n));
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .enum_values(Some(values.chain([serde_json::Value::Null])))
        .default(Some(serde_json::json!(names[0])))
        .description(Some(description))
        .build()
}

fn merge_strategy_schema() -> Object {
    choice_schema(&MERGE_STRATEGIES, "How the adapters are merged")
}

fn sign_method_schema() -> Object {
    choice_schema(&SIGN_METHODS, "TIES sign election")
}

/// Validated merge settings, defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeParams {
    pub weights: Vec<f32>,
    pub merge_strategy: String,
    pub density: f32,
    pub majority_sign_method: String,
}

impl Eq for MergeParams {}

impl Hash for MergeParams {
    fn hash<H: Hasher>(&self, state: &mut H) {
        for w in &self.weights {
            w.to_bits().hash(state);
        }
        self.merge_strategy.hash(state);
        self.density.to_bits().hash(state);
        self.majority_sign_method.hash(state);
    }
}

/// What identifies an adapter: ids, merge settings, source and (a hash of) the token.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AdapterKey {
    pub ids: Vec<String>,
    /// None for a single adapter named by `adapter_id`.
    pub merge: Option<MergeParams>,
    pub source: AdapterSource,
    token_fingerprint: Option<u128>,
}

impl AdapterKey {
    /// A single adapter fetched with the server's own credentials.
    pub fn single(id: impl Into<String>, source: AdapterSource) -> Self {
        Self {
            ids: vec![id.into()],
            merge: None,
            source,
            token_fingerprint: None,
        }
    }

    /// Human-readable name: the id, or the merged ids joined by `+`. Never holds the token.
    pub fn describe(&self) -> String {
        self.ids.join("+")
    }

    /// Whether a request token is part of the key.
    pub fn is_private(&self) -> bool {
        self.token_fingerprint.is_some()
    }

    /// The merge settings as the API shows them (None for a single adapter).
    pub fn merged_adapters(&self) -> Option<MergedAdapters> {
        self.merge.as_ref().map(|m| MergedAdapters {
            ids: self.ids.clone(),
            weights: Some(m.weights.clone()),
            merge_strategy: Some(m.merge_strategy.clone()),
            density: Some(m.density),
            majority_sign_method: Some(m.majority_sign_method.clone()),
        })
    }

    pub fn to_proto(&self) -> pb::AdapterParameters {
        match &self.merge {
            Some(m) => pb::AdapterParameters {
                adapter_ids: self.ids.clone(),
                weights: m.weights.clone(),
                merge_strategy: m.merge_strategy.clone(),
                density: m.density,
                majority_sign_method: m.majority_sign_method.clone(),
            },
            None => pb::AdapterParameters {
                adapter_ids: self.ids.clone(),
                weights: vec![],
                merge_strategy: String::new(),
                density: 1.0,
                majority_sign_method: String::new(),
            },
        }
    }
}

/// An adapter as a request names it: its key and the token to fetch it with.
#[derive(Clone, Debug)]
pub struct AdapterRequest {
    pub key: Arc<AdapterKey>,
    pub api_token: Option<ApiToken>,
}

impl AdapterRequest {
    pub fn new(mut key: AdapterKey, api_token: Option<ApiToken>) -> Self {
        let api_token = api_token.filter(|t| !t.0.is_empty());
        key.token_fingerprint = api_token.as_ref().map(ApiToken::fingerprint);
        Self {
            key: Arc::new(key),
            api_token,
        }
    }

    pub fn token(&self) -> Option<String> {
        self.api_token.as_ref().map(|t| t.expose().to_string())
    }
}

/// What the router knows about adapters when it validates a request.
#[derive(Clone, Debug)]
pub struct AdapterConfig {
    /// Whether the shard takes adapters (`Info.supports_adapters`).
    pub supports_adapters: bool,
    /// `Info.architecture`, for the error when it does not.
    pub architecture: String,
    /// The base model's id: naming it means the base model.
    pub model_id: String,
    /// Used by requests that name no adapter.
    pub default_adapter_id: Option<String>,
    /// Source of requests that name an adapter but no `adapter_source`.
    pub default_source: AdapterSource,
    /// Source of the default adapter (`default_adapter_id`).
    pub default_adapter_source: AdapterSource,
    /// The shards merged the default adapter into the base weights: the model they serve is that
    /// adapter's, and no other adapter can be loaded.
    pub merged: bool,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            supports_adapters: true,
            architecture: String::new(),
            model_id: String::new(),
            default_adapter_id: None,
            default_source: AdapterSource::Hub,
            default_adapter_source: AdapterSource::Hub,
            merged: false,
        }
    }
}

impl AdapterConfig {
    /// The default adapter, when one is configured and not merged into the base weights.
    pub fn default_adapter(&self) -> Option<AdapterRequest> {
        if self.merged {
            return None;
        }
        let id = self
            .default_adapter_id
            .as_deref()
            .filter(|id| !id.is_empty())?;
        Some(AdapterRequest::new(
            AdapterKey::single(id, self.default_adapter_source),
            None,
        ))
    }
}

/// The JSON fields that name an adapter, as LoRAX spells them: flattened into the generate
/// parameters and into the bodies of the adapter management endpoints.
#[derive(Clone, Debug, Default, ToSchema)]
pub struct AdapterParams {
    /// LoRA adapter to apply; absent or empty means the default adapter (if the server has
    /// one) or the base model; the base model's id means the base model.
    #[schema(max_length = 512, example = "org/adapter")]
    pub adapter_id: Option<String>,
    /// Where the adapter comes from (default: the server's default source).
    #[schema(value_type = Option<AdapterSource>)]
    pub adapter_source: Option<String>,
    /// Several adapters merged per request (`ids`, `weights`, `merge_strategy`, ...); not with
    /// `adapter_id`.
    pub merged_adapters: Option<MergedAdapters>,
    /// Token for private adapters (overrides the server's token for this request; never
    /// logged or echoed); default: the `Authorization: Bearer` token.
    #[schema(value_type = Option<String>)]
    pub api_token: Option<ApiToken>,
}

/// `AdapterParams` as JSON.
#[derive(Deserialize)]
struct AdapterParamsJson {
    #[serde(default)]
    adapter_id: Option<String>,
    #[serde(default)]
    adapter_source: Option<String>,
    #[serde(default)]
    merged_adapters: Option<MergedAdapters>,
    #[serde(default)]
    api_token: Option<ApiToken>,
}

/// Read with its own path tracking: a field of the wrong type is refused naming it, although
/// `#[serde(flatten)]` (how the bodies hold these fields) loses the path.
impl<'de> Deserialize<'de> for AdapterParams {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let json: AdapterParamsJson = serde_path_to_error::deserialize(deserializer)
            .map_err(|e| D::Error::custom(e.to_string()))?;
        Ok(Self {
            adapter_id: json.adapter_id,
            adapter_source: json.adapter_source,
            merged_adapters: json.merged_adapters,
            api_token: json.api_token,
        })
    }
}

impl AdapterParams {
    /// The fields as `resolve` reads them.
    pub fn fields(&self) -> AdapterFields<'_> {
        AdapterFields {
            adapter_id: self.adapter_id.as_deref(),
            merged_adapters: self.merged_adapters.as_ref(),
            adapter_source: self.adapter_source.as_deref(),
            api_token: self.api_token.as_ref(),
        }
    }
}

/// A borrowed view of the adapter-naming fields (`AdapterParams::fields`).
#[derive(Clone, Copy, Debug, Default)]
pub struct AdapterFields<'a> {
    pub adapter_id: Option<&'a str>,
    pub merged_adapters: Option<&'a MergedAdapters>,
    pub adapter_source: Option<&'a str>,
    pub api_token: Option<&'a ApiToken>,
}

/// With the default adapter merged into the base weights, the one model there is: for requests
/// naming no adapter, the base model's id or the merged adapter's.
fn resolve_merged(
    config: &AdapterConfig,
    named: Option<&str>,
    merges: bool,
) -> Result<Option<AdapterRequest>, ValidationError> {
    let merged_id = config.default_adapter_id.as_deref().unwrap_or_default();
    match named {
        None if !merges => Ok(None),
        Some(id) if !merges && (id == config.model_id || id == merged_id) => Ok(None),
        _ => Err(ValidationError::AdaptersMerged(merged_id.to_string())),
    }
}

/// The adapter a request runs with (None: the base model). A request naming none gets the
/// default adapter when one is configured; naming the base model's id means the base model.
pub fn resolve(
    config: &AdapterConfig,
    fields: AdapterFields<'_>,
) -> Result<Option<AdapterRequest>, ValidationError> {
    let source = match fields.adapter_source {
        Some(name) => {
            AdapterSource::parse(name).ok_or_else(|| ValidationError::AdapterSource(name.into()))?
        }
        None => config.default_source,
    };
    let named = fields.adapter_id.filter(|id| !id.is_empty());
    if config.merged {
        return resolve_merged(config, named, fields.merged_adapters.is_some());
    }
    let token = fields.api_token.cloned();
    let key = match (named, fields.merged_adapters) {
        (Some(_), Some(_)) => return Err(ValidationError::AdapterConflict),
        (None, Some(merged)) => AdapterKey {
            ids: merged.ids.clone(),
            merge: Some(check_merge(merged)?),
            source,
            token_fingerprint: None,
        },
        (Some(id), None) if id == config.model_id => return Ok(None),
        (Some(id), None) => {
            check_id(id)?;
            AdapterKey::single(id, source)
        }
        (None, None) => return Ok(config.default_adapter()),
    };
    if !config.supports_adapters {
        return Err(ValidationError::AdaptersNotSupported(
            config.architecture.clone(),
        ));
    }
    Ok(Some(AdapterRequest::new(key, token)))
}

fn check_id(id: &str) -> Result<(), ValidationError> {
    let bad = |why: &str| ValidationError::AdapterId(why.to_string());
    // Characters, as the message (and the document's maxLength) say, not bytes.
    if id.chars().count() > MAX_ADAPTER_ID_LENGTH {
        return Err(bad(&format!(
            "is longer than {MAX_ADAPTER_ID_LENGTH} characters"
        )));
    }
    if id.trim().is_empty() || id.chars().any(char::is_control) {
        return Err(bad("must be a non-blank name without control characters"));
    }
    Ok(())
}

/// Checks `merged_adapters` as the shard will, with a message naming the field.
pub fn check_merge(m: &MergedAdapters) -> Result<MergeParams, ValidationError> {
    let bad = |message: String| ValidationError::MergedAdapters(message);
    if m.ids.is_empty() {
        return Err(bad(
            "`merged_adapters.ids` must name at least one adapter".into()
        ));
    }
    for id in &m.ids {
        check_id(id).map_err(|_| {
            bad(format!(
                "`merged_adapters.ids` must hold non-blank names of at most \
                 {MAX_ADAPTER_ID_LENGTH} characters"
            ))
        })?;
    }
    let weights = m.weights.clone().unwrap_or_else(|| vec![1.0; m.ids.len()]);
    if weights.len() != m.ids.len() {
        return Err(bad(format!(
            "`merged_adapters.weights` has {} value(s) for {} adapter(s); give one weight per id",
            weights.len(),
            m.ids.len()
        )));
    }
    if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
        return Err(bad(format!(
            "`merged_adapters.weights` must be finite numbers, got {w}"
        )));
    }
    let merge_strategy = m.merge_strategy.clone().unwrap_or_else(|| "linear".into());
    if !MERGE_STRATEGIES.contains(&merge_strategy.as_str()) {
        return Err(bad(format!(
            "`merged_adapters.merge_strategy` must be one of {}; got {merge_strategy:?}",
            MERGE_STRATEGIES.join(", ")
        )));
    }
    let density = m.density.unwrap_or(1.0);
    if !(density > 0.0 && density <= 1.0) {
        return Err(bad(format!(
            "`merged_adapters.density` must be in (0, 1], got {density}"
        )));
    }
    let majority_sign_method = m
        .majority_sign_method
        .clone()
        .unwrap_or_else(|| "total".into());
    if !SIGN_METHODS.contains(&majority_sign_method.as_str()) {
        return Err(bad(format!(
            "`merged_adapters.majority_sign_method` must be one of {}; got {majority_sign_method:?}",
            SIGN_METHODS.join(", ")
        )));
    }
    Ok(MergeParams {
        weights,
        merge_strategy,
        density,
        majority_sign_method,
    })
}

#[cfg(test)]
mod tests;
