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
mod tests;
