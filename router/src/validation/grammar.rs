//! The output constraint of a request, from `grammar` (TGI's form) or `response_format` (LoRAX's
//! and OpenAI's forms), as the shard's `Grammar`. Schemas are checked by `schema`.

use super::schema::{check_regex, check_schema, kind};
use crate::api::GenerateParameters;
use crate::errors::ValidationError;
use crate::pb;
use serde_json::{Map, Value};

/// The request's grammar (None: unconstrained). `grammar` and `response_format` are exclusive;
/// a grammar the router prepared itself (`prepared_grammar`, e.g. for tool calls) is exclusive
/// with both.
pub fn grammar_of(p: &GenerateParameters) -> Result<Option<pb::Grammar>, ValidationError> {
    let grammar = p.grammar.as_ref().filter(|g| !g.is_null());
    let format = p.response_format.as_ref().filter(|f| !f.is_null());
    match (grammar, format, &p.prepared_grammar) {
        (Some(_), Some(_), _) => Err(ValidationError::GrammarConflict),
        (None, None, prepared) => Ok(prepared.clone()),
        (_, _, Some(_)) => Err(ValidationError::Constraint(
            "`grammar` and `response_format` cannot be combined with tools".into(),
        )),
        (Some(grammar), None, None) => from_grammar("grammar", grammar),
        (None, Some(format), None) => from_response_format(format),
    }
}

/// A JSON-schema grammar of type `grammar_type` (JSON or JSON_OR_TEXT) for a schema the caller
/// holds; refusals name `field`. For router code that builds constraints itself (tools).
pub fn schema_grammar(
    field: &str,
    schema: &Value,
    grammar_type: pb::GrammarType,
) -> Result<pb::Grammar, ValidationError> {
    Ok(pb::Grammar {
        r#type: grammar_type as i32,
        value: check_schema(field, schema)?,
    })
}

fn refuse(message: String) -> ValidationError {
    ValidationError::Constraint(message)
}

fn object<'a>(field: &str, value: &'a Value) -> Result<&'a Map<String, Value>, ValidationError> {
    value.as_object().ok_or_else(|| {
        refuse(format!(
            "`{field}` must be an object. Given: {}",
            kind(value)
        ))
    })
}

/// The `type` field of an object, or a refusal naming the allowed values.
fn type_of<'a>(
    field: &str,
    map: &'a Map<String, Value>,
    allowed: &[&str],
) -> Result<&'a str, ValidationError> {
    let given = map.get("type");
    match given.and_then(Value::as_str) {
        Some(t) if allowed.contains(&t) => Ok(t),
        _ => Err(refuse(format!(
            "`{field}.type` must be one of {}. Given: {}",
            allowed.join(", "),
            given.map_or("nothing".to_string(), Value::to_string)
        ))),
    }
}

fn json_grammar(field: &str, schema: &Value) -> Result<Option<pb::Grammar>, ValidationError> {
    schema_grammar(field, schema, pb::GrammarType::Json).map(Some)
}

/// TGI's `{"type": "json", "value": <schema>}` or `{"type": "regex", "value": "<regex>"}`
/// (`json_object` is accepted for `json`), as `field` (`grammar`, or TGI's chat
/// `response_format`).
fn from_grammar(field: &str, grammar: &Value) -> Result<Option<pb::Grammar>, ValidationError> {
    let map = object(field, grammar)?;
    let grammar_type = type_of(field, map, &["json", "json_object", "regex"])?;
    let value_field = format!("{field}.value");
    let value = map.get("value").filter(|v| !v.is_null()).ok_or_else(|| {
        refuse(format!(
            "`{value_field}` is required (a JSON schema, or a regex)"
        ))
    })?;
    if grammar_type != "regex" {
        return json_grammar(&value_field, value);
    }
    let regex = value.as_str().ok_or_else(|| {
        refuse(format!(
            "`{value_field}` must be a regex string. Given: {}",
            kind(value)
        ))
    })?;
    check_regex(&value_field, regex)?;
    Ok(Some(pb::Grammar {
        r#type: pb::GrammarType::Regex as i32,
        value: regex.to_string(),
    }))
}

/// LoRAX's `{"type": "json_object", "schema": ...}` (any JSON object without a schema),
/// `{"type": "json_schema", "schema": ...}`, OpenAI's
/// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`, and
/// `{"type": "text"}` (no constraint), and TGI's chat forms, which name the schema `value`
/// (`{"type": "json_object", "value": ...}`, as `huggingface_hub`'s InferenceClient sends it) and
/// take `{"type": "json" | "regex", "value": ...}` as `grammar` does.
fn from_response_format(format: &Value) -> Result<Option<pb::Grammar>, ValidationError> {
    let map = object("response_format", format)?;
    let format_type = type_of(
        "response_format",
        map,
        &["text", "json_object", "json_schema", "json", "regex"],
    )?;
    if matches!(format_type, "json" | "regex") {
        return from_grammar("response_format", format);
    }
    if let Some(value) = map.get("value").filter(|v| !v.is_null()) {
        if map.get("schema").is_none_or(Value::is_null) {
            return json_grammar("response_format.value", value);
        }
    }
    let schema = map.get("schema").filter(|s| !s.is_null());
    match format_type {
        "text" => Ok(None),
        "json_object" => match schema {
            Some(schema) => json_grammar("response_format.schema", schema),
            None => json_grammar(
                "response_format.schema",
                &serde_json::json!({"type": "object"}),
            ),
        },
        _ => match (schema, map.get("json_schema").filter(|s| !s.is_null())) {
            (Some(schema), _) => json_grammar("response_format.schema", schema),
            (None, Some(nested)) => {
                let nested = object("response_format.json_schema", nested)?;
                let schema = nested
                    .get("schema")
                    .filter(|s| !s.is_null())
                    .ok_or_else(|| {
                        refuse("`response_format.json_schema.schema` is required".to_string())
                    })?;
                json_grammar("response_format.json_schema.schema", schema)
            }
            (None, None) => Err(refuse(
                "`response_format` of type json_schema needs `schema` (or OpenAI's \
                 `json_schema.schema`)"
                    .to_string(),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn with(f: impl FnOnce(&mut GenerateParameters)) -> Result<Option<pb::Grammar>, String> {
        let mut p = GenerateParameters::default();
        f(&mut p);
        grammar_of(&p).map_err(|e| e.to_string())
    }

    fn format(value: Value) -> Result<Option<pb::Grammar>, String> {
        with(|p| p.response_format = Some(value))
    }

    fn grammar(value: Value) -> Result<Option<pb::Grammar>, String> {
        with(|p| p.grammar = Some(value))
    }

    fn json_of(schema: &str) -> Option<pb::Grammar> {
        Some(pb::Grammar {
            r#type: pb::GrammarType::Json as i32,
            value: schema.to_string(),
        })
    }

    #[test]
    fn absent_or_null_is_unconstrained() {
        assert_eq!(with(|_| {}), Ok(None));
        assert_eq!(
            with(|p| {
                p.grammar = Some(Value::Null);
                p.response_format = Some(Value::Null);
            }),
            Ok(None)
        );
        assert_eq!(format(json!({"type": "text"})), Ok(None));
    }

    #[test]
    fn tgi_chat_response_format_forms() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let expected = json_of(&schema.to_string());
        assert_eq!(
            format(json!({"type": "json_object", "value": schema})),
            Ok(expected.clone())
        );
        assert_eq!(
            format(json!({"type": "json", "value": schema})),
            Ok(expected)
        );
        let regex = format(json!({"type": "regex", "value": "[0-9]+"}))
            .unwrap()
            .unwrap();
        assert_eq!(regex.r#type, pb::GrammarType::Regex as i32);
        let err = format(json!({"type": "regex"})).unwrap_err();
        assert!(err.contains("`response_format.value` is required"), "{err}");
        let err = format(json!({"type": "json_object", "value": {"type": 5}})).unwrap_err();
        assert!(err.contains("response_format.value"), "{err}");
    }

    #[test]
    fn response_format_forms() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let expected = json_of(&schema.to_string());
        assert_eq!(
            format(json!({"type": "json_object", "schema": schema})),
            Ok(expected.clone())
        );
        assert_eq!(
            format(json!({"type": "json_schema", "schema": schema})),
            Ok(expected.clone())
        );
        let openai = json!({"type": "json_schema",
            "json_schema": {"name": "thing", "schema": schema, "strict": true}});
        assert_eq!(format(openai), Ok(expected.clone()));
        // A schema held in a string.
        let as_string = json!({"type": "json_object", "schema": schema.to_string()});
        assert_eq!(format(as_string), Ok(expected));
        // json_object without a schema: any JSON object.
        let any = json_of(r#"{"type":"object"}"#);
        assert_eq!(format(json!({"type": "json_object"})), Ok(any.clone()));
        assert_eq!(
            format(json!({"type": "json_object", "schema": null})),
            Ok(any)
        );
    }

    #[test]
    fn response_format_refusals_name_the_field() {
        let cases = [
            (json!("json"), "`response_format` must be an object. Given: a string"),
            (
                json!({"type": "xml"}),
                "`response_format.type` must be one of text, json_object, json_schema, json, regex. Given: \"xml\"",
            ),
            (
                json!({"schema": {}}),
                "`response_format.type` must be one of text, json_object, json_schema, json, regex. Given: nothing",
            ),
            (json!({"type": "json_schema"}), "needs `schema`"),
            (
                json!({"type": "json_schema", "json_schema": {"name": "x"}}),
                "`response_format.json_schema.schema` is required",
            ),
            (
                json!({"type": "json_schema", "json_schema": "x"}),
                "`response_format.json_schema` must be an object",
            ),
            (
                json!({"type": "json_object", "schema": {"allOf": [{"type": "string"}]}}),
                "`response_format.schema`: keyword `allOf` at `/allOf`",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"schema": {"not": {}}}}),
                "`response_format.json_schema.schema`: keyword `not` at `/not`",
            ),
        ];
        for (value, says) in cases {
            let message = format(value.clone()).unwrap_err();
            assert!(message.contains(says), "{value}: {message}");
        }
    }

    #[test]
    fn grammar_forms() {
        let schema = json!({"type": "array", "items": {"type": "string"}});
        let expected = json_of(&schema.to_string());
        assert_eq!(
            grammar(json!({"type": "json", "value": schema})),
            Ok(expected.clone())
        );
        assert_eq!(
            grammar(json!({"type": "json", "value": schema.to_string()})),
            Ok(expected)
        );
        assert_eq!(
            grammar(json!({"type": "regex", "value": "[0-9]{3}"})),
            Ok(Some(pb::Grammar {
                r#type: pb::GrammarType::Regex as i32,
                value: "[0-9]{3}".into()
            }))
        );
    }

    #[test]
    fn grammar_refusals_name_the_field() {
        let cases = [
            (
                json!({"type": "cfg", "value": "x"}),
                "`grammar.type` must be one of json, json_object, regex. Given: \"cfg\"",
            ),
            (json!({"type": "json"}), "`grammar.value` is required"),
            (
                json!({"type": "regex", "value": 5}),
                "`grammar.value` must be a regex string. Given: a number",
            ),
            (
                json!({"type": "regex", "value": ""}),
                "`grammar.value` must be a non-empty regex",
            ),
            (
                json!({"type": "json", "value": {"type": "string", "format": "ipv5"}}),
                "`grammar.value`: format \"ipv5\" at `/format`",
            ),
            (
                json!({"type": "json", "value": "[]"}),
                "`grammar.value` must be a JSON schema object",
            ),
            (json!([1]), "`grammar` must be an object. Given: an array"),
        ];
        for (value, says) in cases {
            let message = grammar(value.clone()).unwrap_err();
            assert!(message.contains(says), "{value}: {message}");
        }
    }

    #[test]
    fn grammar_and_response_format_are_exclusive() {
        let both = with(|p| {
            p.grammar = Some(json!({"type": "regex", "value": "a"}));
            p.response_format = Some(json!({"type": "json_object"}));
        });
        assert_eq!(
            both,
            Err("`grammar` and `response_format` cannot both be set".into())
        );
        // A prepared grammar (tools) is used as it is, and excludes both.
        let prepared = schema_grammar(
            "tools",
            &json!({"type": "object"}),
            pb::GrammarType::JsonOrText,
        )
        .unwrap();
        assert_eq!(prepared.r#type, pb::GrammarType::JsonOrText as i32);
        assert_eq!(
            with(|p| p.prepared_grammar = Some(prepared.clone())),
            Ok(Some(prepared.clone()))
        );
        let conflict = with(|p| {
            p.prepared_grammar = Some(prepared);
            p.response_format = Some(json!({"type": "json_object"}));
        });
        assert!(conflict
            .unwrap_err()
            .contains("cannot be combined with tools"));
        let refused = schema_grammar(
            "tools[0].function.parameters",
            &json!({"not": {}}),
            pb::GrammarType::Json,
        );
        assert!(refused
            .unwrap_err()
            .to_string()
            .starts_with("`tools[0].function.parameters`: keyword `not`"));
    }
}
