//! The OpenAPI 3 document of the HTTP API (hand-written, served at `/api-doc/openapi.json`) and
//! the `/docs` page rendered from it (self-contained HTML: no assets fetched from anywhere).

use crate::api::Info;
use serde_json::{json, Value};

fn error_responses() -> Value {
    let error = json!({"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}});
    let with = |description: &str| {
        let mut e = error.clone();
        e["description"] = json!(description);
        e
    };
    json!({
        "400": with("Malformed JSON"),
        "413": with("Body too large"),
        "415": with("Content type is not application/json"),
        "401": with("Private adapter: api_token missing or invalid"),
        "403": with("Private adapter: the api_token has no access"),
        "422": with("Input validation error (bad parameters, unknown or invalid adapter)"),
        "424": with("Generation error (a shard failed, an adapter source is unreachable, ...)"),
        "429": with("Model is overloaded (max_concurrent_requests)"),
    })
}

fn error_responses_with_ok(description: &str) -> Value {
    let mut responses = error_responses();
    responses["200"] = json!({"description": description});
    responses
}

fn generate_operation(summary: &str, request: &str, ok: Value) -> Value {
    let mut responses = error_responses();
    responses["200"] = ok;
    json!({
        "tags": ["LoRAX"],
        "summary": summary,
        "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{request}")}}}},
        "responses": responses,
    })
}

fn adapter_operation(summary: &str) -> Value {
    let mut responses = error_responses();
    let error = responses["422"].clone();
    let with = |description: &str| {
        let mut e = error.clone();
        e["description"] = json!(description);
        e
    };
    responses["404"] = with("The adapter is not tracked");
    responses["409"] =
        with("Not possible in the adapter's state (in use, loading, pinned, pin limit)");
    responses["200"] = json!({"description": "The adapter",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/AdapterStatus"}}}});
    json!({
        "tags": ["Adapters"],
        "summary": summary,
        "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/AdapterRef"}}}},
        "responses": responses,
    })
}

fn health_operation(summary: &str) -> Value {
    json!({"tags": ["LoRAX"], "summary": summary,
        "responses": {"200": {"description": "Healthy"}, "503": {"description": "Unhealthy",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}}})
}

/// Every component schema: the requests' and the answers'.
fn schemas() -> Value {
    let mut all = request_schemas();
    if let (Some(all), Value::Object(more)) = (all.as_object_mut(), answer_schemas()) {
        all.extend(more);
    }
    all
}

/// What generation requests send.
fn request_schemas() -> Value {
    let num = json!({"type": "number", "nullable": true});
    let int = json!({"type": "integer", "nullable": true, "minimum": 1});
    json!({
        "GenerateParameters": {"type": "object", "properties": {
            "adapter_id": {"type": "string", "nullable": true, "description": "LoRA adapter; absent: the default adapter or the base model"},
            "adapter_source": {"type": "string", "nullable": true, "enum": ["hub", "local", "s3"]},
            "merged_adapters": {"allOf": [{"$ref": "#/components/schemas/MergedAdapters"}], "nullable": true},
            "api_token": {"type": "string", "nullable": true, "description": "Token for a private adapter (this request only; never echoed); default: the `Authorization: Bearer` token"},
            "best_of": int, "temperature": num, "repetition_penalty": num,
            "top_k": int, "top_p": num, "typical_p": num,
            "do_sample": {"type": "boolean", "default": false,
                "description": "sample; also on when temperature != 1, top_k > 0, top_p < 1 or typical_p < 1"},
            "max_new_tokens": {"type": "integer", "nullable": true, "minimum": 1,
                "description": "default: max_total_tokens - input tokens"},
            "ignore_eos_token": {"type": "boolean", "default": false},
            "return_full_text": {"type": "boolean", "nullable": true, "default": false},
            "stop": {"type": "array", "items": {"type": "string"}},
            "truncate": int,
            "watermark": {"type": "boolean", "default": false, "description": "not supported: true → 422"},
            "details": {"type": "boolean", "default": true},
            "decoder_input_details": {"type": "boolean", "default": false},
            "top_n_tokens": {"type": "integer", "nullable": true},
            "return_k_alternatives": {"type": "integer", "nullable": true},
            "seed": {"type": "integer", "nullable": true},
            "frequency_penalty": {"type": "number", "nullable": true, "minimum": -2, "maximum": 2, "default": 0},
            "presence_penalty": {"type": "number", "nullable": true, "minimum": -2, "maximum": 2, "default": 0},
            "response_format": {"type": "object", "nullable": true,
                "description": "JSON output: {type: json_object, schema?} | {type: json_schema, schema} | {type: json_schema, json_schema: {name, schema, strict}} | {type: text}; the schema within the subset of proto/json_schema_support.json"},
            "grammar": {"type": "object", "nullable": true,
                "description": "TGI's form: {type: json, value: schema} | {type: regex, value: regex}; exclusive with response_format"},
        }},
        "GenerateRequest": {"type": "object", "required": ["inputs"], "properties": {
            "inputs": {"type": "string", "example": "My name is Olivier and I"},
            "parameters": {"$ref": "#/components/schemas/GenerateParameters"},
        }},
        "CompatGenerateRequest": {"type": "object", "required": ["inputs"], "properties": {
            "inputs": {"type": "string"},
            "parameters": {"$ref": "#/components/schemas/GenerateParameters"},
            "stream": {"type": "boolean", "default": false},
        }},
    })
}

/// What the endpoints answer (and the adapter management bodies).
fn answer_schemas() -> Value {
    json!({
        "Token": {"type": "object", "properties": {
            "id": {"type": "integer"}, "text": {"type": "string"}, "logprob": {"type": "number"},
            "special": {"type": "boolean"}, "skipped": {"type": "boolean"},
            "alternative_tokens": {"type": "array", "items": {"type": "object"}},
        }},
        "PrefillToken": {"type": "object", "properties": {
            "id": {"type": "integer"}, "text": {"type": "string"}, "logprob": {"type": "number", "nullable": true},
        }},
        "FinishReason": {"type": "string", "enum": ["length", "eos_token", "stop_sequence"]},
        "Details": {"type": "object", "properties": {
            "finish_reason": {"$ref": "#/components/schemas/FinishReason"},
            "prompt_tokens": {"type": "integer"}, "generated_tokens": {"type": "integer"},
            "skipped_tokens": {"type": "integer"},
            "seed": {"type": "integer", "nullable": true},
            "prefill": {"type": "array", "items": {"$ref": "#/components/schemas/PrefillToken"}},
            "tokens": {"type": "array", "items": {"$ref": "#/components/schemas/Token"}},
            "best_of_sequences": {"type": "array", "items": {"type": "object"}},
        }},
        "GenerateResponse": {"type": "object", "properties": {
            "generated_text": {"type": "string"},
            "details": {"$ref": "#/components/schemas/Details"},
        }},
        "StreamResponse": {"type": "object", "properties": {
            "token": {"$ref": "#/components/schemas/Token"},
            "generated_text": {"type": "string", "nullable": true},
            "details": {"type": "object", "nullable": true},
        }},
        "ErrorResponse": {"type": "object", "properties": {
            "error": {"type": "string"},
            "error_type": {"type": "string", "example": "validation"},
        }},
        "TokenizeRequest": {"type": "object", "required": ["inputs"], "properties": {
            "inputs": {"type": "string"},
            "add_special_tokens": {"type": "boolean", "default": true},
        }},
        "SimpleToken": {"type": "object", "properties": {
            "id": {"type": "integer"}, "text": {"type": "string"},
            "start": {"type": "integer"}, "stop": {"type": "integer"},
        }},
        "Info": {"type": "object"},
        "MergedAdapters": {"type": "object", "required": ["ids"], "properties": {
            "ids": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "weights": {"type": "array", "items": {"type": "number"}, "description": "one per id; default 1.0 each"},
            "merge_strategy": {"type": "string", "enum": ["linear", "ties", "dare_linear", "dare_ties"], "default": "linear"},
            "density": {"type": "number", "minimum": 0, "exclusiveMinimum": true, "maximum": 1, "default": 1.0},
            "majority_sign_method": {"type": "string", "enum": ["total", "frequency"], "default": "total"},
        }},
        "AdapterRef": {"type": "object", "properties": {
            "adapter_id": {"type": "string"},
            "merged_adapters": {"$ref": "#/components/schemas/MergedAdapters"},
            "adapter_source": {"type": "string", "enum": ["hub", "local", "s3"]},
            "api_token": {"type": "string"},
            "pin": {"type": "boolean", "default": false, "description": "load only: pin once active"},
        }},
        "AdapterStatus": {"type": "object", "properties": {
            "adapter_id": {"type": "string"}, "adapter_ids": {"type": "array", "items": {"type": "string"}},
            "merged_adapters": {"allOf": [{"$ref": "#/components/schemas/MergedAdapters"}], "nullable": true},
            "adapter_source": {"type": "string"}, "private": {"type": "boolean"},
            "state": {"type": "string", "enum": ["queued", "downloading", "downloaded", "loading", "active", "offloading", "failed"]},
            "index": {"type": "integer", "nullable": true}, "pinned": {"type": "boolean"},
            "draining": {"type": "boolean"}, "queued": {"type": "integer"}, "running": {"type": "integer"},
            "memory_fraction": {"type": "number", "nullable": true},
            "active_for_s": {"type": "number", "nullable": true},
            "last_error": {"type": "string", "nullable": true},
        }},
    })
}

/// The OpenAPI document.
pub fn spec(info: &Info) -> Value {
    let json_of = |schema: &str| json!({"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}});
    let sse =
        json!({"text/event-stream": {"schema": {"$ref": "#/components/schemas/StreamResponse"}}});
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "LoRAX-compatible router",
            "description": format!("Serving {}", info.model_id),
            "version": info.version,
        },
        "paths": {
            "/": {"get": health_operation("Health check (as `GET /health`)"), "post": generate_operation(
                "Generate text; `stream` picks a JSON list of one answer or an SSE stream",
                "CompatGenerateRequest",
                json!({"description": "Generated text", "content": {
                    "application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/GenerateResponse"}}},
                    "text/event-stream": sse["text/event-stream"].clone(),
                }}),
            )},
            "/generate": {"post": generate_operation(
                "Generate text", "GenerateRequest",
                json!({"description": "Generated text", "content": json_of("GenerateResponse")}),
            )},
            "/generate_stream": {"post": generate_operation(
                "Generate a stream of tokens (server-sent events `data:{json}`)", "GenerateRequest",
                json!({"description": "Token events; the last carries generated_text and details", "content": sse}),
            )},
            "/health": {"get": health_operation("Healthy when every shard answers")},
            "/ping": {"get": health_operation("Health check (as `GET /health`; SageMaker's route)")},
            "/info": {"get": {"tags": ["LoRAX"], "summary": "Model and router limits",
                "responses": {"200": {"description": "Info", "content": json_of("Info")}}}},
            "/metrics": {"get": {"tags": ["LoRAX"], "summary": "Prometheus metrics",
                "responses": {"200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/v1/completions": {"post": {"tags": ["OpenAI compatible"],
                "summary": "OpenAI completions (`stream` for SSE chunks ending with `data: [DONE]`, `n` choices, `logprobs`, `response_format`); `model` names the adapter",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": error_responses_with_ok("Completion")}},
            "/v1/chat/completions": {"post": {"tags": ["OpenAI compatible"],
                "summary": "OpenAI chat completions, prompt built by the tokenizer's chat template (`n` choices, `logprobs`/`top_logprobs`, `response_format`, `stream_options`)",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": error_responses_with_ok("Chat completion")}},
            "/v1/models": {"get": {"tags": ["OpenAI compatible"], "summary": "The served model",
                "responses": {"200": {"description": "Model list"}}}},
            "/adapters": {"get": {"tags": ["Adapters"], "summary": "Tracked adapters (state, index, counts) and recent failures",
                "responses": {"200": {"description": "Adapters", "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/AdapterStatus"}}}}}}}},
            "/adapters/load": {"post": adapter_operation("Download and activate an adapter (optionally pin it); answers once active")},
            "/adapters/unload": {"post": adapter_operation("Offload an idle adapter from the device (409 while in use or pinned)")},
            "/adapters/pin": {"post": adapter_operation("Pin a tracked adapter: never drained or offloaded")},
            "/adapters/unpin": {"post": adapter_operation("Unpin a tracked adapter")},
            "/tokenize": {"post": {"tags": ["LoRAX"], "summary": "Tokenize a prompt",
                "requestBody": {"required": true, "content": json_of("TokenizeRequest")},
                "responses": {"200": {"description": "Tokens", "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/SimpleToken"}}}}}}}},
        },
        "components": {"schemas": schemas()},
    })
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A self-contained HTML page listing the operations of `spec`.
pub fn docs_html(spec: &Value) -> String {
    let mut rows = String::new();
    if let Some(paths) = spec["paths"].as_object() {
        for (path, operations) in paths {
            for (method, op) in operations.as_object().into_iter().flatten() {
                let codes: Vec<&String> = op["responses"]
                    .as_object()
                    .map(|r| r.keys().collect())
                    .unwrap_or_default();
                let codes: Vec<&str> = codes.iter().map(|c| c.as_str()).collect();
                rows.push_str(&format!(
                    "<tr><td><b>{}</b></td><td><code>{}</code></td><td>{}</td><td>{}</td></tr>\n",
                    method.to_uppercase(),
                    escape(path),
                    escape(op["summary"].as_str().unwrap_or("")),
                    codes.join(", ")
                ));
            }
        }
    }
    let title = escape(spec["info"]["title"].as_str().unwrap_or("API"));
    let description = escape(spec["info"]["description"].as_str().unwrap_or(""));
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>body{{font-family:sans-serif;margin:2em}}td{{padding:4px 12px;border-bottom:1px solid #ddd}}</style>\
         </head><body><h1>{title}</h1><p>{description}</p>\
         <p>Machine-readable: <a href=\"/api-doc/openapi.json\">/api-doc/openapi.json</a></p>\
         <table><tr><th>Method</th><th>Path</th><th>Summary</th><th>Statuses</th></tr>\n{rows}</table>\
         </body></html>"
    )
}
