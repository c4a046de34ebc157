use super::super::parse_call;
use super::*;
use serde_json::Value;

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
            match serde_json::from_str::<Value>(&whole.arguments) {
                Ok(value) if !text.contains(r#"arguments": ""#) => {
                    assert_eq!(value.to_string(), call.arguments, "{text}")
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
        serde_json::from_str::<Value>(&format!("{{{}}}", args.join(", ")))
            .unwrap()
            .to_string()
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
