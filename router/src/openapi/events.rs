//! Server-sent event answers. A handler names the JSON payload of its events (`(Payload =
//! "text/event-stream")`); the document then describes each event as OpenAPI 3.2 and JSON
//! Schema do it: an object whose `data` string holds that JSON (`contentMediaType` and
//! `contentSchema`). A stream that fails after its first event ends with an error event, and
//! the OpenAI streams end with `data: [DONE]`, which is not JSON.

use serde_json::{json, Value};

const EVENT_STREAM: &str = "text/event-stream";
/// Operations with this tag end their streams with `data: [DONE]`.
const OPENAI_TAG: &str = "OpenAI compatible";

/// The schema of one event whose `data` is `payload` (or an error), or `[DONE]` when `done`.
fn event_schema(payload: Value, done: bool) -> Value {
    let json_data = json!({
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [payload, {"$ref": "#/components/schemas/ErrorResponse"}]},
    });
    let data = if done {
        json!({"type": "string", "anyOf": [{"const": "[DONE]"}, json_data],
            "description": "JSON of a chunk or an error; `[DONE]` ends the stream"})
    } else {
        let mut data = json_data;
        data["type"] = json!("string");
        data["description"] = json!("JSON of an event or an error");
        data
    };
    json!({
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": data,
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer", "minimum": 0},
        },
    })
}

/// Rewrites every event stream answer of `doc` from its payload to its events.
pub fn describe_events(doc: &mut Value) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for operation in paths.values_mut().filter_map(Value::as_object_mut) {
        for operation in operation.values_mut() {
            let tags = operation["tags"].as_array().cloned().unwrap_or_default();
            let done = tags.contains(&json!(OPENAI_TAG));
            let Some(responses) = operation
                .get_mut("responses")
                .and_then(Value::as_object_mut)
            else {
                continue;
            };
            for response in responses.values_mut() {
                let payload = response
                    .get_mut("content")
                    .and_then(|c| c.get_mut(EVENT_STREAM))
                    .and_then(|c| c.get_mut("schema"));
                if let Some(payload) = payload {
                    *payload = event_schema(payload.take(), done);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_described_as_events_of_their_payload() {
        let payload = json!({"$ref": "#/components/schemas/StreamResponse"});
        let mut doc = json!({"paths": {
            "/generate_stream": {"post": {"tags": ["LoRAX"], "responses": {"200": {"content": {
                EVENT_STREAM: {"schema": payload}}}}}},
            "/v1/completions": {"post": {"tags": [OPENAI_TAG], "responses": {"200": {"content": {
                "application/json": {"schema": payload}, EVENT_STREAM: {"schema": payload}}}}}},
        }});
        describe_events(&mut doc);
        let lorax = &doc["paths"]["/generate_stream"]["post"]["responses"]["200"]["content"];
        let data = &lorax[EVENT_STREAM]["schema"]["properties"]["data"];
        assert_eq!(data["contentMediaType"], "application/json");
        assert_eq!(data["contentSchema"]["anyOf"][0], payload);
        let openai = &doc["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"];
        assert_eq!(openai["application/json"]["schema"], payload);
        let data = &openai[EVENT_STREAM]["schema"]["properties"]["data"];
        assert_eq!(data["anyOf"][0], json!({"const": "[DONE]"}));
    }
}
