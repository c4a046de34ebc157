//! OpenAI tool calling for `/v1/chat/completions`, in pieces the handler puts together:
//!
//! - the request fields ([`ToolFields`]: `tools`, `tool_choice`, `tool_prompt`,
//!   `parallel_tool_calls`) and their validation ([`validate`], [`ToolFields::resolve`]);
//! - the constraint: [`call_schema`] (the JSON schema of one call) and [`grammar`] (which grammar
//!   the shard gets for a `tool_choice`);
//! - the answer: [`parse_call`] and [`assistant_message`] for a whole output, [`ToolCallStream`]
//!   for a streamed one;
//! - the prompt: the tool definitions as Hugging Face chat templates expect them
//!   ([`Tool::to_json`]) and, for templates that know nothing of tools, [`tool_prompt`].
//!
//! A call is generated as one JSON object `{"name": "<function>", "arguments": {...}}`. The shard
//! writes JSON with `", "` and `": "` separators and object members in the order the schema lists
//! them, so `name` comes first; the parsers here accept any whitespace and member order anyway.
//! JSON schemas and arguments are kept as [`Json`], which (unlike `serde_json::Value`, sorted in
//! this crate) keeps object members in their order: the order a client declares a function's
//! parameters in is the order the model writes them.

use crate::errors::{ApiError, ValidationError};
use crate::pb;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::fmt;
use std::io;

// ---------------------------------------------------------------------------------------------
// JSON that keeps the order of object members.
// ---------------------------------------------------------------------------------------------

/// A JSON value whose objects keep their members in order (keys unique; a repeated key keeps
/// its first place and its last value, as JSON parsers commonly do).
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Json {
    #[default]
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    /// Parses JSON text.
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// An object of these members, in this order.
    pub fn object<K: Into<String>>(members: impl IntoIterator<Item = (K, Json)>) -> Self {
        Self::Object(members.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    /// A string value.
    pub fn string(s: impl Into<String>) -> Self {
        Self::String(s.into())
    }

    /// The value of `key` when this is an object that has it.
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Self::Object(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn is_object(&self) -> bool {
        matches!(self, Self::Object(_))
    }

    /// How the value is named in messages ("a list", "a string", ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Null => "null",
            Self::Bool(_) => "a boolean",
            Self::Number(_) => "a number",
            Self::String(_) => "a string",
            Self::Array(_) => "a list",
            Self::Object(_) => "an object",
        }
    }

    /// Compact JSON text (`{"a":1,"b":[1,2]}`), as OpenAI writes a call's `arguments`.
    pub fn to_compact(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// JSON text with Python's `json.dumps` separators (`{"a": 1, "b": [1, 2]}`), as the shard
    /// writes JSON and Hugging Face templates show it.
    pub fn to_spaced(&self) -> String {
        spaced_json(self)
    }
}

impl From<serde_json::Value> for Json {
    fn from(value: serde_json::Value) -> Self {
        use serde_json::Value;
        match value {
            Value::Null => Self::Null,
            Value::Bool(b) => Self::Bool(b),
            Value::Number(n) => Self::Number(n),
            Value::String(s) => Self::String(s),
            Value::Array(items) => Self::Array(items.into_iter().map(Self::from).collect()),
            Value::Object(map) => {
                Self::Object(map.into_iter().map(|(k, v)| (k, v.into())).collect())
            }
        }
    }
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Null => serializer.serialize_unit(),
            Self::Bool(b) => serializer.serialize_bool(*b),
            Self::Number(n) => n.serialize(serializer),
            Self::String(s) => serializer.serialize_str(s),
            Self::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Self::Object(members) => {
                let mut map = serializer.serialize_map(Some(members.len()))?;
                for (key, value) in members {
                    map.serialize_entry(key, value)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
        Ok(Json::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Json, E> {
        serde_json::Number::from_f64(v)
            .map(Json::Number)
            .ok_or_else(|| E::custom("a JSON number must be finite"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Json, E> {
        Ok(Json::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Json, E> {
        Ok(Json::String(v))
    }

    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }

    fn visit_none<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Json, D::Error> {
        Json::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut members: Vec<(String, Json)> = Vec::new();
        while let Some((key, value)) = map.next_entry::<String, Json>()? {
            match members.iter_mut().find(|(k, _)| *k == key) {
                Some(member) => member.1 = value,
                None => members.push((key, value)),
            }
        }
        Ok(Json::Object(members))
    }
}

/// Python's `json.dumps` separators: `", "` between items, `": "` after keys.
struct Spaced;

impl serde_json::ser::Formatter for Spaced {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }
}

/// `value` as JSON text with `", "` and `": "` separators (Python's `json.dumps` default).
pub fn spaced_json<T: Serialize + ?Sized>(value: &T) -> String {
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, Spaced);
    if value.serialize(&mut serializer).is_err() {
        return String::new();
    }
    String::from_utf8(out).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Request fields and their validation.
// ---------------------------------------------------------------------------------------------

/// One entry of `tools`: `{"type": "function", "function": {...}}`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Tool {
    /// Must be "function" (checked by [`validate`], so that the message names the entry).
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub function: FunctionDefinition,
}

/// A function the model may call.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct FunctionDefinition {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// The JSON schema of the arguments (an object); absent: no arguments
    /// (`{"type": "object", "properties": {}}`).
    #[serde(default)]
    pub parameters: Option<Json>,
    /// OpenAI's strict schema adherence; accepted and ignored, since the output is always
    /// constrained to the schema.
    #[serde(default)]
    pub strict: Option<bool>,
}

/// The schema of a function declared without `parameters`.
pub fn default_parameters() -> Json {
    Json::object([
        ("type", Json::string("object")),
        ("properties", Json::Object(Vec::new())),
    ])
}

impl FunctionDefinition {
    /// `parameters`, or the schema of no arguments when absent.
    pub fn parameters(&self) -> Json {
        self.parameters.clone().unwrap_or_else(default_parameters)
    }
}

impl Tool {
    /// The tool as chat templates get it in `tools` and as [`tool_prompt`] lists it:
    /// `{"type": "function", "function": {"name", "description"?, "parameters"}}`, with
    /// `parameters` filled in when absent (`strict` left out).
    pub fn to_json(&self) -> Json {
        let f = &self.function;
        let mut function = vec![("name".to_string(), Json::string(&f.name))];
        if let Some(description) = &f.description {
            function.push(("description".to_string(), Json::string(description)));
        }
        function.push(("parameters".to_string(), f.parameters()));
        Json::object([
            ("type", Json::string("function")),
            ("function", Json::Object(function)),
        ])
    }
}

/// `tool_choice`: "auto", "none", "required", or `{"type": "function", "function": {"name"}}`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// The model chooses between text and one call.
    #[default]
    Auto,
    /// No call: the tools are ignored.
    None,
    /// One call of any of the tools.
    Required,
    /// One call of this function.
    Function(String),
}

const TOOL_CHOICE_FORMS: &str = "`tool_choice` must be \"auto\", \"none\", \"required\" or \
     {\"type\": \"function\", \"function\": {\"name\": \"<function name>\"}}";

impl ToolChoice {
    /// Reads OpenAI's JSON forms of `tool_choice`.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, ToolError> {
        use serde_json::Value;
        let bad = |what: String| ToolError(format!("{TOOL_CHOICE_FORMS}; got {what}"));
        match value {
            Value::String(s) => match s.as_str() {
                "auto" => Ok(Self::Auto),
                "none" => Ok(Self::None),
                "required" => Ok(Self::Required),
                other => Err(bad(format!("\"{other}\""))),
            },
            Value::Object(object) => {
                match object.get("type") {
                    Some(Value::String(t)) if t == "function" => {}
                    Some(other) => {
                        return Err(ToolError(format!(
                            "`tool_choice.type` must be \"function\"; got {other}"
                        )))
                    }
                    None => return Err(bad("an object without `type`".into())),
                }
                match object
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                {
                    Some(name) => Ok(Self::Function(name.to_string())),
                    None => Err(ToolError(
                        "`tool_choice.function.name` must be the name of a function in `tools`"
                            .into(),
                    )),
                }
            }
            Value::Null => Ok(Self::Auto),
            other => Err(bad(Json::from(other.clone()).kind().to_string())),
        }
    }
}

impl<'de> Deserialize<'de> for ToolChoice {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        Self::from_json(&value).map_err(de::Error::custom)
    }
}

/// The tool fields of a chat completion request (flatten them into the request's struct).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ToolFields {
    #[serde(default)]
    pub tools: Option<Vec<Tool>>,
    #[serde(default)]
    pub tool_choice: Option<ToolChoice>,
    /// Replaces the instruction of the tool prompt that is added for chat templates that do not
    /// render `tools` themselves (TGI's field).
    #[serde(default)]
    pub tool_prompt: Option<String>,
    /// Accepted; at most one call is generated per answer either way.
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
}

/// A request's validated tools: what the template, the grammar and the answer need.
#[derive(Clone, Debug, PartialEq)]
pub struct Tools {
    /// Never empty.
    pub tools: Vec<Tool>,
    /// Auto, Required or Function (never None).
    pub choice: ToolChoice,
    /// `tool_prompt`.
    pub prompt: Option<String>,
}

impl ToolFields {
    /// Validates the fields; None when the request uses no tools (none given, or
    /// `tool_choice` "none": then the tools are left out of the prompt too, and the output is
    /// plain text).
    pub fn resolve(self) -> Result<Option<Tools>, ToolError> {
        let tools = self.tools.unwrap_or_default();
        let choice = validate(&tools, self.tool_choice.as_ref())?;
        if choice == ToolChoice::None {
            return Ok(None);
        }
        Ok(Some(Tools {
            tools,
            choice,
            prompt: self.tool_prompt,
        }))
    }
}

impl Tools {
    /// The grammar that constrains the output (see [`grammar`]).
    pub fn grammar(&self) -> Option<(GrammarKind, String)> {
        grammar(&self.tools, &self.choice)
    }

    /// The same as the shard's message. Its `value` keeps the schema's member order (so the
    /// call's `name` is generated before its `arguments`): check schemas with
    /// [`Self::parameter_schemas`] rather than re-serializing this one through
    /// `serde_json::Value`, which would sort them.
    pub fn pb_grammar(&self) -> Option<pb::Grammar> {
        self.grammar().map(|(kind, schema)| kind.to_pb(schema))
    }

    /// Each function's parameters schema (absent: the empty-object schema) and the field that
    /// names it in a refusal (`tools[i].function.parameters`), for the router's check of the
    /// JSON Schema subset the shard enforces.
    pub fn parameter_schemas(&self) -> Vec<(String, serde_json::Value)> {
        self.tools
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let schema = serde_json::to_value(t.function.parameters()).unwrap_or_default();
                (format!("tools[{i}].function.parameters"), schema)
            })
            .collect()
    }
}

/// A request's invalid tool fields (422 `validation`, the message naming the field).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ToolError(pub String);

impl From<ToolError> for ValidationError {
    fn from(err: ToolError) -> Self {
        ValidationError::Tools(err.0)
    }
}

impl From<ToolError> for ApiError {
    fn from(err: ToolError) -> Self {
        ValidationError::from(err).into()
    }
}

/// OpenAI's rule for function names: `^[a-zA-Z0-9_-]{1,64}$`.
pub fn valid_function_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Checks `tools` and `tool_choice`, and returns the effective choice: `tool_choice` absent
/// means "auto" when there are tools, "none" when there are none.
pub fn validate(tools: &[Tool], choice: Option<&ToolChoice>) -> Result<ToolChoice, ToolError> {
    for (i, tool) in tools.iter().enumerate() {
        match tool.kind.as_deref() {
            Some("function") => {}
            Some(other) => {
                return Err(ToolError(format!(
                    "`tools[{i}].type` must be \"function\"; got \"{other}\""
                )))
            }
            None => {
                return Err(ToolError(format!(
                    "`tools[{i}].type` is missing; it must be \"function\""
                )))
            }
        }
        let name = &tool.function.name;
        if name.is_empty() {
            return Err(ToolError(format!(
                "`tools[{i}].function.name` must not be empty"
            )));
        }
        if !valid_function_name(name) {
            return Err(ToolError(format!(
                "`tools[{i}].function.name` must be 1 to 64 letters, digits, `_` or `-` \
                 (^[a-zA-Z0-9_-]{{1,64}}$); got \"{}\"",
                name.escape_debug()
            )));
        }
        if let Some(j) = tools[..i].iter().position(|t| t.function.name == *name) {
            return Err(ToolError(format!(
                "`tools[{i}].function.name` \"{name}\" is also the name of `tools[{j}]`: \
                 function names must be unique"
            )));
        }
        if let Some(parameters) = &tool.function.parameters {
            if !parameters.is_object() {
                return Err(ToolError(format!(
                    "`tools[{i}].function.parameters` must be a JSON schema object; got {}",
                    parameters.kind()
                )));
            }
        }
    }
    match choice {
        None | Some(ToolChoice::Auto) if tools.is_empty() => Ok(ToolChoice::None),
        None => Ok(ToolChoice::Auto),
        Some(ToolChoice::Required) if tools.is_empty() => Err(ToolError(
            "`tool_choice` \"required\" needs `tools`, but none are given".into(),
        )),
        Some(ToolChoice::Function(name)) if tools.is_empty() => Err(ToolError(format!(
            "`tool_choice` names the function \"{name}\", but no `tools` are given"
        ))),
        Some(ToolChoice::Function(name)) if !tools.iter().any(|t| t.function.name == *name) => {
            Err(ToolError(format!(
                "`tool_choice` names the function \"{}\", which is not in `tools`",
                name.escape_debug()
            )))
        }
        Some(choice) => Ok(choice.clone()),
    }
}

// ---------------------------------------------------------------------------------------------
// The constraint.
// ---------------------------------------------------------------------------------------------

/// Which grammar type the shard gets (see `GrammarType` in `proto/generate.proto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrammarKind {
    /// The output is one JSON value valid against the schema.
    Json,
    /// The output is JSON valid against the schema, or text that does not start with `{`.
    JsonOrText,
}

impl GrammarKind {
    pub fn grammar_type(self) -> pb::GrammarType {
        match self {
            Self::Json => pb::GrammarType::Json,
            Self::JsonOrText => pb::GrammarType::JsonOrText,
        }
    }

    /// The shard's `Grammar` of this kind for `schema`.
    pub fn to_pb(self, schema: String) -> pb::Grammar {
        pb::Grammar {
            r#type: self.grammar_type() as i32,
            value: schema,
        }
    }
}

/// The grammar for `choice`: none → None; auto → JSON or text, the schema of a call of any
/// tool; required → JSON, a call of any tool; a named function → JSON, a call of that one.
/// (`choice` as returned by [`validate`]; a name not in `tools` gives None.)
pub fn grammar(tools: &[Tool], choice: &ToolChoice) -> Option<(GrammarKind, String)> {
    if tools.is_empty() {
        return None;
    }
    match choice {
        ToolChoice::None => None,
        ToolChoice::Auto => Some((GrammarKind::JsonOrText, call_schema(tools))),
        ToolChoice::Required => Some((GrammarKind::Json, call_schema(tools))),
        ToolChoice::Function(name) => {
            let tool = tools.iter().find(|t| t.function.name == *name)?;
            Some((GrammarKind::Json, call_schema(std::slice::from_ref(tool))))
        }
    }
}

/// The JSON schema (as compact JSON text, members in this order) of one call of one of
/// `tools`: for one function
/// `{"type": "object", "properties": {"name": {"const": "<name>"}, "arguments": <parameters>},
/// "required": ["name", "arguments"], "additionalProperties": false}`, for several `{"anyOf":
/// [...]}` of those.
///
/// A function's `$defs` (and `definitions`) move to the root's `$defs`, named
/// `<function>.defs.<name>` (`<function>.definitions.<name>`), and its local `$ref`s are
/// rewritten to match: `#/$defs/X` to the moved definition, any other `#...` pointer to the
/// place the parameters now have inside the call's schema.
pub fn call_schema(tools: &[Tool]) -> String {
    let mut defs = Vec::new();
    let schema = if let [tool] = tools {
        call_object(&tool.function, "/properties/arguments", &mut defs)
    } else {
        let calls = tools
            .iter()
            .enumerate()
            .map(|(i, t)| {
                call_object(
                    &t.function,
                    &format!("/anyOf/{i}/properties/arguments"),
                    &mut defs,
                )
            })
            .collect();
        Json::object([("anyOf", Json::Array(calls))])
    };
    let schema = match schema {
        Json::Object(mut members) if !defs.is_empty() => {
            members.push(("$defs".to_string(), Json::Object(defs)));
            Json::Object(members)
        }
        schema => schema,
    };
    schema.to_compact()
}

/// The schema of a call of `f`, its parameters placed at `embed_at` (a JSON pointer from the
/// root); its definitions are added to `defs`.
fn call_object(f: &FunctionDefinition, embed_at: &str, defs: &mut Vec<(String, Json)>) -> Json {
    let mut parameters = f.parameters();
    if let Json::Object(members) = &mut parameters {
        let mut kept = Vec::with_capacity(members.len());
        for (key, value) in members.drain(..) {
            let segment = match key.as_str() {
                "$defs" => "defs",
                "definitions" => "definitions",
                _ => {
                    kept.push((key, value));
                    continue;
                }
            };
            match value {
                Json::Object(named) => {
                    for (name, mut schema) in named {
                        rewrite_refs(&mut schema, &f.name, embed_at);
                        defs.push((format!("{}.{segment}.{name}", f.name), schema));
                    }
                }
                other => kept.push((key, other)),
            }
        }
        *members = kept;
    }
    rewrite_refs(&mut parameters, &f.name, embed_at);
    Json::object([
        ("type", Json::string("object")),
        (
            "properties",
            Json::object([
                ("name", Json::object([("const", Json::string(&f.name))])),
                ("arguments", parameters),
            ]),
        ),
        (
            "required",
            Json::Array(vec![Json::string("name"), Json::string("arguments")]),
        ),
        ("additionalProperties", Json::Bool(false)),
    ])
}

/// Rewrites the local `$ref`s of a schema moved into a call's schema (see [`call_schema`]).
fn rewrite_refs(schema: &mut Json, function: &str, embed_at: &str) {
    match schema {
        Json::Object(members) => {
            for (key, value) in members {
                match (key.as_str(), &mut *value) {
                    ("$ref", Json::String(reference)) => {
                        *reference = rewrite_ref(reference, function, embed_at);
                    }
                    // Maps of names to schemas: the names are not keywords.
                    (
                        "properties" | "patternProperties" | "$defs" | "definitions"
                        | "dependentSchemas",
                        Json::Object(named),
                    ) => {
                        for (_, sub) in named {
                            rewrite_refs(sub, function, embed_at);
                        }
                    }
                    // Values, not schemas.
                    ("const" | "enum" | "default" | "examples", _) => {}
                    (_, sub) => rewrite_refs(sub, function, embed_at),
                }
            }
        }
        Json::Array(items) => {
            for item in items {
                rewrite_refs(item, function, embed_at);
            }
        }
        _ => {}
    }
}

fn rewrite_ref(reference: &str, function: &str, embed_at: &str) -> String {
    let Some(pointer) = reference.strip_prefix('#') else {
        return reference.to_string();
    };
    if let Some(rest) = pointer.strip_prefix("/$defs/") {
        return format!("#/$defs/{function}.defs.{rest}");
    }
    if let Some(rest) = pointer.strip_prefix("/definitions/") {
        return format!("#/$defs/{function}.definitions.{rest}");
    }
    format!("#{embed_at}{pointer}")
}

// ---------------------------------------------------------------------------------------------
// The answer.
// ---------------------------------------------------------------------------------------------

/// A generated call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as JSON text (compact), as OpenAI sends `arguments`.
    pub arguments: String,
}

/// A new call id, as OpenAI's: `call_` and 24 hex digits.
pub fn new_call_id() -> String {
    format!("call_{:024x}", rand::random::<u128>() >> 32)
}

impl ToolCall {
    /// The entry of a message's `tool_calls`.
    pub fn to_openai(&self, id: &str) -> serde_json::Value {
        json!({
            "id": id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        })
    }
}

/// The tag Hermes-style models (Qwen2.5, Qwen3, Hermes, ...) open a call with, as their
/// templates teach them: `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`. With
/// `tool_choice` "auto" the grammar lets such a model write it (it is text, not `{`), and the
/// call after it is unconstrained; accepting it keeps those calls from ending up as text.
pub const CALL_TAG: &str = "<tool_call>";

/// The call in `text`: a JSON object, after optional whitespace (and an optional [`CALL_TAG`]
/// and whitespace), with a string `name` (not
/// empty) and optional `arguments` (or `parameters`, as some models write it). Arguments given
/// as a string are taken as they are (their JSON text); absent, they are `{}`; anything else is
/// re-serialized compactly, keeping its member order. Other members and text after the object
/// are ignored. None when `text` is not such a call (the model answered with text).
pub fn parse_call(text: &str) -> Option<ToolCall> {
    let text = text.trim_start();
    let text = text.strip_prefix(CALL_TAG).map_or(text, str::trim_start);
    if !text.starts_with('{') {
        return None;
    }
    let value = serde_json::Deserializer::from_str(text)
        .into_iter::<Json>()
        .next()?
        .ok()?;
    let Json::Object(members) = value else {
        return None;
    };
    let name = members
        .iter()
        .find(|(k, _)| k == "name")
        .and_then(|(_, v)| v.as_str())
        .filter(|name| !name.is_empty())?
        .to_string();
    let arguments = match members
        .iter()
        .find(|(k, _)| k == "arguments" || k == "parameters")
    {
        None => "{}".to_string(),
        Some((_, Json::String(s))) => s.clone(),
        Some((_, value)) => value.to_compact(),
    };
    Some(ToolCall { name, arguments })
}

/// The `message` of a non-streamed chat answer for the generated `text`, and whether it is a
/// call: `{"role": "assistant", "content": null, "tool_calls": [{"id": "call_…", "type":
/// "function", "function": {"name", "arguments"}}]}` when it is (the answer's `finish_reason`
/// is then "tool_calls"), `{"role": "assistant", "content": text}` when not.
pub fn assistant_message(text: &str) -> (serde_json::Value, bool) {
    match parse_call(text) {
        Some(call) => (
            json!({
                "role": "assistant",
                "content": null,
                "tool_calls": [call.to_openai(&new_call_id())],
            }),
            true,
        ),
        None => (json!({"role": "assistant", "content": text}), false),
    }
}

// ---------------------------------------------------------------------------------------------
// Streaming.
// ---------------------------------------------------------------------------------------------

/// One piece of a streamed chat answer: the `delta` of a chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolDelta {
    /// Text (`{"content": ...}`).
    Content(String),
    /// The call starts: its id and function.
    CallStart { id: String, name: String },
    /// More of the call's arguments text.
    Arguments(String),
}

impl ToolDelta {
    /// The chunk's `delta` object.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Self::Content(text) => json!({"content": text}),
            Self::CallStart { id, name } => json!({"tool_calls": [{
                "index": 0, "id": id, "type": "function",
                "function": {"name": name, "arguments": ""},
            }]}),
            Self::Arguments(piece) => {
                json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            }
        }
    }
}

/// The streamed form of [`parse_call`]: fed the generated text piece by piece (token texts, cut
/// anywhere), it tells what to send.
///
/// Whitespace at the start is held back. If the first other character is not `{` (nor the start
/// of a [`CALL_TAG`] before the `{`), the output is text: everything passes through as content
/// as it comes. If it is `{`, nothing is sent until the call's `name` is complete; then a
/// [`ToolDelta::CallStart`], then the text of the `arguments` value as it is generated, exactly
/// as the model writes it (the pieces concatenate to that value's JSON text: not the wrapper's
/// separators or its closing `}`). Arguments that come before the name are sent right after the
/// start; arguments written as a JSON string are sent once complete, as the string's contents. If the object turns out not to be a call
/// before its name is complete (another shape, or the stream ends), everything held is sent as
/// content and the rest passes through. After the end of the call's object, the rest is ignored.
pub struct ToolCallStream {
    id: String,
    state: State,
    /// The raw text not yet sent, while undecided (until text is certain or the call starts).
    held: String,
    name: Option<String>,
    started: bool,
    args: ArgsState,
    pending_content: String,
    pending_args: String,
    start_pending: bool,
    complete: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ArgsState {
    NotSeen,
    Reading,
    Done,
}

enum State {
    /// Only whitespace so far.
    Lead,
    /// This many characters of [`CALL_TAG`] so far.
    Tag(usize),
    /// After [`CALL_TAG`], before the call's `{`.
    AfterTag,
    /// The output is text.
    Text,
    /// In the call's object, before a key (after `{` or `,`).
    BeforeKey,
    /// Reading a key.
    Key(ValueScan),
    /// After a key, before `:`.
    Colon(String),
    /// After `:`, before the value.
    BeforeValue(String),
    /// Reading a value.
    Value(Role, ValueScan),
    /// After a value, before `,` or `}`.
    AfterValue,
    /// The object is closed (or broken after the call started): the rest is ignored.
    End,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Name,
    Arguments,
    Skip,
}

/// Finds the end of one JSON value, one character at a time.
struct ValueScan {
    raw: String,
    shape: Shape,
    depth: usize,
    in_string: bool,
    escape: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// An object or a list.
    Nested,
    /// A string.
    Str,
    /// A number, `true`, `false` or `null`.
    Scalar,
}

enum Scan {
    More,
    /// The character ended the value.
    Done,
    /// The value ended before the character (which ends a number or literal).
    DoneBefore,
}

impl ValueScan {
    fn start(c: char) -> Self {
        let (shape, depth, in_string) = match c {
            '{' | '[' => (Shape::Nested, 1, false),
            '"' => (Shape::Str, 0, true),
            _ => (Shape::Scalar, 0, false),
        };
        Self {
            raw: c.to_string(),
            shape,
            depth,
            in_string,
            escape: false,
        }
    }

    fn feed(&mut self, c: char) -> Scan {
        if self.shape == Shape::Scalar {
            if c.is_whitespace() || matches!(c, ',' | '}' | ']') {
                return Scan::DoneBefore;
            }
            self.raw.push(c);
            return Scan::More;
        }
        self.raw.push(c);
        if self.in_string {
            if self.escape {
                self.escape = false;
            } else if c == '\\' {
                self.escape = true;
            } else if c == '"' {
                self.in_string = false;
                if self.shape == Shape::Str {
                    return Scan::Done;
                }
            }
            return Scan::More;
        }
        match c {
            '"' => self.in_string = true,
            '{' | '[' => self.depth += 1,
            '}' | ']' => {
                self.depth -= 1;
                if self.depth == 0 {
                    return Scan::Done;
                }
            }
            _ => {}
        }
        Scan::More
    }

    /// The value of a complete string.
    fn string(&self) -> Option<String> {
        serde_json::from_str(&self.raw).ok()
    }
}

impl Default for ToolCallStream {
    fn default() -> Self {
        Self::new()
    }
}

impl ToolCallStream {
    /// A stream whose call (if any) gets a new id.
    pub fn new() -> Self {
        Self::with_id(new_call_id())
    }

    /// A stream whose call (if any) gets `id`.
    pub fn with_id(id: String) -> Self {
        Self {
            id,
            state: State::Lead,
            held: String::new(),
            name: None,
            started: false,
            args: ArgsState::NotSeen,
            pending_content: String::new(),
            pending_args: String::new(),
            start_pending: false,
            complete: false,
        }
    }

    /// Feeds the next piece of generated text; returns what to send (in order; often nothing).
    pub fn push(&mut self, text: &str) -> Vec<ToolDelta> {
        for (i, c) in text.char_indices() {
            if matches!(self.state, State::Text) {
                self.pending_content.push_str(&text[i..]);
                break;
            }
            if matches!(self.state, State::End) {
                break;
            }
            if !self.started {
                self.held.push(c);
            }
            self.step(c);
        }
        self.deltas()
    }

    /// Ends the stream; returns what is left to send. See [`Self::is_call`] for what the output
    /// was.
    pub fn finish(&mut self) -> Vec<ToolDelta> {
        if self.started {
            if self.complete && self.args == ArgsState::NotSeen {
                self.pending_args.push_str("{}");
            }
        } else if !matches!(self.state, State::Text) {
            // Whitespace only, or an object that never became a call: it was text.
            self.pending_content.push_str(&self.held);
            self.held.clear();
            self.state = State::Text;
        }
        self.deltas()
    }

    /// Whether the output is a call (from the moment it started).
    pub fn is_call(&self) -> bool {
        self.started
    }

    /// Whether the call's object is complete.
    pub fn is_complete_call(&self) -> bool {
        self.started && self.complete
    }

    /// The call's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The call's function, once known.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The chunk's `finish_reason` given the generation's (`"stop"` or `"length"`):
    /// "tool_calls" for a complete call, the generation's otherwise (text, or a call cut short).
    pub fn finish_reason(&self, generation: &'static str) -> &'static str {
        if self.is_complete_call() {
            "tool_calls"
        } else {
            generation
        }
    }

    fn deltas(&mut self) -> Vec<ToolDelta> {
        let mut out = Vec::new();
        if !self.pending_content.is_empty() {
            out.push(ToolDelta::Content(std::mem::take(
                &mut self.pending_content,
            )));
        }
        if self.start_pending {
            self.start_pending = false;
            out.push(ToolDelta::CallStart {
                id: self.id.clone(),
                name: self.name.clone().unwrap_or_default(),
            });
        }
        if self.started && !self.pending_args.is_empty() {
            out.push(ToolDelta::Arguments(std::mem::take(&mut self.pending_args)));
        }
        out
    }

    /// Not a call after all: text if the call has not started, else the rest is ignored.
    fn broken(&mut self) {
        if self.started {
            self.state = State::End;
        } else {
            self.pending_content.push_str(&self.held);
            self.held.clear();
            self.state = State::Text;
        }
    }

    fn step(&mut self, c: char) {
        let state = std::mem::replace(&mut self.state, State::End);
        self.state = match state {
            State::Lead if c.is_whitespace() => State::Lead,
            State::Lead if c == '{' => State::BeforeKey,
            State::Lead if c == '<' => State::Tag(1),
            State::Lead => return self.broken(),
            State::Tag(n) if CALL_TAG[n..].starts_with(c) => {
                if n + 1 == CALL_TAG.len() {
                    State::AfterTag
                } else {
                    State::Tag(n + 1)
                }
            }
            State::Tag(_) => return self.broken(),
            State::AfterTag if c.is_whitespace() => State::AfterTag,
            State::AfterTag if c == '{' => State::BeforeKey,
            State::AfterTag => return self.broken(),
            State::Text => {
                self.pending_content.push(c);
                State::Text
            }
            State::BeforeKey => match c {
                _ if c.is_whitespace() => State::BeforeKey,
                '"' => State::Key(ValueScan::start(c)),
                _ => return self.broken(),
            },
            State::Key(mut scan) => match scan.feed(c) {
                Scan::Done => match scan.string() {
                    Some(key) => State::Colon(key),
                    None => return self.broken(),
                },
                _ => State::Key(scan),
            },
            State::Colon(key) => match c {
                _ if c.is_whitespace() => State::Colon(key),
                ':' => State::BeforeValue(key),
                _ => return self.broken(),
            },
            State::BeforeValue(key) => {
                if c.is_whitespace() {
                    State::BeforeValue(key)
                } else if matches!(c, ',' | '}' | ']' | ':') {
                    return self.broken();
                } else {
                    let scan = ValueScan::start(c);
                    let role = match key.as_str() {
                        "name" if self.name.is_none() => Role::Name,
                        "arguments" | "parameters" if self.args == ArgsState::NotSeen => {
                            Role::Arguments
                        }
                        _ => Role::Skip,
                    };
                    if role == Role::Name && scan.shape != Shape::Str {
                        return self.broken();
                    }
                    if role == Role::Arguments {
                        self.args = ArgsState::Reading;
                        if scan.shape == Shape::Nested {
                            self.pending_args.push(c);
                        }
                    }
                    State::Value(role, scan)
                }
            }
            State::Value(role, mut scan) => match scan.feed(c) {
                Scan::More => {
                    if role == Role::Arguments && scan.shape == Shape::Nested {
                        self.pending_args.push(c);
                    }
                    State::Value(role, scan)
                }
                Scan::Done => {
                    if role == Role::Arguments && scan.shape == Shape::Nested {
                        self.pending_args.push(c);
                    }
                    if !self.value_done(role, &scan) {
                        return self.broken();
                    }
                    State::AfterValue
                }
                Scan::DoneBefore => {
                    if !self.value_done(role, &scan) {
                        return self.broken();
                    }
                    self.state = State::AfterValue;
                    return self.step(c);
                }
            },
            State::AfterValue => match c {
                _ if c.is_whitespace() => State::AfterValue,
                ',' => State::BeforeKey,
                '}' if self.name.is_some() => {
                    self.complete = true;
                    State::End
                }
                _ => return self.broken(),
            },
            State::End => State::End,
        };
    }

    /// A value is complete; false when it breaks the call.
    fn value_done(&mut self, role: Role, scan: &ValueScan) -> bool {
        match role {
            Role::Name => match scan.string().filter(|name| !name.is_empty()) {
                Some(name) => {
                    self.name = Some(name);
                    self.started = true;
                    self.start_pending = true;
                    self.held.clear();
                    true
                }
                None => false,
            },
            Role::Arguments => {
                match scan.shape {
                    Shape::Nested => {}
                    Shape::Str => match scan.string() {
                        Some(text) => self.pending_args.push_str(&text),
                        None => return false,
                    },
                    Shape::Scalar => self.pending_args.push_str(&scan.raw),
                }
                self.args = ArgsState::Done;
                true
            }
            Role::Skip => true,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The prompt.
// ---------------------------------------------------------------------------------------------

/// The instruction of [`tool_prompt`] unless the request's `tool_prompt` replaces it.
pub const DEFAULT_TOOL_INSTRUCTION: &str = "To call one of these functions, answer with only a \
     JSON object of the form {\"name\": <the function's name>, \"arguments\": <an object of its \
     arguments>}. Otherwise, answer in plain text.";

/// The text that tells a model whose chat template does not render `tools` about them: the
/// tools' JSON definitions, one a line, then `instruction` (or [`DEFAULT_TOOL_INSTRUCTION`]).
pub fn tool_prompt(tools: &[Tool], instruction: Option<&str>) -> String {
    let mut text = String::from("You can call these functions:\n");
    for tool in tools {
        text.push_str(&tool.to_json().to_spaced());
        text.push('\n');
    }
    text.push('\n');
    text.push_str(instruction.unwrap_or(DEFAULT_TOOL_INSTRUCTION));
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// Tools from JSON text (not through `serde_json::Value`, which would sort the members).
    fn tools(json: &str) -> Vec<Tool> {
        serde_json::from_str(json).unwrap()
    }

    fn weather() -> Vec<Tool> {
        tools(
            r#"[{"type": "function", "function": {
                "name": "get_weather",
                "description": "Current weather",
                "parameters": {"type": "object", "properties": {
                    "location": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                    "required": ["location"]}}}]"#,
        )
    }

    fn two_tools() -> Vec<Tool> {
        let mut t = weather();
        t.extend(tools(
            r#"[{"type": "function", "function": {"name": "now"}}]"#,
        ));
        t
    }

    fn fields(json: Value) -> Result<ToolFields, serde_json::Error> {
        serde_json::from_value(json)
    }

    fn error(json: Value) -> String {
        fields(json).unwrap().resolve().unwrap_err().0
    }

    // -- Json ------------------------------------------------------------------------------

    #[test]
    fn json_keeps_member_order() {
        let text = r#"{"z": 1, "a": [true, null, -2.5, "s"], "m": {"y": {}, "b": []}}"#;
        let value = Json::parse(text).unwrap();
        assert_eq!(value.to_spaced(), text);
        assert_eq!(
            value.to_compact(),
            r#"{"z":1,"a":[true,null,-2.5,"s"],"m":{"y":{},"b":[]}}"#
        );
        assert_eq!(value.get("a").unwrap().kind(), "a list");
        assert!(value.get("nope").is_none());
        // A repeated key keeps its first place and its last value.
        let value = Json::parse(r#"{"a": 1, "b": 2, "a": 3}"#).unwrap();
        assert_eq!(value.to_compact(), r#"{"a":3,"b":2}"#);
        // Large and negative integers survive.
        let value = Json::parse("[18446744073709551615, -9223372036854775808]").unwrap();
        assert_eq!(
            value.to_compact(),
            "[18446744073709551615,-9223372036854775808]"
        );
        assert_eq!(
            Json::from(json!({"b": 1, "a": "x"})).to_compact(),
            r#"{"b":1,"a":"x"}"#
        );
    }

    #[test]
    fn json_deserializes_inside_flattened_structs() {
        // Flattening buffers the fields; the order of the nested object must survive that too.
        #[derive(Deserialize)]
        struct Outer {
            #[serde(flatten)]
            tools: ToolFields,
            #[allow(dead_code)]
            model: String,
        }
        let outer: Outer = serde_json::from_str(
            r#"{"model": "m", "tools": [{"type": "function", "function": {"name": "f",
                "parameters": {"type": "object", "properties": {"z": {}, "a": {}}}}}],
                "tool_choice": "required"}"#,
        )
        .unwrap();
        let t = outer.tools.resolve().unwrap().unwrap();
        assert_eq!(t.choice, ToolChoice::Required);
        assert_eq!(
            t.tools[0]
                .function
                .parameters
                .as_ref()
                .unwrap()
                .to_compact(),
            r#"{"type":"object","properties":{"z":{},"a":{}}}"#
        );
    }

    // -- Validation ------------------------------------------------------------------------

    #[test]
    fn tool_choice_forms() {
        let choice = |v: Value| serde_json::from_value::<ToolChoice>(v);
        assert_eq!(choice(json!("auto")).unwrap(), ToolChoice::Auto);
        assert_eq!(choice(json!("none")).unwrap(), ToolChoice::None);
        assert_eq!(choice(json!("required")).unwrap(), ToolChoice::Required);
        assert_eq!(
            choice(json!({"type": "function", "function": {"name": "f"}})).unwrap(),
            ToolChoice::Function("f".into())
        );
        for (bad, needle) in [
            (json!("any"), "got \"any\""),
            (json!(3), "got a number"),
            (json!({"function": {"name": "f"}}), "without `type`"),
            (
                json!({"type": "tool", "function": {"name": "f"}}),
                "`tool_choice.type` must be \"function\"",
            ),
            (json!({"type": "function"}), "`tool_choice.function.name`"),
        ] {
            let err = choice(bad.clone()).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
        // In a request: the deserialization error names the forms.
        let err = fields(json!({"tool_choice": "sometimes"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"required\""), "{err}");
    }

    #[test]
    fn resolve_defaults() {
        // No tools: nothing to do, whatever the (lenient) choice.
        assert_eq!(fields(json!({})).unwrap().resolve().unwrap(), None);
        assert_eq!(
            fields(json!({"tools": [], "tool_choice": "auto"}))
                .unwrap()
                .resolve()
                .unwrap(),
            None
        );
        assert_eq!(
            fields(json!({"tools": null, "tool_choice": "none"}))
                .unwrap()
                .resolve()
                .unwrap(),
            None
        );
        // Tools without a choice: auto.
        let t = fields(
            json!({"tools": [{"type": "function", "function": {"name": "f"}}],
                             "tool_prompt": "Use them.", "parallel_tool_calls": false}),
        )
        .unwrap()
        .resolve()
        .unwrap()
        .unwrap();
        assert_eq!(t.choice, ToolChoice::Auto);
        assert_eq!(t.prompt.as_deref(), Some("Use them."));
        // "none": the tools are ignored (but still validated).
        let none = json!({"tools": [{"type": "function", "function": {"name": "f"}}],
                          "tool_choice": "none"});
        assert_eq!(fields(none).unwrap().resolve().unwrap(), None);
        assert!(error(
            json!({"tools": [{"type": "function", "function": {"name": ""}}],
                              "tool_choice": "none"})
        )
        .contains("must not be empty"));
    }

    #[test]
    fn validation_messages_name_the_field() {
        let f = |name: &str| json!({"type": "function", "function": {"name": name}});
        let cases = [
            (
                json!({"tools": [f("a"), {"type": "retrieval", "function": {"name": "b"}}]}),
                "`tools[1].type` must be \"function\"; got \"retrieval\"",
            ),
            (
                json!({"tools": [{"function": {"name": "b"}}]}),
                "`tools[0].type` is missing",
            ),
            (
                json!({"tools": [f("")]}),
                "`tools[0].function.name` must not be empty",
            ),
            (
                json!({"tools": [f("get weather")]}),
                "`tools[0].function.name` must be 1 to 64 letters",
            ),
            (
                json!({"tools": [f(&"x".repeat(65))]}),
                "`tools[0].function.name` must be 1 to 64",
            ),
            (
                json!({"tools": [f("a"), f("b"), f("a")]}),
                "`tools[2].function.name` \"a\" is also the name of `tools[0]`",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a", "parameters": []}}]}),
                "`tools[0].function.parameters` must be a JSON schema object; got a list",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a", "parameters": "{}"}}]}),
                "got a string",
            ),
            (
                json!({"tool_choice": "required"}),
                "`tool_choice` \"required\" needs `tools`",
            ),
            (
                json!({"tools": [], "tool_choice": {"type": "function", "function": {"name": "a"}}}),
                "no `tools` are given",
            ),
            (
                json!({"tools": [f("a")], "tool_choice": {"type": "function", "function": {"name": "b"}}}),
                "`tool_choice` names the function \"b\", which is not in `tools`",
            ),
        ];
        for (request, needle) in cases {
            let message = error(request.clone());
            assert!(message.contains(needle), "{request}: {message}");
        }
        // Good names.
        for name in ["a", "get_weather", "A-1_b", &"x".repeat(64)] {
            assert!(valid_function_name(name), "{name}");
        }
        for name in ["", "a b", "a.b", "é", "a/b", &"x".repeat(65)] {
            assert!(!valid_function_name(name), "{name}");
        }
    }

    #[test]
    fn tool_errors_are_422_validation() {
        let api = ApiError::from(ToolError("`tools[0].type` is missing".into()));
        assert_eq!(api.status.as_u16(), 422);
        assert_eq!(api.body.error_type, "validation");
        assert!(api.body.error.contains("`tools[0].type` is missing"));
    }

    // -- Schema and grammar ----------------------------------------------------------------

    #[test]
    fn schema_of_one_function() {
        let schema = call_schema(&weather());
        assert_eq!(
            schema,
            r#"{"type":"object","properties":{"name":{"const":"get_weather"},"arguments":{"type":"object","properties":{"location":{"type":"string"},"unit":{"enum":["c","f"]}},"required":["location"]}},"required":["name","arguments"],"additionalProperties":false}"#
        );
        // A function without parameters takes an empty object.
        let schema: Value = serde_json::from_str(&call_schema(&two_tools()[1..])).unwrap();
        assert_eq!(
            schema["properties"]["arguments"],
            json!({"type": "object", "properties": {}})
        );
    }

    #[test]
    fn schema_of_several_functions() {
        let schema: Value = serde_json::from_str(&call_schema(&two_tools())).unwrap();
        let calls = schema["anyOf"].as_array().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(
            calls[0]["properties"]["name"],
            json!({"const": "get_weather"})
        );
        assert_eq!(calls[1]["properties"]["name"], json!({"const": "now"}));
        for call in calls {
            assert_eq!(call["required"], json!(["name", "arguments"]));
            assert_eq!(call["additionalProperties"], json!(false));
        }
        assert!(schema.get("$defs").is_none());
    }

    #[test]
    fn schema_definitions_move_to_the_root() {
        let t = tools(
            r##"[{"type": "function", "function": {"name": "plan", "parameters": {
                "type": "object",
                "properties": {
                    "stops": {"type": "array", "items": {"$ref": "#/$defs/Stop"}},
                    "mode": {"$ref": "#/definitions/Mode"},
                    "$ref": {"type": "string"},
                    "again": {"$ref": "#"},
                    "first": {"$ref": "#/properties/stops/items"},
                    "remote": {"$ref": "https://example.com/s.json"},
                    "const": {"const": {"$ref": "#/not/a/ref"}}
                },
                "$defs": {"Stop": {"type": "object", "properties": {
                    "next": {"anyOf": [{"$ref": "#/$defs/Stop"}, {"type": "null"}]}}}},
                "definitions": {"Mode": {"enum": ["car", "bike"]}}
            }}},
            {"type": "function", "function": {"name": "other", "parameters": {
                "type": "object", "properties": {"x": {"$ref": "#/$defs/Stop"}},
                "$defs": {"Stop": {"type": "integer"}}}}}]"##,
        );
        let schema: Value = serde_json::from_str(&call_schema(&t)).unwrap();
        let plan = &schema["anyOf"][0]["properties"]["arguments"];
        assert!(plan.get("$defs").is_none() && plan.get("definitions").is_none());
        let p = &plan["properties"];
        assert_eq!(p["stops"]["items"]["$ref"], "#/$defs/plan.defs.Stop");
        assert_eq!(p["mode"]["$ref"], "#/$defs/plan.definitions.Mode");
        assert_eq!(p["$ref"], json!({"type": "string"}));
        assert_eq!(p["again"]["$ref"], "#/anyOf/0/properties/arguments");
        assert_eq!(
            p["first"]["$ref"],
            "#/anyOf/0/properties/arguments/properties/stops/items"
        );
        assert_eq!(p["remote"]["$ref"], "https://example.com/s.json");
        assert_eq!(p["const"]["const"], json!({"$ref": "#/not/a/ref"}));
        let defs = &schema["$defs"];
        assert_eq!(
            defs["plan.defs.Stop"]["properties"]["next"]["anyOf"][0]["$ref"],
            "#/$defs/plan.defs.Stop"
        );
        assert_eq!(
            defs["plan.definitions.Mode"],
            json!({"enum": ["car", "bike"]})
        );
        assert_eq!(defs["other.defs.Stop"], json!({"type": "integer"}));
        assert_eq!(
            schema["anyOf"][1]["properties"]["arguments"]["properties"]["x"]["$ref"],
            "#/$defs/other.defs.Stop"
        );
        // One function: pointers are from the call's object.
        let schema: Value = serde_json::from_str(&call_schema(&t[..1])).unwrap();
        assert_eq!(
            schema["properties"]["arguments"]["properties"]["again"]["$ref"],
            "#/properties/arguments"
        );
        assert!(schema["$defs"]["plan.defs.Stop"].is_object());
    }

    #[test]
    fn grammar_per_choice() {
        let t = two_tools();
        assert_eq!(grammar(&t, &ToolChoice::None), None);
        assert_eq!(grammar(&[], &ToolChoice::Auto), None);
        assert_eq!(
            grammar(&t, &ToolChoice::Auto),
            Some((GrammarKind::JsonOrText, call_schema(&t)))
        );
        assert_eq!(
            grammar(&t, &ToolChoice::Required),
            Some((GrammarKind::Json, call_schema(&t)))
        );
        assert_eq!(
            grammar(&t, &ToolChoice::Function("now".into())),
            Some((GrammarKind::Json, call_schema(&t[1..])))
        );
        assert_eq!(grammar(&t, &ToolChoice::Function("later".into())), None);
        let g = GrammarKind::JsonOrText.to_pb("{}".into());
        assert_eq!(g.r#type, pb::GrammarType::JsonOrText as i32);
        assert_eq!(g.value, "{}");
        assert_eq!(GrammarKind::Json.grammar_type(), pb::GrammarType::Json);
        let resolved = fields(json!({"tools": [{"type": "function", "function": {"name": "f"}}],
                                     "tool_choice": {"type": "function", "function": {"name": "f"}}}))
        .unwrap()
        .resolve()
        .unwrap()
        .unwrap();
        let g = resolved.pb_grammar().unwrap();
        assert_eq!(g.r#type, pb::GrammarType::Json as i32);
        assert!(g
            .value
            .starts_with(r#"{"type":"object","properties":{"name":{"const":"f"},"#));
        assert_eq!(
            resolved.parameter_schemas(),
            vec![(
                "tools[0].function.parameters".to_string(),
                json!({"type": "object", "properties": {}})
            )]
        );
    }

    // -- Parsing ---------------------------------------------------------------------------

    fn call(name: &str, arguments: &str) -> Option<ToolCall> {
        Some(ToolCall {
            name: name.into(),
            arguments: arguments.into(),
        })
    }

    #[test]
    fn parses_calls() {
        let cases = [
            (
                r#"{"name": "get_weather", "arguments": {"location": "Paris", "unit": "c"}}"#,
                call("get_weather", r#"{"location":"Paris","unit":"c"}"#),
            ),
            // Member order kept, whitespace anywhere, arguments first.
            (
                " \n{ \"arguments\" :{\"z\":1 , \"a\" : [1,2]} ,\"name\":\"f\" }\n",
                call("f", r#"{"z":1,"a":[1,2]}"#),
            ),
            (r#"{"name": "now"}"#, call("now", "{}")),
            (r#"{"name": "now", "arguments": {}}"#, call("now", "{}")),
            // Arguments as OpenAI's string, and Llama's `parameters`.
            (
                r#"{"name": "f", "arguments": "{\"a\": 1}"}"#,
                call("f", r#"{"a": 1}"#),
            ),
            (
                r#"{"name": "f", "parameters": {"a": 1}}"#,
                call("f", r#"{"a":1}"#),
            ),
            // Escapes and non-ASCII text.
            (
                r#"{"name": "say", "arguments": {"text": "«\"hi\"»\n\u00e9"}}"#,
                call("say", r#"{"text":"«\"hi\"»\né"}"#),
            ),
            (
                "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>",
                call("f", r#"{"a":1}"#),
            ),
            ("<tool_call>hello", None),
            ("<tool_call>", None),
            // Text after the object is ignored.
            (
                r#"{"name": "f", "arguments": {}}</s> trailing"#,
                call("f", "{}"),
            ),
            // Not calls.
            ("The weather is fine.", None),
            ("", None),
            ("   ", None),
            (r#"Answer: {"name": "f"}"#, None),
            (r#"{"arguments": {}}"#, None),
            (r#"{"name": "", "arguments": {}}"#, None),
            (r#"{"name": 3, "arguments": {}}"#, None),
            (r#"{"name": "f", "arguments": {"a": "#, None),
            (r#"["name", "f"]"#, None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_call(text), expected, "{text}");
        }
    }

    #[test]
    fn non_streamed_messages() {
        let (message, is_call) =
            assistant_message(r#"{"name": "get_weather", "arguments": {"location": "Paris"}}"#);
        assert!(is_call);
        assert_eq!(message["role"], "assistant");
        assert_eq!(message["content"], Value::Null);
        let calls = message["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1);
        let id = calls[0]["id"].as_str().unwrap();
        assert!(id.starts_with("call_") && id.len() == 29, "{id}");
        assert!(id[5..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(calls[0]["type"], "function");
        assert_eq!(
            calls[0]["function"],
            json!({"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"})
        );
        let (message, is_call) = assistant_message("Sunny.");
        assert!(!is_call);
        assert_eq!(message, json!({"role": "assistant", "content": "Sunny."}));
        assert_ne!(new_call_id(), new_call_id());
    }

    // -- Streaming -------------------------------------------------------------------------

    /// What a stream sent: its content, its call (name and the concatenated arguments), and
    /// whether the call start came before any argument piece.
    #[derive(Debug, Default, PartialEq)]
    struct Sent {
        content: String,
        name: Option<String>,
        arguments: String,
        starts: usize,
        complete: bool,
    }

    fn collect(stream: &mut ToolCallStream, deltas: Vec<ToolDelta>, sent: &mut Sent) {
        for delta in deltas {
            match delta {
                ToolDelta::Content(text) => {
                    assert!(!text.is_empty());
                    assert_eq!(sent.starts, 0, "content after a call started");
                    sent.content.push_str(&text);
                }
                ToolDelta::CallStart { id, name } => {
                    assert_eq!(id, stream.id());
                    assert!(sent.content.is_empty(), "a call after content");
                    sent.starts += 1;
                    sent.name = Some(name);
                }
                ToolDelta::Arguments(piece) => {
                    assert!(!piece.is_empty());
                    assert_eq!(sent.starts, 1, "arguments before the call started");
                    sent.arguments.push_str(&piece);
                }
            }
        }
    }

    fn stream(pieces: &[&str]) -> Sent {
        let mut s = ToolCallStream::new();
        let mut sent = Sent::default();
        for piece in pieces {
            let deltas = s.push(piece);
            collect(&mut s, deltas, &mut sent);
        }
        let deltas = s.finish();
        collect(&mut s, deltas, &mut sent);
        assert_eq!(s.is_call(), sent.starts == 1);
        sent.complete = s.is_complete_call();
        sent
    }

    /// Every way of cutting `text` into 1, 2 and 3 pieces, and into single characters.
    fn splits(text: &str) -> Vec<Vec<&str>> {
        let cuts: Vec<usize> = text
            .char_indices()
            .map(|(i, _)| i)
            .chain([text.len()])
            .collect();
        let mut out = vec![vec![text]];
        for &i in &cuts {
            for &j in cuts.iter().filter(|&&j| j >= i) {
                out.push(vec![&text[..i], &text[i..j], &text[j..]]);
            }
        }
        out.push(
            text.char_indices()
                .map(|(i, c)| &text[i..i + c.len_utf8()])
                .collect(),
        );
        out
    }

    /// Checks every split of `text` sends the same, and that it agrees with `parse_call`.
    fn check(text: &str) -> Sent {
        let whole = stream(&[text]);
        for pieces in splits(text) {
            assert_eq!(stream(&pieces), whole, "{pieces:?}");
        }
        match parse_call(text) {
            Some(call) => {
                assert!(whole.complete, "{text}");
                assert_eq!(whole.name.as_deref(), Some(call.name.as_str()));
                assert!(whole.content.is_empty());
                // The streamed arguments are the model's text; the same JSON as the compact
                // form (or the string's contents, for string arguments).
                match Json::parse(&whole.arguments) {
                    Ok(value) if !text.contains(r#"arguments": ""#) => {
                        assert_eq!(value.to_compact(), call.arguments, "{text}")
                    }
                    _ => assert_eq!(whole.arguments, call.arguments, "{text}"),
                }
            }
            None => {
                assert_eq!(whole.starts, 0, "{text}");
                assert_eq!(whole.content, text, "{text}");
            }
        }
        whole
    }

    #[test]
    fn streams_a_call_split_anywhere() {
        let text = r#"{"name": "get_weather", "arguments": {"location": "Paris, \"FR\" {x}", "days": [1, 2], "unit": null}}"#;
        let sent = check(text);
        assert_eq!(sent.name.as_deref(), Some("get_weather"));
        assert_eq!(
            sent.arguments,
            r#"{"location": "Paris, \"FR\" {x}", "days": [1, 2], "unit": null}"#
        );
        assert!(sent.complete);
    }

    #[test]
    fn streams_calls_of_many_shapes() {
        let cases = [
            // Compact, whitespace between the wrapper's tokens, arguments first.
            r#"{"name":"f","arguments":{"a":1}}"#,
            " \n {\n  \"name\" : \"f\" ,\n  \"arguments\" : { \"a\" : 1 }\n}\n",
            r#"{"arguments": {"a": {"b": [{}]}}, "name": "f"}"#,
            // No arguments, empty arguments, escaped and non-ASCII names and values.
            r#"{"name": "now"}"#,
            r#"{"name": "now", "arguments": {}}"#,
            r#"{"name": "s\u0061y", "arguments": {"t": "é—🙂\\", "u": "\ud83d\ude00"}}"#,
            // String arguments, `parameters`, extra members, scalar members.
            r#"{"name": "f", "arguments": "{\"a\": 1}"}"#,
            r#"{"name": "f", "parameters": {"a": 1}}"#,
            r#"{"id": 7, "name": "f", "x": [1, {"y": "}"}], "arguments": {"a": true}, "z": -1.5e3}"#,
            r#"{"name": "f", "arguments": {"a": 1}}<|eot_id|>trailing"#,
            // Hermes-style tags.
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>",
            " <tool_call>{\"name\": \"f\"}</tool_call>",
            "<tool_call>hello",
            "<tool_call> [1]",
            "<tool",
            "<b>bold</b>",
            "<tool_calls>",
            // Not calls: text, JSON of another shape, a call cut short.
            "The answer is 42.",
            "  Leading whitespace, then text {\"name\": \"f\"}",
            r#"{"arguments": {"a": 1}}"#,
            r#"{"name": 3}"#,
            r#"{"name": ""}"#,
            r#"{"na"#,
            "{}",
            "{",
            "",
            " \n ",
            "[1, 2]",
        ];
        for text in cases {
            check(text);
        }
    }

    #[test]
    fn arguments_pass_through_as_generated() {
        // Tokens as a model would produce them: the name in one delta, then the arguments as
        // they come, without the wrapper's closing brace.
        let tokens = [
            "{\"",
            "name",
            "\":",
            " \"",
            "get",
            "_weather",
            "\",",
            " \"",
            "arguments",
            "\":",
            " {\"",
            "location",
            "\":",
            " \"",
            "Paris",
            "\"}",
            "}",
        ];
        let mut s = ToolCallStream::with_id("call_1".into());
        let mut out = Vec::new();
        for token in tokens {
            out.push(s.push(token));
        }
        let start = ToolDelta::CallStart {
            id: "call_1".into(),
            name: "get_weather".into(),
        };
        let args = |s: &str| ToolDelta::Arguments(s.into());
        let expected: Vec<Vec<ToolDelta>> = vec![
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![start],
            vec![],
            vec![],
            vec![],
            vec![args("{\"")],
            vec![args("location")],
            vec![args("\":")],
            vec![args(" \"")],
            vec![args("Paris")],
            vec![args("\"}")],
            vec![],
        ];
        assert_eq!(out, expected);
        assert!(s.finish().is_empty());
        assert!(s.is_complete_call());
        assert_eq!(s.finish_reason("stop"), "tool_calls");
        assert_eq!(s.name(), Some("get_weather"));
    }

    #[test]
    fn text_passes_through_as_it_comes() {
        let mut s = ToolCallStream::new();
        assert_eq!(s.push("\n"), vec![]);
        assert_eq!(s.push(" "), vec![]);
        assert_eq!(s.push(" Hel"), vec![ToolDelta::Content("\n  Hel".into())]);
        assert_eq!(s.push("lo {"), vec![ToolDelta::Content("lo {".into())]);
        assert_eq!(s.push(""), vec![]);
        assert_eq!(s.finish(), vec![]);
        assert!(!s.is_call());
        assert_eq!(s.finish_reason("length"), "length");
        // A call-like start that turns out not to be a call is flushed as text.
        let mut s = ToolCallStream::new();
        assert_eq!(s.push("{\"na"), vec![]);
        assert_eq!(
            s.push("me\": 1} and"),
            vec![ToolDelta::Content("{\"name\": 1} and".into())]
        );
        assert_eq!(s.push(" more"), vec![ToolDelta::Content(" more".into())]);
        // Whitespace only.
        let mut s = ToolCallStream::new();
        assert_eq!(s.push(" "), vec![]);
        assert_eq!(s.finish(), vec![ToolDelta::Content(" ".into())]);
    }

    #[test]
    fn arguments_before_the_name_follow_the_start() {
        let mut s = ToolCallStream::with_id("call_x".into());
        assert_eq!(s.push(r#"{"arguments": {"a": 1}, "#), vec![]);
        assert_eq!(
            s.push(r#""name": "f"}"#),
            vec![
                ToolDelta::CallStart {
                    id: "call_x".into(),
                    name: "f".into()
                },
                ToolDelta::Arguments(r#"{"a": 1}"#.into()),
            ]
        );
        assert!(s.finish().is_empty());
        assert!(s.is_complete_call());
    }

    #[test]
    fn calls_cut_short() {
        // Cut inside the arguments (max_tokens): a call, not complete; finish keeps "length".
        let mut s = ToolCallStream::new();
        let mut sent = Sent::default();
        let deltas = s.push(r#"{"name": "f", "arguments": {"a": "#);
        collect(&mut s, deltas, &mut sent);
        let deltas = s.finish();
        collect(&mut s, deltas, &mut sent);
        assert_eq!(sent.name.as_deref(), Some("f"));
        assert_eq!(sent.arguments, r#"{"a": "#);
        assert!(s.is_call() && !s.is_complete_call());
        assert_eq!(s.finish_reason("length"), "length");
        // Cut after the arguments, before the wrapper closes: no `{}` is made up.
        let sent = stream(&[r#"{"name": "f""#]);
        assert_eq!(sent.starts, 1);
        assert_eq!(sent.arguments, "");
        assert!(!sent.complete);
        // Broken after the start: the rest is dropped.
        let sent = stream(&[r#"{"name": "f", "arguments": {"a": 1} oops, more"#]);
        assert_eq!(sent.arguments, r#"{"a": 1}"#);
        assert!(!sent.complete);
    }

    #[test]
    fn long_call_in_random_tokens() {
        // A longer call cut into pseudo-random multi-character tokens.
        let args: Vec<String> = (0..40)
            .map(|i| format!("\"k{i}\": {{\"v\": [\"{i}\\\"}}\", {i}.5, true]}}"))
            .collect();
        let text = format!(
            "{{\"name\": \"big\", \"arguments\": {{{}}}}}",
            args.join(", ")
        );
        let mut seed = 0x2545_f491_u64;
        for _ in 0..50 {
            let mut pieces = Vec::new();
            let mut at = 0;
            while at < text.len() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let len = 1 + (seed >> 33) as usize % 7;
                let end = (at + len).min(text.len());
                pieces.push(&text[at..end]);
                at = end;
            }
            let sent = stream(&pieces);
            assert_eq!(sent.name.as_deref(), Some("big"));
            assert_eq!(sent.arguments, format!("{{{}}}", args.join(", ")));
            assert!(sent.complete);
        }
        assert_eq!(
            parse_call(&text).unwrap().arguments,
            Json::parse(&format!("{{{}}}", args.join(", ")))
                .unwrap()
                .to_compact()
        );
    }

    #[test]
    fn delta_objects() {
        assert_eq!(
            ToolDelta::Content("hi".into()).to_json(),
            json!({"content": "hi"})
        );
        assert_eq!(
            ToolDelta::CallStart {
                id: "call_1".into(),
                name: "f".into()
            }
            .to_json(),
            json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                   "function": {"name": "f", "arguments": ""}}]})
        );
        assert_eq!(
            ToolDelta::Arguments("{\"a".into()).to_json(),
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"a"}}]})
        );
    }

    // -- Prompt ----------------------------------------------------------------------------

    #[test]
    fn tool_json_and_prompt() {
        let t = two_tools();
        assert_eq!(
            t[1].to_json().to_spaced(),
            r#"{"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}"#
        );
        let prompt = tool_prompt(&t, None);
        let lines: Vec<&str> = prompt.lines().collect();
        assert_eq!(lines[0], "You can call these functions:");
        assert_eq!(
            lines[1],
            r#"{"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": {"type": "object", "properties": {"location": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["location"]}}}"#
        );
        assert!(lines[2].contains("\"now\""));
        assert_eq!(lines[3], "");
        assert_eq!(lines[4], DEFAULT_TOOL_INSTRUCTION);
        assert!(tool_prompt(&t, Some("Call one.")).ends_with("\n\nCall one."));
    }
}
