//! OpenAI tool calling for `/v1/chat/completions`, in pieces the handler puts together:
//!
//! - `request`: the request fields ([`ToolFields`]: `tools`, `tool_choice`, `tool_prompt`,
//!   `parallel_tool_calls`) and their validation ([`validate`], [`ToolFields::resolve`]);
//! - `schema`: the constraint: [`call_schema`] (the JSON schema of one call) and [`grammar`]
//!   (which grammar the shard gets for a `tool_choice`);
//! - `call`: the answer, [`parse_call`] and [`assistant_message`] for a whole output;
//! - `stream`: [`ToolCallStream`] for a streamed one;
//! - `prompt`: the tool definitions as Hugging Face chat templates expect them
//!   ([`Tool::to_json`]) and, for templates that know nothing of tools, [`tool_prompt`].
//!
//! A call is generated as one JSON object `{"name": "<function>", "arguments": {...}}`. The shard
//! writes JSON with `", "` and `": "` separators and object members in the order the schema lists
//! them, so `name` comes first; the parsers here accept any whitespace and member order anyway.
//! JSON schemas and arguments are kept as `serde_json::Value`, whose objects keep their members
//! in order in this crate (serde_json's `preserve_order` feature): the order a client declares a
//! function's parameters in is the order the model writes them.

mod call;
mod prompt;
mod request;
mod schema;
mod stream;

pub use call::{assistant_message, new_call_id, parse_call, ToolCall, CALL_TAG};
pub use prompt::{tool_prompt, DEFAULT_TOOL_INSTRUCTION};
pub use request::{
    default_parameters, valid_function_name, validate, FunctionDefinition, Tool, ToolChoice,
    ToolError, ToolFields, Tools,
};
pub use schema::{call_schema, grammar, GrammarKind};
pub use stream::{ToolCallStream, ToolDelta};

use serde::Serialize;
use serde_json::Value;
use std::io;

/// How a JSON value is named in messages ("a list", "a string", ...).
pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
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

/// `value` as JSON text with `", "` and `": "` separators (Python's `json.dumps` default), as
/// the shard writes JSON and Hugging Face templates show it. (Compact text, as OpenAI writes a
/// call's `arguments`, is `Value`'s `to_string`.)
pub fn spaced_json<T: Serialize + ?Sized>(value: &T) -> String {
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, Spaced);
    if value.serialize(&mut serializer).is_err() {
        return String::new();
    }
    String::from_utf8(out).unwrap_or_default()
}

/// What the tests of the submodules share.
#[cfg(test)]
mod fixtures {
    use super::{Tool, ToolFields};
    use serde_json::Value;

    /// Tools from JSON text.
    pub fn tools(json: &str) -> Vec<Tool> {
        serde_json::from_str(json).unwrap()
    }

    pub fn weather() -> Vec<Tool> {
        tools(
            r#"[{"type": "function", "function": {
                "name": "get_weather",
                "description": "Current weather",
                "parameters": {"type": "object", "properties": {
                    "location": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                    "required": ["location"]}}}]"#,
        )
    }

    pub fn two_tools() -> Vec<Tool> {
        let mut t = weather();
        t.extend(tools(
            r#"[{"type": "function", "function": {"name": "now"}}]"#,
        ));
        t
    }

    pub fn fields(json: Value) -> Result<ToolFields, serde_json::Error> {
        serde_json::from_value(json)
    }

    pub fn error(json: Value) -> String {
        fields(json).unwrap().resolve().unwrap_err().0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What the module relies on `serde_json::Value` for (the `preserve_order` feature).
    #[test]
    fn json_keeps_member_order() {
        let text = r#"{"z": 1, "a": [true, null, -2.5, "s"], "m": {"y": {}, "b": []}}"#;
        let value: Value = serde_json::from_str(text).unwrap();
        assert_eq!(spaced_json(&value), text);
        assert_eq!(
            value.to_string(),
            r#"{"z":1,"a":[true,null,-2.5,"s"],"m":{"y":{},"b":[]}}"#
        );
        assert_eq!(json_kind(value.get("a").unwrap()), "a list");
        assert!(value.get("nope").is_none());
        // A repeated key keeps its first place and its last value.
        let value: Value = serde_json::from_str(r#"{"a": 1, "b": 2, "a": 3}"#).unwrap();
        assert_eq!(value.to_string(), r#"{"a":3,"b":2}"#);
        // Large and negative integers survive.
        let value: Value =
            serde_json::from_str("[18446744073709551615, -9223372036854775808]").unwrap();
        assert_eq!(
            value.to_string(),
            "[18446744073709551615,-9223372036854775808]"
        );
        assert_eq!(json!({"b": 1, "a": "x"}).to_string(), r#"{"b":1,"a":"x"}"#);
    }
}
