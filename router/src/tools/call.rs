//! A finished call: [`parse_call`] reads one from a whole output, [`assistant_message`] makes
//! the OpenAI message of the answer.

use serde_json::{json, Value};

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
    pub fn to_openai(&self, id: &str) -> Value {
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
        .into_iter::<Value>()
        .next()?
        .ok()?;
    let Value::Object(members) = value else {
        return None;
    };
    let name = members
        .get("name")
        .and_then(Value::as_str)
        .filter(|name| !name.is_empty())?
        .to_string();
    let arguments = match members
        .iter()
        .find(|(k, _)| *k == "arguments" || *k == "parameters")
    {
        None => "{}".to_string(),
        Some((_, Value::String(s))) => s.clone(),
        Some((_, value)) => value.to_string(),
    };
    Some(ToolCall { name, arguments })
}

/// The `message` of a non-streamed chat answer for the generated `text`, and whether it is a
/// call: `{"role": "assistant", "content": null, "tool_calls": [{"id": "call_…", "type":
/// "function", "function": {"name", "arguments"}}]}` when it is (the answer's `finish_reason`
/// is then "tool_calls"), `{"role": "assistant", "content": text}` when not.
pub fn assistant_message(text: &str) -> (Value, bool) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
