//! OpenAI tool calling for `/v1/chat/completions`, in pieces the handler puts together:
//!
//! - `request`: the request fields ([`ToolFields`]: `tools`, `tool_choice`, `tool_prompt`,
//!   `parallel_tool_calls`) and their validation ([`validate`], [`ToolFields::resolve`]);
//! - `schema`: the constraint: [`call_schema`] (the JSON schema of one call) and [`grammar`]
//!   (which grammar the shard gets for a `tool_choice`);
//! - `call`: the answer, [`parse_call`] and [`assistant_message`] for a whole output;
//! - `stream`: [`ToolCallStream`] for a streamed one;
//! - `prompt`: the tool definitions as Hugging Face chat templates expect them
//!   ([`Tool::to_json`]) and, for templates that know nothing of tools, [`tool_prompt`];
//! - `json`: JSON text as Python's `json.dumps` writes it ([`spaced_json`], [`PyFormatter`],
//!   shared with the chat template's `tojson`).
//!
//! A call is generated as one JSON object `{"name": "<function>", "arguments": {...}}`. The shard
//! writes JSON with `", "` and `": "` separators and object members in the order the schema lists
//! them, so `name` comes first; the parsers here accept any whitespace and member order anyway.
//! JSON schemas and arguments are kept as `serde_json::Value`, whose objects keep their members
//! in order in this crate (serde_json's `preserve_order` feature): the order a client declares a
//! function's parameters in is the order the model writes them.

mod call;
mod json;
mod prompt;
mod request;
mod schema;
mod stream;

pub use call::{assistant_message, new_call_id, parse_call, ToolCall, CALL_TAG};
pub use json::{json_kind, python_json, spaced_json, PyFormatter};
pub use prompt::{tool_prompt, DEFAULT_TOOL_INSTRUCTION};
pub use request::{
    default_parameters, valid_function_name, validate, FunctionDefinition, Tool, ToolChoice,
    ToolError, ToolFields, Tools,
};
pub use schema::{call_schema, grammar, GrammarKind};
pub use stream::{ToolCallStream, ToolDelta};

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
