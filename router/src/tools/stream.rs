//! A streamed answer: [`ToolCallStream`] tells, token by token, whether the output is text or
//! a call, and what to send of it ([`ToolDelta`]).

use super::{new_call_id, CALL_TAG};
use serde_json::json;

/// One piece of a streamed chat answer: the `delta` of a chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolDelta {
    /// Text (`{"content": ...}`).
    Content(String),
    /// The call starts: its id and function.
    CallStart { id: String, name: String },
    /// More of the call's arguments text.
    Arguments(String),
}

impl ToolDelta {
    /// The chunk's `delta` object.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Self::Content(text) => json!({"content": text}),
            Self::CallStart { id, name } => json!({"tool_calls": [{
                "index": 0, "id": id, "type": "function",
                "function": {"name": name, "arguments": ""},
            }]}),
            Self::Arguments(piece) => {
                json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            }
        }
    }
}

/// The streamed form of [`parse_call`](super::parse_call): fed the generated text piece by piece
/// (token texts, cut anywhere), it tells what to send.
///
/// Whitespace at the start is held back. If the first other character is not `{` (nor the start
/// of a [`CALL_TAG`] before the `{`), the output is text: everything passes through as content
/// as it comes. If it is `{`, nothing is sent until the call's `name` is complete; then a
/// [`ToolDelta::CallStart`], then the text of the `arguments` value as it is generated, exactly
/// as the model writes it (the pieces concatenate to that value's JSON text: not the wrapper's
/// separators or its closing `}`). Arguments that come before the name are sent right after the
/// start; arguments written as a JSON string are sent once complete, as the string's contents.
/// If the object turns out not to be a call before its name is complete (another shape, or the
/// stream ends), everything held is sent as content and the rest passes through. After the end
/// of the call's object, the rest is ignored.
pub struct ToolCallStream {
    id: String,
    state: State,
    /// The raw text not yet sent, while undecided (until text is certain or the call starts).
    held: String,
    name: Option<String>,
    started: bool,
    args: ArgsState,
    pending_content: String,
    pending_args: String,
    start_pending: bool,
    complete: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ArgsState {
    NotSeen,
    Reading,
    Done,
}

enum State {
    /// Only whitespace so far.
    Lead,
    /// This many characters of [`CALL_TAG`] so far.
    Tag(usize),
    /// After [`CALL_TAG`], before the call's `{`.
    AfterTag,
    /// The output is text.
    Text,
    /// In the call's object, before a key (after `{` or `,`).
    BeforeKey,
    /// Reading a key.
    Key(ValueScan),
    /// After a key, before `:`.
    Colon(String),
    /// After `:`, before the value.
    BeforeValue(String),
    /// Reading a value.
    Value(Role, ValueScan),
    /// After a value, before `,` or `}`.
    AfterValue,
    /// The object is closed (or broken after the call started): the rest is ignored.
    End,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Name,
    Arguments,
    Skip,
}

/// Finds the end of one JSON value, one character at a time.
struct ValueScan {
    raw: String,
    shape: Shape,
    depth: usize,
    in_string: bool,
    escape: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// An object or a list.
    Nested,
    /// A string.
    Str,
    /// A number, `true`, `false` or `null`.
    Scalar,
}

enum Scan {
    More,
    /// The character ended the value.
    Done,
    /// The value ended before the character (which ends a number or literal).
    DoneBefore,
}

impl ValueScan {
    fn start(c: char) -> Self {
        let (shape, depth, in_string) = match c {
            '{' | '[' => (Shape::Nested, 1, false),
            '"' => (Shape::Str, 0, true),
            _ => (Shape::Scalar, 0, false),
        };
        Self {
            raw: c.to_string(),
            shape,
            depth,
            in_string,
            escape: false,
        }
    }

    fn feed(&mut self, c: char) -> Scan {
        if self.shape == Shape::Scalar {
            if c.is_whitespace() || matches!(c, ',' | '}' | ']') {
                return Scan::DoneBefore;
            }
            self.raw.push(c);
            return Scan::More;
        }
        self.raw.push(c);
        if self.in_string {
            if self.escape {
                self.escape = false;
            } else if c == '\\' {
                self.escape = true;
            } else if c == '"' {
                self.in_string = false;
                if self.shape == Shape::Str {
                    return Scan::Done;
                }
            }
            return Scan::More;
        }
        match c {
            '"' => self.in_string = true,
            '{' | '[' => self.depth += 1,
            '}' | ']' => {
                self.depth -= 1;
                if self.depth == 0 {
                    return Scan::Done;
                }
            }
            _ => {}
        }
        Scan::More
    }

    /// The value of a complete string.
    fn string(&self) -> Option<String> {
        serde_json::from_str(&self.raw).ok()
    }
}

impl Default for ToolCallStream {
    fn default() -> Self {
        Self::new()
    }
}

impl ToolCallStream {
    /// A stream whose call (if any) gets a new id.
    pub fn new() -> Self {
        Self::with_id(new_call_id())
    }

    /// A stream whose call (if any) gets `id`.
    pub fn with_id(id: String) -> Self {
        Self {
            id,
            state: State::Lead,
            held: String::new(),
            name: None,
            started: false,
            args: ArgsState::NotSeen,
            pending_content: String::new(),
            pending_args: String::new(),
            start_pending: false,
            complete: false,
        }
    }

    /// Feeds the next piece of generated text; returns what to send (in order; often nothing).
    pub fn push(&mut self, text: &str) -> Vec<ToolDelta> {
        for (i, c) in text.char_indices() {
            if matches!(self.state, State::Text) {
                self.pending_content.push_str(&text[i..]);
                break;
            }
            if matches!(self.state, State::End) {
                break;
            }
            if !self.started {
                self.held.push(c);
            }
            self.step(c);
        }
        self.deltas()
    }

    /// Ends the stream; returns what is left to send. See [`Self::is_call`] for what the output
    /// was.
    pub fn finish(&mut self) -> Vec<ToolDelta> {
        if self.started {
            if self.complete && self.args == ArgsState::NotSeen {
                self.pending_args.push_str("{}");
            }
        } else if !matches!(self.state, State::Text) {
            // Whitespace only, or an object that never became a call: it was text.
            self.pending_content.push_str(&self.held);
            self.held.clear();
            self.state = State::Text;
        }
        self.deltas()
    }

    /// Whether the output is a call (from the moment it started).
    pub fn is_call(&self) -> bool {
        self.started
    }

    /// Whether the call's object is complete.
    pub fn is_complete_call(&self) -> bool {
        self.started && self.complete
    }

    /// The call's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The call's function, once known.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The chunk's `finish_reason` given the generation's (`"stop"` or `"length"`):
    /// "tool_calls" for a complete call, the generation's otherwise (text, or a call cut short).
    pub fn finish_reason(&self, generation: &'static str) -> &'static str {
        if self.is_complete_call() {
            "tool_calls"
        } else {
            generation
        }
    }

    fn deltas(&mut self) -> Vec<ToolDelta> {
        let mut out = Vec::new();
        if !self.pending_content.is_empty() {
            out.push(ToolDelta::Content(std::mem::take(
                &mut self.pending_content,
            )));
        }
        if self.start_pending {
            self.start_pending = false;
            out.push(ToolDelta::CallStart {
                id: self.id.clone(),
                name: self.name.clone().unwrap_or_default(),
            });
        }
        if self.started && !self.pending_args.is_empty() {
            out.push(ToolDelta::Arguments(std::mem::take(&mut self.pending_args)));
        }
        out
    }

    /// Not a call after all: text if the call has not started, else the rest is ignored.
    fn broken(&mut self) {
        if self.started {
            self.state = State::End;
        } else {
            self.pending_content.push_str(&self.held);
            self.held.clear();
            self.state = State::Text;
        }
    }

    fn step(&mut self, c: char) {
        let state = std::mem::replace(&mut self.state, State::End);
        self.state = match state {
            State::Lead if c.is_whitespace() => State::Lead,
            State::Lead if c == '{' => State::BeforeKey,
            State::Lead if c == '<' => State::Tag(1),
            State::Lead => return self.broken(),
            State::Tag(n) if CALL_TAG[n..].starts_with(c) => {
                if n + 1 == CALL_TAG.len() {
                    State::AfterTag
                } else {
                    State::Tag(n + 1)
                }
            }
            State::Tag(_) => return self.broken(),
            State::AfterTag if c.is_whitespace() => State::AfterTag,
            State::AfterTag if c == '{' => State::BeforeKey,
            State::AfterTag => return self.broken(),
            State::Text => {
                self.pending_content.push(c);
                State::Text
            }
            State::BeforeKey => match c {
                _ if c.is_whitespace() => State::BeforeKey,
                '"' => State::Key(ValueScan::start(c)),
                _ => return self.broken(),
            },
            State::Key(mut scan) => match scan.feed(c) {
                Scan::Done => match scan.string() {
                    Some(key) => State::Colon(key),
                    None => return self.broken(),
                },
                _ => State::Key(scan),
            },
            State::Colon(key) => match c {
                _ if c.is_whitespace() => State::Colon(key),
                ':' => State::BeforeValue(key),
                _ => return self.broken(),
            },
            State::BeforeValue(key) => {
                if c.is_whitespace() {
                    State::BeforeValue(key)
                } else if matches!(c, ',' | '}' | ']' | ':') {
                    return self.broken();
                } else {
                    let scan = ValueScan::start(c);
                    let role = match key.as_str() {
                        "name" if self.name.is_none() => Role::Name,
                        "arguments" | "parameters" if self.args == ArgsState::NotSeen => {
                            Role::Arguments
                        }
                        _ => Role::Skip,
                    };
                    if role == Role::Name && scan.shape != Shape::Str {
                        return self.broken();
                    }
                    if role == Role::Arguments {
                        self.args = ArgsState::Reading;
                        if scan.shape == Shape::Nested {
                            self.pending_args.push(c);
                        }
                    }
                    State::Value(role, scan)
                }
            }
            State::Value(role, mut scan) => match scan.feed(c) {
                Scan::More => {
                    if role == Role::Arguments && scan.shape == Shape::Nested {
                        self.pending_args.push(c);
                    }
                    State::Value(role, scan)
                }
                Scan::Done => {
                    if role == Role::Arguments && scan.shape == Shape::Nested {
                        self.pending_args.push(c);
                    }
                    if !self.value_done(role, &scan) {
                        return self.broken();
                    }
                    State::AfterValue
                }
                Scan::DoneBefore => {
                    if !self.value_done(role, &scan) {
                        return self.broken();
                    }
                    self.state = State::AfterValue;
                    return self.step(c);
                }
            },
            State::AfterValue => match c {
                _ if c.is_whitespace() => State::AfterValue,
                ',' => State::BeforeKey,
                '}' if self.name.is_some() => {
                    self.complete = true;
                    State::End
                }
                _ => return self.broken(),
            },
            State::End => State::End,
        };
    }

    /// A value is complete; false when it breaks the call.
    fn value_done(&mut self, role: Role, scan: &ValueScan) -> bool {
        match role {
            Role::Name => match scan.string().filter(|name| !name.is_empty()) {
                Some(name) => {
                    self.name = Some(name);
                    self.started = true;
                    self.start_pending = true;
                    self.held.clear();
                    true
                }
                None => false,
            },
            Role::Arguments => {
                match scan.shape {
                    Shape::Nested => {}
                    Shape::Str => match scan.string() {
                        Some(text) => self.pending_args.push_str(&text),
                        None => return false,
                    },
                    Shape::Scalar => self.pending_args.push_str(&scan.raw),
                }
                self.args = ArgsState::Done;
                true
            }
            Role::Skip => true,
        }
    }
}

#[cfg(test)]
mod tests {
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
}
