//! The tokenizer's chat template (Jinja, as Hugging Face tokenizers ship it), rendered with
//! minijinja: turns chat messages into one prompt for `/v1/chat/completions`.
//!
//! Tool calling: the template gets the request's tools in `tools` and the messages' tool calls
//! and results as OpenAI clients send them (see [`ChatMessage`]), as Hugging Face's
//! `apply_chat_template` does. A template that does not render `tools` gets a tool prompt
//! instead (see [`ChatTemplate::apply_with_tools`]). Values reach the template with their object
//! members in order (a function's parameters as declared, a call's arguments as written), and
//! `tojson` writes JSON as Python's `json.dumps` does, so prompts read as the model saw them in
//! training.
//!
//! Here [`ChatTemplate`] (compiling, loading, rendering); in `messages` the messages as a request
//! carries them ([`ChatMessage`]); in `tojson` the values the template sees and its `tojson`.

mod messages;
mod tojson;

pub use messages::{ChatFunctionCall, ChatMessage, ChatToolCall};

use crate::tools::{spaced_json, tool_prompt, Tool};
use minijinja::{context, Environment, Error, ErrorKind, Value};
use std::path::Path;
use tojson::{jinja_value, ordered_value, tojson};

/// A compiled chat template and the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// The template reads the `tools` variable.
    uses_tools: bool,
    /// Its source mentions `tool_calls` (it renders an assistant's calls).
    renders_tool_calls: bool,
    /// Its source mentions the role `tool` (it renders tool results, or refuses them itself).
    renders_tool_role: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("uses_tools", &self.uses_tools)
            .finish_non_exhaustive()
    }
}

fn raise_exception(message: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// A special token as `tokenizer_config.json` writes it: a string or `{"content": ...}`.
fn token_text(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) => Some(s.clone()),
        v => v.get("content")?.as_str().map(str::to_string),
    }
}

/// The `chat_template` of a `tokenizer_config.json`: a string, or a list of named templates (the
/// "default" one, else the first).
fn config_template(config: &serde_json::Value) -> Option<String> {
    match config.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or(named.first())
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// The `tokenizer_config.json` in `dir`; empty when it is missing or unreadable.
fn model_config(dir: &Path) -> serde_json::Value {
    std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default()
}

impl ChatTemplate {
    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self, String> {
        let renders_tool_calls = source.contains("tool_calls");
        let renders_tool_role = source.contains("'tool'") || source.contains("\"tool\"");
        let mut env = Environment::new();
        // As Hugging Face renders chat templates (`trim_blocks`, `lstrip_blocks`).
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source)
            .map_err(|e| format!("invalid chat template: {e}"))?;
        let uses_tools = env
            .get_template("chat")
            .map(|t| t.undeclared_variables(false).contains("tools"))
            .unwrap_or(false);
        Ok(Self {
            env,
            bos_token,
            eos_token,
            uses_tools,
            renders_tool_calls,
            renders_tool_role,
        })
    }

    /// Reads the template from `chat_template.jinja` or `tokenizer_config.json` in `dir`;
    /// None when the tokenizer has none.
    pub fn load(dir: &Path) -> Result<Option<Self>, String> {
        let config = model_config(dir);
        let source = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(source) => Some(source),
            Err(_) => config_template(&config),
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let bos = token_text(config.get("bos_token")).unwrap_or_default();
        let eos = token_text(config.get("eos_token")).unwrap_or_default();
        Self::new(source, bos, eos).map(Some)
    }

    /// The `chat_template` of the `tokenizer_config.json` at `path`, in place of the model's own
    /// (`--tokenizer-config-path`). Its `bos_token` and `eos_token` when it has them, else those
    /// of the model's `tokenizer_config.json` in `model_dir`. An error when the file cannot be
    /// read, is not JSON, or has no template (or one that does not compile).
    pub fn from_tokenizer_config(path: &Path, model_dir: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot be read: {e}"))?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("is not valid JSON: {e}"))?;
        let source = config_template(&config)
            .ok_or("has no `chat_template` (a string, or a list of named templates)")?;
        let model = model_config(model_dir);
        let token = |name: &str| {
            token_text(config.get(name))
                .or_else(|| token_text(model.get(name)))
                .unwrap_or_default()
        };
        Self::new(source, token("bos_token"), token("eos_token"))
    }

    /// Whether the template renders the `tools` variable itself.
    pub fn uses_tools(&self) -> bool {
        self.uses_tools
    }

    /// The prompt for `messages`, ending with the assistant's turn (no tools).
    pub fn apply(&self, messages: &[ChatMessage]) -> Result<String, String> {
        self.apply_with_tools(messages, None, None)
    }

    /// The prompt for `messages` and the request's `tools` (None or empty: no tools),
    /// ending with the assistant's turn.
    ///
    /// A template that reads `tools` gets them there, as `[{"type": "function", "function":
    /// {"name", "description", "parameters"}}]` (None when there are none), and the messages as
    /// they are. A template that does not is given plain chat instead:
    /// - if it never mentions `tool_calls`, an assistant message's calls become its text, one
    ///   `{"name": ..., "arguments": ...}` a line (what the model is told to answer with);
    /// - if it never mentions the role `tool`, a tool result becomes a user message ("Result of
    ///   the function call `<name>`: ..."), merged with neighbouring user messages so that roles
    ///   still alternate;
    /// - with tools, [`tool_prompt`] (its instruction replaced by `tool_prompt` when given) is
    ///   appended to the last user message, where a model without tool training is most likely
    ///   to heed it and which every template renders (some refuse a system message); with no
    ///   user message, to the first message if it is a system message, else in a new system
    ///   message first.
    pub fn apply_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[Tool]>,
        tool_prompt: Option<&str>,
    ) -> Result<String, String> {
        let tools = tools.filter(|t| !t.is_empty());
        let plain;
        let messages = if self.uses_tools {
            messages
        } else {
            plain = self.plain_messages(messages, tools, tool_prompt);
            &plain[..]
        };
        let tools = tools.map(|tools| {
            Value::from(
                tools
                    .iter()
                    .map(|t| jinja_value(&t.to_json()))
                    .collect::<Vec<_>>(),
            )
        });
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        template
            .render(context! {
                messages => ordered_value(&messages)?,
                tools => tools,
                add_generation_prompt => true,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| format!("chat template error: {e}"))
    }

    /// The messages as plain chat, for a template that does not read `tools`.
    fn plain_messages(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[Tool]>,
        instruction: Option<&str>,
    ) -> Vec<ChatMessage> {
        // (message, whether it holds tool results)
        let mut out: Vec<(ChatMessage, bool)> = Vec::with_capacity(messages.len() + 1);
        for (i, message) in messages.iter().enumerate() {
            let mut message = message.clone();
            let mut from_tool = false;
            if !self.renders_tool_calls {
                if let Some(calls) = message.tool_calls.take() {
                    let mut lines: Vec<String> = Vec::new();
                    if !message.content.is_empty() {
                        lines.push(std::mem::take(&mut message.content));
                    }
                    lines.extend(calls.iter().map(|call| {
                        spaced_json(&serde_json::json!({
                            "name": call.function.name,
                            "arguments": call.function.arguments,
                        }))
                    }));
                    message.content = lines.join("\n");
                }
            }
            if message.role == "tool" && !self.renders_tool_role {
                let function = message.name.take().or_else(|| {
                    let id = message.tool_call_id.as_deref()?;
                    messages[..i]
                        .iter()
                        .rev()
                        .flat_map(|m| m.tool_calls.iter().flatten())
                        .find(|call| call.id.as_deref() == Some(id))
                        .map(|call| call.function.name.clone())
                });
                let what = function
                    .or_else(|| message.tool_call_id.clone())
                    .map(|f| format!(" `{f}`"))
                    .unwrap_or_default();
                message = ChatMessage::new(
                    "user",
                    format!("Result of the function call{what}:\n{}", message.content),
                );
                from_tool = true;
            }
            match out.last_mut() {
                Some((last, last_from_tool))
                    if message.role == "user"
                        && last.role == "user"
                        && (from_tool || *last_from_tool) =>
                {
                    last.content.push_str("\n\n");
                    last.content.push_str(&message.content);
                    *last_from_tool = from_tool;
                }
                _ => out.push((message, from_tool)),
            }
        }
        let mut out: Vec<ChatMessage> = out.into_iter().map(|(m, _)| m).collect();
        if let Some(tools) = tools {
            let prompt = tool_prompt(tools, instruction);
            let at = out.iter().rposition(|m| m.role == "user");
            match at.or_else(|| out.first().filter(|m| m.role == "system").map(|_| 0)) {
                Some(i) => {
                    let content = &mut out[i].content;
                    if !content.is_empty() {
                        content.push_str("\n\n");
                    }
                    content.push_str(&prompt);
                }
                None => out.insert(0, ChatMessage::new("system", prompt)),
            }
        }
        out
    }
}

/// What the tests of the submodules share.
#[cfg(test)]
mod fixtures {
    use super::ChatMessage;
    use crate::tools::Tool;

    /// Messages from JSON text, as a request carries them.
    pub fn messages(json: &str) -> Vec<ChatMessage> {
        serde_json::from_str(json).unwrap()
    }

    /// Tools from JSON text (members in order).
    pub fn tools(json: &str) -> Vec<Tool> {
        serde_json::from_str(json).unwrap()
    }

    pub fn weather() -> Vec<Tool> {
        tools(
            r#"[{"type": "function", "function": {"name": "get_weather",
                "description": "Current weather",
                "parameters": {"type": "object", "properties": {
                    "location": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                    "required": ["location"]}, "strict": true}},
                {"type": "function", "function": {"name": "now"}}]"#,
        )
    }

    /// A multi-turn tool conversation as the OpenAI client sends it.
    pub fn conversation() -> Vec<ChatMessage> {
        messages(
            r#"[{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris, and the time?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                     "arguments": "{\"location\": \"Paris\", \"unit\": \"c\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "now",
                     "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "22"},
                {"role": "tool", "tool_call_id": "call_2", "name": "now", "content": "12:00"}]"#,
        )
    }
}

#[cfg(test)]
mod tests;
