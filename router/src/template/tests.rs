use super::fixtures::{conversation, messages, tools, weather};
use super::*;

const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}\
        {{ raise_exception('no tools') }}{% endif %}<|{{ m['role'] }}|>{{ m['content'].strip() }}\n\
        {% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

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

#[test]
fn a_tokenizer_config_file_replaces_the_models_template() {
    let model = tempfile::tempdir().unwrap();
    let config = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": "M"});
    std::fs::write(
        model.path().join("tokenizer_config.json"),
        config.to_string(),
    )
    .unwrap();
    std::fs::write(model.path().join("chat_template.jinja"), "J").unwrap();
    let other = tempfile::tempdir().unwrap();
    let path = other.path().join("tokenizer_config.json");
    // The list form; the model's special tokens where the file has none.
    let named = serde_json::json!({"chat_template": [{"name": "x", "template": "{{ bos_token }}F{{ eos_token }}"}]});
    std::fs::write(&path, named.to_string()).unwrap();
    let t = ChatTemplate::from_tokenizer_config(&path, model.path()).unwrap();
    assert_eq!(t.apply(&[]).unwrap(), "<s>F</s>");
    // The file's own special tokens win.
    let own = serde_json::json!({"bos_token": {"content": "[B]"}, "chat_template": "{{ bos_token }}G{{ eos_token }}"});
    std::fs::write(&path, own.to_string()).unwrap();
    let t = ChatTemplate::from_tokenizer_config(&path, model.path()).unwrap();
    assert_eq!(t.apply(&[]).unwrap(), "[B]G</s>");
}

#[test]
fn a_tokenizer_config_file_without_a_usable_template_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer_config.json");
    let error =
        |path: &std::path::Path| ChatTemplate::from_tokenizer_config(path, dir.path()).unwrap_err();
    assert!(
        error(&path).starts_with("cannot be read: "),
        "{}",
        error(&path)
    );
    std::fs::write(&path, "{not json").unwrap();
    assert!(
        error(&path).starts_with("is not valid JSON: "),
        "{}",
        error(&path)
    );
    std::fs::write(&path, r#"{"bos_token": "<s>"}"#).unwrap();
    assert!(
        error(&path).starts_with("has no `chat_template`"),
        "{}",
        error(&path)
    );
    std::fs::write(&path, r#"{"chat_template": "{% for %}"}"#).unwrap();
    assert!(
        error(&path).starts_with("invalid chat template: "),
        "{}",
        error(&path)
    );
    assert!(
        error(dir.path()).starts_with("cannot be read: "),
        "a directory"
    );
}

/// A Hermes / Qwen2.5-style template that renders `tools` and tool calls itself.
const QWEN_LIKE: &str = r#"<|im_start|>system
{% if messages and messages[0].role == 'system' %}
{{ messages[0].content }}
{% else %}
You are a helpful assistant.
{% endif %}
{% if tools %}

Functions you can call:
<tools>
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}
</tools>
Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call>.
{% endif %}
<|im_end|>
{% for m in messages %}
    {% if m.role == 'system' and loop.first %}
    {% elif m.role == 'assistant' and m.tool_calls %}
<|im_start|>assistant
        {% if m.content %}
{{ m.content }}
        {% endif %}
        {% for call in m.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
        {% endfor %}
<|im_end|>
    {% elif m.role == 'tool' %}
<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response>
<|im_end|>
    {% else %}
<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"#;

#[test]
fn a_template_with_tools_renders_them() {
    let t = ChatTemplate::new(QWEN_LIKE.into(), String::new(), String::new()).unwrap();
    assert!(t.uses_tools());
    let tools = weather();
    let prompt = t
        .apply_with_tools(&conversation(), Some(&tools), Some("ignored here"))
        .unwrap();
    let expected = r#"<|im_start|>system
Be brief.

Functions you can call:
<tools>
{"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": {"type": "object", "properties": {"location": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["location"]}}}
{"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
</tools>
Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call>.
<|im_end|>
<|im_start|>user
Weather in Paris, and the time?<|im_end|>
<|im_start|>assistant
<tool_call>
{"name": "get_weather", "arguments": {"location": "Paris", "unit": "c"}}
</tool_call>
<tool_call>
{"name": "now", "arguments": {}}
</tool_call>
<|im_end|>
<|im_start|>user
<tool_response>
22
</tool_response>
<|im_end|>
<|im_start|>user
<tool_response>
12:00
</tool_response>
<|im_end|>
<|im_start|>assistant
"#;
    assert_eq!(prompt, expected);
    // Without tools: `tools` is none, plain chat renders as before.
    let m = messages(r#"[{"role": "user", "content": "hi"}]"#);
    assert_eq!(
        t.apply(&m).unwrap(),
        "<|im_start|>system\nYou are a helpful assistant.\n<|im_end|>\n\
             <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(t.apply_with_tools(&m, Some(&[]), None), t.apply(&m));
}

/// A Llama-3.1-style template: `tools is not none`, `tojson(indent=...)`, `'tool_calls' in
/// message`, iterating a schema's properties.
const LLAMA_LIKE: &str = r#"{{ bos_token }}
{% if tools is not none %}
<|system|>Tools:
{% for t in tools %}
{{ t | tojson(indent=2) }}
{% endfor %}
{% for name, spec in tools[0].function.parameters.properties.items() %}
- {{ name }}: {{ spec | tojson }}
{% endfor %}
{% endif %}
{% for message in messages %}
{% if 'tool_calls' in message %}
<|assistant|>{% for c in message.tool_calls %}{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}{% endfor %}<|eot|>
{% elif message.role == 'tool' %}
<|ipython|>{{ message.content }}<|eot|>
{% else %}
<|{{ message.role }}|>{{ message.content }}<|eot|>
{% endif %}
{% endfor %}
<|assistant|>"#;

#[test]
fn a_template_iterating_tools_keeps_their_order() {
    let t = ChatTemplate::new(LLAMA_LIKE.into(), "<s>".into(), String::new()).unwrap();
    let tools = tools(
        r#"[{"type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "properties": {"zeta": {"type": "integer"},
                "alpha": {"type": "array", "items": {}}, "mid": {}}}}}]"#,
    );
    let m = messages(
        r#"[{"role": "user", "content": "go"},
                {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                 "function": {"name": "f", "arguments": "{\"zeta\": 1, \"alpha\": []}"}}]},
                {"role": "tool", "tool_call_id": "c", "content": "ok"}]"#,
    );
    let prompt = t.apply_with_tools(&m, Some(&tools), None).unwrap();
    let expected = r#"<s>
<|system|>Tools:
{
  "type": "function",
  "function": {
    "name": "f",
    "parameters": {
      "type": "object",
      "properties": {
        "zeta": {
          "type": "integer"
        },
        "alpha": {
          "type": "array",
          "items": {}
        },
        "mid": {}
      }
    }
  }
}
- zeta: {"type": "integer"}
- alpha: {"type": "array", "items": {}}
- mid: {}
<|user|>go<|eot|>
<|assistant|>{"name": "f", "parameters": {"zeta": 1, "alpha": []}}<|eot|>
<|ipython|>ok<|eot|>
<|assistant|>"#;
    assert_eq!(prompt, expected);
    // No tools: `tools is not none` is false.
    let prompt = t.apply(&m[..1]).unwrap();
    assert_eq!(prompt, "<s>\n<|user|>go<|eot|>\n<|assistant|>");
}

/// The demo model's template: no tools, no tool calls, no tool role.
const PLAIN: &str = "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + \
        '|> ' + message['content'] }}{% if message['role'] == 'assistant' %}{{ eos_token }}\
        {% else %}{{ '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}\
        {{ '<|assistant|>' }}{% endif %}";

#[test]
fn a_template_without_tools_gets_a_tool_prompt() {
    let t = ChatTemplate::new(PLAIN.into(), "<s>".into(), "</s>".into()).unwrap();
    assert!(!t.uses_tools());
    let tools = weather();
    let listing = tool_prompt(&tools, None);
    // Appended to the last user message.
    let m = messages(
        r#"[{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]"#,
    );
    assert_eq!(
        t.apply_with_tools(&m, Some(&tools), None).unwrap(),
        format!(
            "<s><|system|> S\n<|user|> Q1\n<|assistant|> A1</s><|user|> Q2\n\n{listing}\n\
                 <|assistant|>"
        )
    );
    // `tool_prompt` replaces the instruction.
    let prompt = t
        .apply_with_tools(&m, Some(&tools), Some("Answer with a call."))
        .unwrap();
    assert!(
        prompt.contains("\n\nAnswer with a call.\n<|assistant|>"),
        "{prompt}"
    );
    assert!(!prompt.contains(crate::tools::DEFAULT_TOOL_INSTRUCTION));
    // No user message: the system message, else a new one.
    let m = messages(r#"[{"role": "system", "content": "S"}]"#);
    assert_eq!(
        t.apply_with_tools(&m, Some(&tools), None).unwrap(),
        format!("<s><|system|> S\n\n{listing}\n<|assistant|>")
    );
    let m = messages(r#"[{"role": "assistant", "content": "Hi"}]"#);
    assert_eq!(
        t.apply_with_tools(&m, Some(&tools), None).unwrap(),
        format!("<s><|system|> {listing}\n<|assistant|> Hi</s><|assistant|>")
    );
    // Without tools nothing changes.
    let m = messages(r#"[{"role": "user", "content": "Q"}]"#);
    assert_eq!(t.apply(&m).unwrap(), "<s><|user|> Q\n<|assistant|>");
    assert_eq!(
        t.apply_with_tools(&m, None, Some("x")).unwrap(),
        "<s><|user|> Q\n<|assistant|>"
    );
}

#[test]
fn a_template_without_tools_gets_tool_turns_as_plain_chat() {
    let t = ChatTemplate::new(PLAIN.into(), "<s>".into(), "</s>".into()).unwrap();
    let mut m = conversation();
    m.push(ChatMessage::new("user", "Thanks. Tomorrow?"));
    let prompt = t.apply(&m).unwrap();
    assert_eq!(
        prompt,
        "<s><|system|> Be brief.\n<|user|> Weather in Paris, and the time?\n<|assistant|> \
             {\"name\": \"get_weather\", \"arguments\": {\"location\": \"Paris\", \"unit\": \
             \"c\"}}\n{\"name\": \"now\", \"arguments\": {}}</s><|user|> Result of the function \
             call `get_weather`:\n22\n\nResult of the function call `now`:\n12:00\n\nThanks. \
             Tomorrow?\n<|assistant|>"
    );
    // With tools, the prompt goes after the results (the last user message).
    let tools = weather();
    let prompt = t
        .apply_with_tools(&conversation(), Some(&tools), None)
        .unwrap();
    assert!(
        prompt.ends_with(&format!(
            "call `now`:\n12:00\n\n{}\n<|assistant|>",
            tool_prompt(&tools, None)
        )),
        "{prompt}"
    );
    // An assistant's text stays before its calls; an unknown call id is named as is.
    let m = messages(
        r#"[{"role": "user", "content": "Q"},
                {"role": "assistant", "content": "Let me check.", "tool_calls": [
                  {"id": "x", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "y", "content": "r"},
                {"role": "tool", "content": "s"}]"#,
    );
    assert_eq!(
        t.apply(&m).unwrap(),
        "<s><|user|> Q\n<|assistant|> Let me check.\n{\"name\": \"now\", \"arguments\": \
             {}}</s><|user|> Result of the function call `y`:\nr\n\nResult of the function \
             call:\ns\n<|assistant|>"
    );
}

#[test]
fn a_template_handling_the_tool_role_keeps_it() {
    // TEMPLATE refuses tool messages itself: they reach it as they are.
    let t = ChatTemplate::new(TEMPLATE.into(), String::new(), String::new()).unwrap();
    let err = t
        .apply_with_tools(&conversation(), Some(&weather()), None)
        .unwrap_err();
    assert!(err.contains("no tools"), "{err}");
}

#[test]
fn tools_variable_detection() {
    let uses = |source: &str| {
        ChatTemplate::new(source.into(), String::new(), String::new())
            .unwrap()
            .uses_tools()
    };
    assert!(uses("{% if tools %}{{ tools | length }}{% endif %}"));
    assert!(uses("{% for t in tools or [] %}{{ t }}{% endfor %}"));
    assert!(uses("{{ tools is defined }}"));
    assert!(!uses("{# tools #}no tools here: {{ 'tools' }}"));
    assert!(!uses("{% for tools in messages %}{{ tools }}{% endfor %}"));
    assert!(!uses(PLAIN));
}
