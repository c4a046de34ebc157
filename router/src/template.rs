//! The tokenizer's chat template (Jinja, as Hugging Face tokenizers ship it), rendered with
//! minijinja: turns chat messages into one prompt for `/v1/chat/completions`.

use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One chat message; `content` may be a string or a list of `{"type": "text", "text": ...}` parts.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default, deserialize_with = "content_text")]
    pub content: String,
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

/// How a JSON value is named in messages.
fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A compiled chat template and the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

fn raise_exception(message: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// A special token as `tokenizer_config.json` writes it: a string or `{"content": ...}`.
fn token_text(value: Option<&serde_json::Value>) -> String {
    match value {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => v
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        None => String::new(),
    }
}

impl ChatTemplate {
    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source)
            .map_err(|e| format!("invalid chat template: {e}"))?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Reads the template from `chat_template.jinja` or `tokenizer_config.json` in `dir`;
    /// None when the tokenizer has none.
    pub fn load(dir: &Path) -> Result<Option<Self>, String> {
        let config: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        let source = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(source) => Some(source),
            Err(_) => match config.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // A list of named templates: the "default" one, else the first.
                Some(serde_json::Value::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or(named.first())
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_string),
                _ => None,
            },
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let bos = token_text(config.get("bos_token"));
        let eos = token_text(config.get("eos_token"));
        Self::new(source, bos, eos).map(Some)
    }

    /// The prompt for `messages`, ending with the assistant's turn.
    pub fn apply(&self, messages: &[ChatMessage]) -> Result<String, String> {
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| format!("chat template error: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}\
        {{ raise_exception('no tools') }}{% endif %}<|{{ m['role'] }}|>{{ m['content'].strip() }}\n\
        {% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

    fn messages(json: &str) -> Vec<ChatMessage> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn renders_with_python_string_methods() {
        let t = ChatTemplate::new(TEMPLATE.into(), "<s>".into(), "</s>".into()).unwrap();
        let m = messages(
            r#"[{"role": "system", "content": " be brief "},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]}]"#,
        );
        assert_eq!(
            t.apply(&m).unwrap(),
            "<s><|system|>be brief\n<|user|>hi\n<|assistant|>"
        );
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new(TEMPLATE.into(), String::new(), String::new()).unwrap();
        let err = t
            .apply(&messages(r#"[{"role": "tool", "content": "x"}]"#))
            .unwrap_err();
        assert!(err.contains("no tools"), "{err}");
    }

    #[test]
    fn loads_from_tokenizer_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ChatTemplate::load(dir.path()).unwrap().is_none());
        let config = serde_json::json!({
            "bos_token": {"content": "<s>"},
            "eos_token": "</s>",
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D"}],
        });
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let t = ChatTemplate::load(dir.path()).unwrap().unwrap();
        assert_eq!(t.apply(&[]).unwrap(), "<s>D");
        std::fs::write(dir.path().join("chat_template.jinja"), "J{{ eos_token }}").unwrap();
        let t = ChatTemplate::load(dir.path()).unwrap().unwrap();
        assert_eq!(t.apply(&[]).unwrap(), "J</s>");
    }
}
