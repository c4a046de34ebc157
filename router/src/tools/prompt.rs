//! The tools in the prompt: their definitions as Hugging Face chat templates expect them
//! ([`Tool::to_json`]) and, for templates that know nothing of tools, [`tool_prompt`].

use super::{spaced_json, Tool};
use serde_json::{json, Map, Value};

impl Tool {
    /// The tool as chat templates get it in `tools` and as [`tool_prompt`] lists it:
    /// `{"type": "function", "function": {"name", "description"?, "parameters"}}`, with
    /// `parameters` filled in when absent (`strict` left out).
    pub fn to_json(&self) -> Value {
        let f = &self.function;
        let mut function = Map::new();
        function.insert("name".to_string(), Value::from(f.name.as_str()));
        if let Some(description) = &f.description {
            function.insert("description".to_string(), Value::from(description.as_str()));
        }
        function.insert("parameters".to_string(), f.parameters());
        json!({"type": "function", "function": function})
    }
}

/// The instruction of [`tool_prompt`] unless the request's `tool_prompt` replaces it.
pub const DEFAULT_TOOL_INSTRUCTION: &str = "To call one of these functions, answer with only a \
     JSON object of the form {\"name\": <the function's name>, \"arguments\": <an object of its \
     arguments>}. Otherwise, answer in plain text.";

/// The text that tells a model whose chat template does not render `tools` about them: the
/// tools' JSON definitions, one a line, then `instruction` (or [`DEFAULT_TOOL_INSTRUCTION`]).
pub fn tool_prompt(tools: &[Tool], instruction: Option<&str>) -> String {
    let mut text = String::from("You can call these functions:\n");
    for tool in tools {
        text.push_str(&spaced_json(&tool.to_json()));
        text.push('\n');
    }
    text.push('\n');
    text.push_str(instruction.unwrap_or(DEFAULT_TOOL_INSTRUCTION));
    text
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::two_tools;
    use super::*;

    #[test]
    fn tool_json_and_prompt() {
        let t = two_tools();
        assert_eq!(
            spaced_json(&t[1].to_json()),
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
