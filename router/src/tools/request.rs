//! The request fields of tool calling ([`ToolFields`]: `tools`, `tool_choice`, `tool_prompt`,
//! `parallel_tool_calls`) and their validation ([`validate`], [`ToolFields::resolve`]).

use super::json_kind;
use crate::errors::{ApiError, ValidationError};
use serde::de::{self, Deserializer};
use serde::Deserialize;
use serde_json::{json, Value};
use std::borrow::Cow;
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

/// One entry of `tools`: `{"type": "function", "function": {...}}`.
#[derive(Clone, Debug, PartialEq, Deserialize, ToSchema)]
pub struct Tool {
    /// Must be "function" (checked by [`validate`], so that the message names the entry).
    #[serde(rename = "type", default)]
    #[schema(example = "function")]
    pub kind: Option<String>,
    pub function: FunctionDefinition,
}

/// A function the model may call.
#[derive(Clone, Debug, PartialEq, Deserialize, ToSchema)]
pub struct FunctionDefinition {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// The JSON schema of the arguments (an object); absent: no arguments
    /// (`{"type": "object", "properties": {}}`).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Value>,
    /// OpenAI's strict schema adherence; accepted and ignored, since the output is always
    /// constrained to the schema.
    #[serde(default)]
    pub strict: Option<bool>,
}

/// The schema of a function declared without `parameters`.
pub fn default_parameters() -> Value {
    json!({"type": "object", "properties": {}})
}

impl FunctionDefinition {
    /// `parameters`, or the schema of no arguments when absent.
    pub fn parameters(&self) -> Value {
        self.parameters.clone().unwrap_or_else(default_parameters)
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
    pub fn from_json(value: &Value) -> Result<Self, ToolError> {
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
            other => Err(bad(json_kind(other).to_string())),
        }
    }
}

/// The JSON forms `from_json` reads.
impl PartialSchema for ToolChoice {
    fn schema() -> RefOr<Schema> {
        let named = ObjectBuilder::new()
            .property("name", ObjectBuilder::new().schema_type(Type::String))
            .required("name");
        let function = ObjectBuilder::new()
            .property(
                "type",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(["function"])),
            )
            .property("function", named)
            .required("type")
            .required("function");
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(["auto", "none", "required"])),
            )
            .item(function)
            .item(ObjectBuilder::new().schema_type(Type::Null))
            .description(Some("Which tool the model calls (null: auto)"))
            .into()
    }
}

impl ToSchema for ToolChoice {
    fn name() -> Cow<'static, str> {
        "ToolChoice".into()
    }
}

impl<'de> Deserialize<'de> for ToolChoice {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Self::from_json(&value).map_err(de::Error::custom)
    }
}

/// The tool fields of a chat completion request (flatten them into the request's struct).
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
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
                    json_kind(parameters)
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

#[cfg(test)]
mod tests {
    use super::super::fixtures::{error, fields};
    use super::*;

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
            t.tools[0].function.parameters.as_ref().unwrap().to_string(),
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
}
