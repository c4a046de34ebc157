//! OpenAI's stream framing: `data: {chunk}` events, one per token of each choice (the chunk
//! names its choice by `index`), ending with `data: [DONE]`. Usage comes on the last choice's
//! final chunk, or, with `stream_options.include_usage`, in one extra chunk with no choices (as
//! OpenAI sends it).

use super::body::{
    chat_token_logprob, completion_logprobs, finish_reason, visible_text, Answer, ChatChunkChoice,
    ChatDelta, ChatLogprobs, CompletionChoice, Header, Logprobs, Usage,
};
use crate::api::{FinishReason, StreamResponse};
use crate::errors::ErrorResponse;
use crate::sse::EventEncoder;
use crate::tools::{ToolCallStream, ToolDelta};
use axum::body::Bytes;
use serde::Serialize;

/// Which OpenAI object the answers are.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Completion,
    Chat,
}

impl Kind {
    /// A new response id, prefixed as OpenAI's: `cmpl-…` or `chatcmpl-…`.
    pub fn new_id(self) -> String {
        let prefix = match self {
            Self::Completion => "cmpl",
            Self::Chat => "chatcmpl",
        };
        format!("{prefix}-{:016x}", rand::random::<u64>())
    }

    /// The `object` of a whole answer.
    pub fn object(self) -> &'static str {
        match self {
            Self::Completion => "text_completion",
            Self::Chat => "chat.completion",
        }
    }

    /// The `object` of a stream chunk.
    pub fn chunk_object(self) -> &'static str {
        match self {
            Self::Completion => "text_completion",
            Self::Chat => "chat.completion.chunk",
        }
    }
}

/// One SSE event as OpenAI frames it: `data: {json}` (with a space), chunks and errors alike.
pub fn openai_event<T: Serialize>(payload: &T) -> Bytes {
    let json = serde_json::to_string(payload).unwrap_or_else(|_| "{}".to_string());
    Bytes::from(format!("data: {json}\n\n"))
}

/// What a stream needs to know about its request.
#[derive(Clone, Debug)]
pub struct StreamSettings {
    pub kind: Kind,
    pub id: String,
    pub model: String,
    pub created: u64,
    /// Number of choices.
    pub n: usize,
    pub logprobs: Logprobs,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// The model may call tools: a choice that is a call streams as tool-call deltas.
    pub tools: bool,
}

/// SSE chunks in OpenAI's format for `n` choices, ending with `data: [DONE]` (not after an
/// error).
pub struct OpenAiEncoder {
    settings: StreamSettings,
    /// Per choice: whether its first chunk was sent (a chat choice's first carries the role).
    started: Vec<bool>,
    /// Per choice: bytes of text sent so far (completions' `text_offset`).
    offsets: Vec<usize>,
    finished: usize,
    usage: Usage,
    /// Per choice, with tools: what its text has turned out to be so far (text or a call).
    calls: Vec<ToolCallStream>,
}

impl OpenAiEncoder {
    pub fn new(settings: StreamSettings) -> Self {
        let n = settings.n.max(1);
        Self {
            calls: (0..if settings.tools { n } else { 0 })
                .map(|_| ToolCallStream::new())
                .collect(),
            settings,
            started: vec![false; n],
            offsets: vec![0; n],
            finished: 0,
            usage: Usage::default(),
        }
    }

    /// A chat choice's chunks for one token when tools are offered: the token's text goes
    /// through the choice's `ToolCallStream`, which may hold it back (a call's name is not
    /// complete yet) or turn it into tool-call deltas; each delta is one chunk. The last token
    /// flushes what is held, and its chunk carries the finish reason (`tool_calls` for a call).
    fn tool_chunks(
        &mut self,
        index: usize,
        text: &str,
        logprobs: Option<ChatLogprobs>,
        finish: Option<&'static str>,
        usage: Option<Usage>,
    ) -> Bytes {
        if index >= self.calls.len() {
            self.calls.resize_with(index + 1, ToolCallStream::new);
        }
        let stream = &mut self.calls[index];
        let mut deltas = stream.push(text);
        let reason = finish.map(|native| {
            deltas.extend(stream.finish());
            stream.finish_reason(native).to_string()
        });
        let mut out = Vec::new();
        let count = deltas.len().max(usize::from(reason.is_some()));
        let mut logprobs = logprobs;
        for k in 0..count {
            let first = !std::mem::replace(&mut self.started[index], true);
            let mut delta = ChatDelta {
                role: first.then_some("assistant"),
                content: None,
                tool_calls: None,
            };
            match deltas.get(k) {
                Some(ToolDelta::Content(text)) => delta.content = Some(text.clone()),
                Some(call) => delta.tool_calls = call.to_json()["tool_calls"].as_array().cloned(),
                None => {}
            }
            let last = k + 1 == count;
            let choice = ChatChunkChoice {
                index,
                delta,
                logprobs: logprobs.take(),
                finish_reason: if last { reason.clone() } else { None },
            };
            out.extend_from_slice(&self.chunk(choice, if last { usage } else { None }));
        }
        Bytes::from(out)
    }

    fn header(&self) -> Header {
        let s = &self.settings;
        Header {
            id: s.id.clone(),
            object: s.kind.chunk_object(),
            created: s.created,
            model: s.model.clone(),
        }
    }

    fn chunk<C: Serialize>(&self, choice: C, usage: Option<Usage>) -> Bytes {
        openai_event(&Answer {
            header: self.header(),
            choices: vec![choice],
            usage,
        })
    }
}

impl EventEncoder for OpenAiEncoder {
    fn event(&mut self, index: usize, response: StreamResponse) -> Bytes {
        if index >= self.started.len() {
            self.started.resize(index + 1, false);
            self.offsets.resize(index + 1, 0);
        }
        let reason = response
            .details
            .as_ref()
            .map(|d| finish_reason(d.finish_reason));
        let mut usage = None;
        if response.generated_text.is_some() {
            self.finished += 1;
            if let Some(d) = &response.details {
                self.usage.add_choice(d.prompt_tokens, d.generated_tokens);
            }
            // Without include_usage, the stream's last choice chunk carries the usage.
            let last = self.finished >= self.settings.n;
            if last && !self.settings.include_usage && response.details.is_some() {
                usage = Some(self.usage);
            }
        }
        let token = &response.token;
        let text = visible_text(token).to_string();
        let first = !std::mem::replace(&mut self.started[index], true);
        let offset = self.offsets[index];
        self.offsets[index] += text.len();
        match self.settings.kind {
            Kind::Completion => {
                let logprobs = (self.settings.logprobs == Logprobs::Completion)
                    .then(|| completion_logprobs(std::slice::from_ref(token), offset));
                let choice = CompletionChoice {
                    index,
                    text,
                    logprobs,
                    finish_reason: reason,
                };
                self.chunk(choice, usage)
            }
            Kind::Chat => {
                let logprobs = (self.settings.logprobs == Logprobs::Chat).then(|| ChatLogprobs {
                    content: chat_token_logprob(token).into_iter().collect(),
                });
                if self.settings.tools {
                    self.started[index] = !first; // tool_chunks decides which chunk is first
                    let native = response.generated_text.is_some().then(|| {
                        match response.details.as_ref().map(|d| d.finish_reason) {
                            Some(FinishReason::Length) => "length",
                            _ => "stop",
                        }
                    });
                    return self.tool_chunks(index, &text, logprobs, native, usage);
                }
                let choice = ChatChunkChoice {
                    index,
                    delta: ChatDelta {
                        role: first.then_some("assistant"),
                        content: Some(text),
                        tool_calls: None,
                    },
                    logprobs,
                    finish_reason: reason,
                };
                self.chunk(choice, usage)
            }
        }
    }

    fn error(&mut self, body: &ErrorResponse) -> Bytes {
        openai_event(body)
    }

    fn done(&mut self) -> Option<Bytes> {
        let mut trailer = Vec::new();
        if self.settings.include_usage {
            let usage_chunk = Answer::<ChatChunkChoice> {
                header: self.header(),
                choices: Vec::new(),
                usage: Some(self.usage),
            };
            trailer.extend_from_slice(&openai_event(&usage_chunk));
        }
        trailer.extend_from_slice(b"data: [DONE]\n\n");
        Some(Bytes::from(trailer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{FinishReason, StreamDetails, Token};
    use serde_json::{json, Value};

    fn settings(kind: Kind, n: usize, logprobs: Logprobs, include_usage: bool) -> StreamSettings {
        StreamSettings {
            kind,
            id: "x-1".into(),
            model: "m".into(),
            created: 3,
            n,
            logprobs,
            include_usage,
            tools: false,
        }
    }

    fn event(text: &str, last: Option<u32>) -> StreamResponse {
        StreamResponse {
            token: Token {
                id: 5,
                text: text.into(),
                logprob: -0.5,
                special: false,
                alternative_tokens: None,
                skipped: false,
            },
            top_tokens: vec![],
            generated_text: last.map(|_| "whatever".into()),
            details: last.map(|generated_tokens| StreamDetails {
                finish_reason: FinishReason::Length,
                prompt_tokens: 3,
                generated_tokens,
                seed: None,
            }),
        }
    }

    fn parse(bytes: &Bytes) -> Vec<Value> {
        let text = std::str::from_utf8(bytes).unwrap();
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let data = e.strip_prefix("data: ").unwrap();
                serde_json::from_str(data).unwrap_or(Value::String(data.into()))
            })
            .collect()
    }

    fn tool_settings(n: usize) -> StreamSettings {
        StreamSettings {
            tools: true,
            ..settings(Kind::Chat, n, Logprobs::None, false)
        }
    }

    fn stop_event(text: &str, last: bool) -> StreamResponse {
        let mut e = event(text, last.then_some(9));
        if let Some(d) = e.details.as_mut() {
            d.finish_reason = FinishReason::EndOfSequenceToken;
        }
        e
    }

    #[test]
    fn with_tools_a_call_streams_as_tool_call_deltas() {
        let mut e = OpenAiEncoder::new(tool_settings(1));
        let pieces = [
            "{\"na",
            "me\": \"get_",
            "weather\", \"argu",
            "ments\": {\"ci",
            "ty\": \"Paris\"}",
            "}",
        ];
        let mut chunks = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            chunks.extend(parse(&e.event(0, stop_event(piece, i + 1 == pieces.len()))));
        }
        let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
        // Nothing until the name is complete; then the call's header with the role.
        let start = &deltas[0]["tool_calls"][0];
        assert_eq!(deltas[0]["role"], "assistant");
        assert_eq!(start["index"], 0);
        assert_eq!(start["type"], "function");
        assert_eq!(start["function"]["name"], "get_weather");
        assert!(start["id"].as_str().unwrap().starts_with("call_"));
        let arguments: String = deltas[1..]
            .iter()
            .filter_map(|d| d["tool_calls"][0]["function"]["arguments"].as_str())
            .collect();
        assert_eq!(arguments, "{\"city\": \"Paris\"}");
        assert!(deltas[1..].iter().all(|d| d.get("role").is_none()));
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");
        assert!(chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c["choices"][0]["finish_reason"].is_null()));
    }

    #[test]
    fn with_tools_text_streams_as_content() {
        let mut e = OpenAiEncoder::new(tool_settings(1));
        let first = parse(&e.event(0, stop_event("Sun", false)));
        let last = parse(&e.event(0, stop_event("ny.", true)));
        assert_eq!(first[0]["choices"][0]["delta"]["content"], "Sun");
        assert_eq!(first[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(last[0]["choices"][0]["delta"]["content"], "ny.");
        assert_eq!(last[0]["choices"][0]["finish_reason"], "stop");
    }

    #[test]
    fn chat_chunks_name_their_choice_and_carry_the_role_once_per_choice() {
        let mut e = OpenAiEncoder::new(settings(Kind::Chat, 2, Logprobs::Chat, false));
        let a0 = parse(&e.event(0, event("a", None)))[0].clone();
        let b0 = parse(&e.event(1, event("b", None)))[0].clone();
        let a1 = parse(&e.event(0, event("c", Some(2))))[0].clone();
        let b1 = parse(&e.event(1, event("d", Some(2))))[0].clone();
        assert_eq!(a0["object"], "chat.completion.chunk");
        assert_eq!(a0["choices"][0]["index"], 0);
        assert_eq!(b0["choices"][0]["index"], 1);
        assert_eq!(a0["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(b0["choices"][0]["delta"]["role"], "assistant");
        assert!(a1["choices"][0]["delta"].get("role").is_none());
        assert_eq!(
            a0["choices"][0]["logprobs"],
            json!({"content": [{"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}]})
        );
        // Usage on the final chunk of the last choice to finish, counted over both.
        assert!(a1["usage"].is_null());
        assert_eq!(a1["choices"][0]["finish_reason"], "length");
        assert_eq!(
            b1["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
        );
        assert_eq!(parse(&e.done().unwrap()), vec![json!("[DONE]")]);
    }

    #[test]
    fn include_usage_adds_a_chunk_without_choices() {
        let mut e = OpenAiEncoder::new(settings(Kind::Completion, 1, Logprobs::None, true));
        let last = parse(&e.event(0, event("a", Some(1))))[0].clone();
        assert!(last["usage"].is_null());
        assert!(last["choices"][0]["logprobs"].is_null());
        let trailer = parse(&e.done().unwrap());
        assert_eq!(trailer.len(), 2);
        assert_eq!(trailer[0]["choices"], json!([]));
        assert_eq!(trailer[0]["object"], "text_completion");
        assert_eq!(
            trailer[0]["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4})
        );
        assert_eq!(trailer[1], json!("[DONE]"));
    }

    #[test]
    fn completion_chunks_carry_their_logprobs_and_offsets() {
        let mut e = OpenAiEncoder::new(settings(Kind::Completion, 1, Logprobs::Completion, false));
        parse(&e.event(0, event("ab", None)));
        let second = parse(&e.event(0, event("c", Some(2))))[0].clone();
        assert_eq!(
            second["choices"][0]["logprobs"],
            json!({"tokens": ["c"], "token_logprobs": [-0.5], "top_logprobs": [{}], "text_offset": [2]})
        );
        assert_eq!(second["choices"][0]["text"], "c");
    }
}
