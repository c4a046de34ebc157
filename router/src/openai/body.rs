//! The OpenAI answer objects: completions and chat completions, whole or as stream chunks, with
//! their choices, log-probabilities and usage. Built from native answers (`GenerateResponse`,
//! `StreamResponse`), one choice at a time.

use crate::api::{FinishReason, GenerateResponse, Token};
use crate::tools::{new_call_id, parse_call};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Token counts of an answer (all choices: the prompt counted once).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, ToSchema)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl Usage {
    /// Adds one choice that generated `generated_tokens` after `prompt_tokens`.
    pub fn add_choice(&mut self, prompt_tokens: u32, generated_tokens: u32) {
        self.prompt_tokens = prompt_tokens;
        self.completion_tokens += generated_tokens;
        self.total_tokens = self.prompt_tokens + self.completion_tokens;
    }
}

/// OpenAI's finish reason: `length`, or `stop` (EOS or a stop sequence).
pub fn finish_reason(reason: FinishReason) -> String {
    match reason {
        FinishReason::Length => "length",
        FinishReason::EndOfSequenceToken | FinishReason::StopSequence => "stop",
    }
    .to_string()
}

/// Which log-probabilities a request asked for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Logprobs {
    None,
    /// Chat: `logprobs: true` (alternatives: `top_logprobs`, from `top_n_tokens`).
    Chat,
    /// Completions: `logprobs: k` (k alternatives per position).
    Completion,
}

/// An object of the answer: its id, creation time and model.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Header {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
}

/// A whole answer (`chat.completion`, `text_completion`) or a chunk (`chat.completion.chunk`,
/// `text_completion` when streaming); `C` is the choice type.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Answer<C> {
    #[serde(flatten)]
    pub header: Header,
    pub choices: Vec<C>,
    pub usage: Option<Usage>,
}

/// The assistant's message of a chat choice. `tool_calls` is for tools (unset: not sent).
#[derive(Clone, Debug, Serialize, PartialEq, ToSchema)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub tool_calls: Option<Vec<Value>>,
}

/// One choice of a chat completion.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
}

/// What a chat chunk adds to its choice. `role` is on each choice's first chunk only.
#[derive(Clone, Debug, Serialize, PartialEq, ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub tool_calls: Option<Vec<Value>>,
}

/// One choice of a chat chunk.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
}

/// Chat log-probabilities: `{"content": [...]}`, one entry per generated (non-special) token.
#[derive(Clone, Debug, Serialize, PartialEq, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Clone, Debug, Serialize, PartialEq, ToSchema)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Clone, Debug, Serialize, PartialEq, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// One choice of a completion (whole or chunk).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<String>,
}

/// Completions' log-probabilities: parallel lists, one entry per generated token.
#[derive(Clone, Debug, Serialize, PartialEq, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    /// Per position, the alternatives as `{token: logprob}`.
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    /// Byte offset of each token in the choice's text.
    pub text_offset: Vec<usize>,
}

/// The chat log-probability entry of a generated token (None for special tokens, which are
/// not part of the content).
pub fn chat_token_logprob(token: &Token) -> Option<ChatTokenLogprob> {
    if token.special {
        return None;
    }
    let top_logprobs = token
        .alternative_tokens
        .iter()
        .flatten()
        .map(|t| TopLogprob {
            token: t.text.clone(),
            logprob: t.logprob,
            bytes: t.text.as_bytes().to_vec(),
        })
        .collect();
    Some(ChatTokenLogprob {
        token: token.text.clone(),
        logprob: token.logprob,
        bytes: token.text.as_bytes().to_vec(),
        top_logprobs,
    })
}

/// Chat log-probabilities of `tokens`.
pub fn chat_logprobs(tokens: &[Token]) -> ChatLogprobs {
    ChatLogprobs {
        content: tokens.iter().filter_map(chat_token_logprob).collect(),
    }
}

/// Completions' log-probabilities of `tokens`, whose text starts at byte `offset` of the
/// choice's text. Special tokens add no text.
pub fn completion_logprobs(tokens: &[Token], mut offset: usize) -> CompletionLogprobs {
    let mut logprobs = CompletionLogprobs {
        tokens: Vec::new(),
        token_logprobs: Vec::new(),
        top_logprobs: Vec::new(),
        text_offset: Vec::new(),
    };
    for token in tokens {
        let text = visible_text(token);
        logprobs.tokens.push(token.text.clone());
        logprobs.token_logprobs.push(token.logprob);
        let mut top = BTreeMap::new();
        for alt in token.alternative_tokens.iter().flatten() {
            let entry = top.entry(alt.text.clone()).or_insert(alt.logprob);
            *entry = entry.max(alt.logprob);
        }
        logprobs.top_logprobs.push(top);
        logprobs.text_offset.push(offset);
        offset += text.len();
    }
    logprobs
}

/// The text a token adds to the answer (special tokens add none).
pub fn visible_text(token: &Token) -> &str {
    if token.special {
        ""
    } else {
        &token.text
    }
}

/// The chat choice of a native answer (details are always asked for by the OpenAI routes).
pub fn chat_choice(
    index: usize,
    answer: GenerateResponse,
    logprobs: Logprobs,
    tools: bool,
) -> ChatChoice {
    let details = answer.details;
    let mut reason = details.as_ref().map(|d| finish_reason(d.finish_reason));
    // With tools, an answer that is a call becomes `tool_calls` (and `finish_reason` says so).
    let call = tools.then(|| parse_call(&answer.generated_text)).flatten();
    let message = match call {
        Some(call) => {
            reason = Some("tool_calls".to_string());
            AssistantMessage {
                role: "assistant",
                content: None,
                tool_calls: Some(vec![call.to_openai(&new_call_id())]),
            }
        }
        None => AssistantMessage {
            role: "assistant",
            content: Some(answer.generated_text),
            tool_calls: None,
        },
    };
    ChatChoice {
        index,
        logprobs: details
            .as_ref()
            .filter(|_| logprobs == Logprobs::Chat)
            .map(|d| chat_logprobs(&d.tokens)),
        finish_reason: reason,
        message,
    }
}

/// The completion choice of a native answer.
pub fn completion_choice(
    index: usize,
    answer: GenerateResponse,
    logprobs: Logprobs,
) -> CompletionChoice {
    let details = answer.details;
    CompletionChoice {
        index,
        logprobs: details
            .as_ref()
            .filter(|_| logprobs == Logprobs::Completion)
            .map(|d| completion_logprobs(&d.tokens, 0)),
        finish_reason: details.as_ref().map(|d| finish_reason(d.finish_reason)),
        text: answer.generated_text,
    }
}

/// The usage of native answers (the choices of one request).
pub fn usage_of(answers: &[GenerateResponse]) -> Option<Usage> {
    let mut usage = Usage::default();
    for answer in answers {
        let details = answer.details.as_ref()?;
        usage.add_choice(details.prompt_tokens, details.generated_tokens);
    }
    Some(usage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AlternativeToken, Details};
    use serde_json::json;

    fn token(text: &str, logprob: f32, special: bool, alternatives: &[(&str, f32)]) -> Token {
        Token {
            id: 1,
            text: text.into(),
            logprob,
            special,
            alternative_tokens: (!alternatives.is_empty()).then(|| {
                alternatives
                    .iter()
                    .map(|(t, l)| AlternativeToken {
                        id: 2,
                        text: t.to_string(),
                        logprob: *l,
                    })
                    .collect()
            }),
            skipped: false,
        }
    }

    fn answer(tokens: Vec<Token>) -> GenerateResponse {
        GenerateResponse {
            generated_text: tokens.iter().map(visible_text).collect(),
            details: Some(Details {
                finish_reason: FinishReason::EndOfSequenceToken,
                prompt_tokens: 4,
                generated_tokens: tokens.len() as u32,
                skipped_tokens: 0,
                seed: None,
                prefill: vec![],
                tokens,
                top_tokens: vec![],
                best_of_sequences: None,
            }),
        }
    }

    #[test]
    fn chat_logprobs_in_openai_format() {
        let tokens = vec![
            token(" é", -0.5, false, &[(" é", -0.5), (" e", -1.5)]),
            token("</s>", -0.1, true, &[]),
        ];
        let choice = chat_choice(1, answer(tokens), Logprobs::Chat, false);
        let v = serde_json::to_value(&choice).unwrap();
        assert_eq!(
            v,
            json!({"index": 1, "finish_reason": "stop",
                "message": {"role": "assistant", "content": " é"},
                "logprobs": {"content": [{"token": " é", "logprob": -0.5, "bytes": [32, 195, 169],
                    "top_logprobs": [{"token": " é", "logprob": -0.5, "bytes": [32, 195, 169]},
                                     {"token": " e", "logprob": -1.5, "bytes": [32, 101]}]}]}})
        );
        let plain = chat_choice(
            0,
            answer(vec![token("a", -1.0, false, &[])]),
            Logprobs::None,
            false,
        );
        assert!(serde_json::to_value(&plain).unwrap()["logprobs"].is_null());
    }

    #[test]
    fn with_tools_a_call_becomes_tool_calls_and_text_stays_content() {
        let call = r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#;
        let choice = chat_choice(
            0,
            answer(vec![token(call, -1.0, false, &[])]),
            Logprobs::None,
            true,
        );
        let v = serde_json::to_value(&choice).unwrap();
        assert_eq!(v["finish_reason"], "tool_calls");
        assert!(v["message"]["content"].is_null());
        let calls = v["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1);
        assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
        assert_eq!(calls[0]["type"], "function");
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        assert_eq!(calls[0]["function"]["arguments"], r#"{"city":"Paris"}"#);
        let text = chat_choice(
            0,
            answer(vec![token("Sunny.", -1.0, false, &[])]),
            Logprobs::None,
            true,
        );
        let v = serde_json::to_value(&text).unwrap();
        assert_eq!(v["message"]["content"], "Sunny.");
        assert_eq!(v["finish_reason"], "stop");
        // Without tools, JSON text is just content.
        let plain = chat_choice(
            0,
            answer(vec![token(call, -1.0, false, &[])]),
            Logprobs::None,
            false,
        );
        assert_eq!(
            serde_json::to_value(&plain).unwrap()["message"]["content"],
            call
        );
    }

    #[test]
    fn completion_logprobs_with_alternatives_and_offsets() {
        let tokens = vec![
            token("ab", -0.5, false, &[("ab", -0.5), ("a", -2.0), ("a", -1.0)]),
            token("c", -0.25, false, &[]),
            token("</s>", -0.1, true, &[]),
        ];
        let logprobs = completion_logprobs(&tokens, 3);
        assert_eq!(logprobs.text_offset, vec![3, 5, 6]);
        assert_eq!(logprobs.token_logprobs, vec![-0.5, -0.25, -0.1]);
        let top = serde_json::to_value(&logprobs.top_logprobs).unwrap();
        // Duplicated texts keep their best log-probability.
        assert_eq!(top, json!([{"ab": -0.5, "a": -1.0}, {}, {}]));
        let choice = completion_choice(2, answer(tokens), Logprobs::Completion);
        assert_eq!(choice.text, "abc");
        assert_eq!(choice.logprobs.unwrap().text_offset, vec![0, 2, 3]);
    }

    #[test]
    fn usage_counts_the_prompt_once() {
        let answers = [
            answer(vec![token("a", -1.0, false, &[])]),
            answer(vec![token("b", -1.0, false, &[]); 3]),
        ];
        assert_eq!(
            usage_of(&answers),
            Some(Usage {
                prompt_tokens: 4,
                completion_tokens: 4,
                total_tokens: 8
            })
        );
    }

    #[test]
    fn answers_flatten_their_header() {
        let answer = Answer {
            header: Header {
                id: "chatcmpl-1".into(),
                object: "chat.completion.chunk",
                created: 7,
                model: "m".into(),
            },
            choices: Vec::<ChatChunkChoice>::new(),
            usage: None,
        };
        assert_eq!(
            serde_json::to_value(&answer).unwrap(),
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7,
                "model": "m", "choices": [], "usage": null})
        );
    }
}
