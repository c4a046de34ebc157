//! The chat messages of a request ([`ChatMessage`]) as OpenAI clients send them, tool calls
//! and results included, and as the template sees them.

use crate::tools::json_kind;
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::ToSchema;

/// One chat message; `content` may be a string or a list of `{"type": "text", "text": ...}` parts
/// (null: empty). The tool fields are left out of what the template sees when absent, so
/// templates that test for them (`'tool_calls' in message`) see plain messages as before.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, ToSchema)]
pub struct ChatMessage {
    #[schema(example = "user")]
    pub role: String,
    #[serde(default, deserialize_with = "content_text")]
    #[schema(schema_with = content_schema)]
    pub content: String,
    /// An assistant message's calls (null or `[]`: none).
    #[serde(
        default,
        deserialize_with = "some_tool_calls",
        skip_serializing_if = "Option::is_none"
    )]
    pub tool_calls: Option<Vec<ChatToolCall>>,
    /// A `tool` message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A `tool` message's function (or a participant's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A message of `role` with `content` and no tool fields.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

/// One of an assistant message's `tool_calls`: `{"id", "type": "function", "function": {"name",
/// "arguments"}}`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, ToSchema)]
pub struct ChatToolCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default = "function_type")]
    #[schema(default = "function")]
    pub kind: String,
    pub function: ChatFunctionCall,
}

/// A call's function and arguments.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, ToSchema)]
pub struct ChatFunctionCall {
    pub name: String,
    /// The arguments as an object, as Hugging Face templates expect them (`arguments | tojson`).
    /// OpenAI clients send JSON text, which is parsed here; text that is not JSON stays a string.
    #[serde(default = "no_arguments", deserialize_with = "arguments_value")]
    #[schema(value_type = Value)]
    pub arguments: serde_json::Value,
}

fn function_type() -> String {
    "function".to_string()
}

fn no_arguments() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

fn some_tool_calls<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<ChatToolCall>>, D::Error> {
    Ok(Option::<Vec<ChatToolCall>>::deserialize(d)?.filter(|calls| !calls.is_empty()))
}

fn arguments_value<'de, D: serde::Deserializer<'de>>(d: D) -> Result<serde_json::Value, D::Error> {
    use serde_json::Value;
    Ok(match Value::deserialize(d)? {
        Value::String(text) => serde_json::from_str(&text).unwrap_or(Value::String(text)),
        Value::Null => no_arguments(),
        value => value,
    })
}

/// The document's form of what `content_text` reads.
fn content_schema() -> RefOr<Schema> {
    let part = ObjectBuilder::new()
        .property(
            "type",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["text"])),
        )
        .property("text", ObjectBuilder::new().schema_type(Type::String))
        .required("text");
    OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::String))
        .item(ArrayBuilder::new().items(part))
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .description(Some(
            "A string, or a list of text parts (joined); null: empty",
        ))
        .into()
}

/// `content` as OpenAI allows it: a string, null, or a list of text parts (`{"type": "text",
/// "text": ...}`), joined. Anything else (a number, an object, a non-text part) is refused, so
/// the request gets a 422 naming the field instead of a prompt the client never wrote.
fn content_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    use serde::de::Error as _;
    use serde_json::Value;
    let value = Option::<Value>::deserialize(d)?;
    let parts = match value {
        None | Some(Value::Null) => return Ok(String::new()),
        Some(Value::String(s)) => return Ok(s),
        Some(Value::Array(parts)) => parts,
        Some(other) => {
            return Err(D::Error::custom(format!(
                "`content` must be a string or a list of content parts, not {}",
                json_kind(&other)
            )))
        }
    };
    let mut text = String::new();
    for (i, part) in parts.iter().enumerate() {
        let kind = part.get("type").and_then(Value::as_str).unwrap_or("text");
        match part.get("text").and_then(Value::as_str) {
            Some(t) if kind == "text" => text.push_str(t),
            _ => {
                return Err(D::Error::custom(format!(
                    "`content[{i}]` must be a text part {{\"type\": \"text\", \"text\": \"...\"}} \
                     (this model reads text only); got {}",
                    if kind == "text" {
                        json_kind(part).to_string()
                    } else {
                        format!("type `{kind}`")
                    }
                )))
            }
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{conversation, messages};
    use super::*;

    #[test]
    fn messages_carry_tool_fields() {
        let m = conversation();
        assert_eq!(m[2].content, "");
        let calls = m[2].tool_calls.as_ref().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].id.as_deref(), Some("call_1"));
        assert_eq!(calls[0].kind, "function");
        assert_eq!(calls[0].function.name, "get_weather");
        // JSON text arguments become an object, members in order.
        assert_eq!(
            calls[0].function.arguments.to_string(),
            r#"{"location":"Paris","unit":"c"}"#
        );
        assert_eq!(m[3].tool_call_id.as_deref(), Some("call_1"));
        assert_eq!(m[3].name, None);
        assert_eq!(m[4].name.as_deref(), Some("now"));
        // Absent fields are left out of what the template sees; null and [] calls are none.
        let plain = messages(
            r#"[{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "x", "tool_calls": null},
                {"role": "assistant", "content": "y", "tool_calls": []}]"#,
        );
        for (message, content) in plain.iter().zip(["hi", "x", "y"]) {
            let value = serde_json::to_value(message).unwrap();
            assert_eq!(value.as_object().unwrap().len(), 2, "{value}");
            assert_eq!(value["content"], content);
        }
        assert_eq!(plain[0], ChatMessage::new("user", "hi"));
        // Arguments that are not JSON stay text; an object stays an object; absent is `{}`.
        let m = messages(
            r#"[{"role": "assistant", "tool_calls": [
                {"function": {"name": "a", "arguments": "not json"}},
                {"function": {"name": "b", "arguments": {"z": 1, "a": 2}}},
                {"function": {"name": "c"}}]}]"#,
        );
        let calls = m[0].tool_calls.as_ref().unwrap();
        assert_eq!(calls[0].function.arguments, "not json");
        assert_eq!(calls[1].function.arguments.to_string(), r#"{"z":1,"a":2}"#);
        assert_eq!(calls[2].function.arguments.to_string(), "{}");
        assert_eq!(calls[2].kind, "function");
        assert_eq!(calls[2].id, None);
    }
}
