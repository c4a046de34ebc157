//! JSON Schema checks for constrained decoding: a schema reaches the shard only if the shard's
//! grammar compiler enforces every keyword it uses. The subset is `proto/json_schema_support.json`
//! (shared with the shard's tests, parsed once here). Every refusal names the request field, the
//! JSON pointer of the offending place in the schema, and what is allowed.

use crate::errors::ValidationError;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::sync::LazyLock;

/// The JSON Schema subset constrained decoding enforces (`proto/json_schema_support.json`).
#[derive(Debug, Deserialize)]
pub struct SchemaSupport {
    /// Keywords the grammar compiler enforces.
    pub keywords: BTreeSet<String>,
    /// Keywords that constrain nothing (accepted, ignored).
    pub annotations: BTreeSet<String>,
    /// `format` values the grammar compiler enforces.
    pub formats: BTreeSet<String>,
    /// Longest schema (compact JSON) or regex, in bytes.
    pub max_schema_bytes: usize,
    /// Deepest nesting of objects and arrays in a schema document (the top object is depth 1).
    pub max_depth: usize,
}

const SUPPORT_JSON: &str = include_str!("../../../proto/json_schema_support.json");

/// The subset, parsed once.
pub static SUPPORT: LazyLock<SchemaSupport> = LazyLock::new(|| {
    serde_json::from_str(SUPPORT_JSON).expect("proto/json_schema_support.json is valid")
});

/// Checks a JSON schema given as a JSON object or as a string holding one; returns it as
/// compact JSON text (what the shard receives), object members in the order the client wrote
/// them (the shard generates them in that order; `serde_json` keeps it: `preserve_order`).
/// `field` names it in refusals (`response_format.schema`, `grammar.value`).
pub fn check_schema(field: &str, schema: &Value) -> Result<String, ValidationError> {
    let support = &*SUPPORT;
    let parsed;
    let schema = match schema {
        Value::String(text) => {
            parsed = serde_json::from_str::<Value>(text).map_err(|e| {
                refuse(format!(
                    "`{field}` must be a JSON schema (an object, or a string holding one); \
                     the string is not JSON: {e}"
                ))
            })?;
            &parsed
        }
        other => other,
    };
    if !schema.is_object() {
        return Err(refuse(format!(
            "`{field}` must be a JSON schema object. Given: {}",
            kind(schema)
        )));
    }
    let text = schema.to_string();
    if text.len() > support.max_schema_bytes {
        return Err(refuse(format!(
            "`{field}` must be at most {} bytes as compact JSON. Given: {}",
            support.max_schema_bytes,
            text.len()
        )));
    }
    if let Some(pointer) = too_deep(schema, 1, support.max_depth, "") {
        return Err(refuse(format!(
            "`{field}` nests objects and arrays deeper than {} levels (at `{pointer}`)",
            support.max_depth
        )));
    }
    if let Err(e) = jsonschema::meta::validate(schema) {
        return Err(refuse(format!(
            "`{field}` is not a valid JSON Schema (draft 2020-12 unless `$schema` names \
             another): at `{}`: {e}",
            pointer_or_root(&e.instance_path().to_string())
        )));
    }
    let walk = Walk {
        support,
        root: schema,
    };
    walk.schema(schema, "")
        .map_err(|why| refuse(format!("`{field}`: {why}")))?;
    Ok(text)
}

/// Checks a regular expression grammar: not empty, at most `max_schema_bytes` (its syntax is
/// checked by the shard when it compiles it).
pub fn check_regex(field: &str, regex: &str) -> Result<(), ValidationError> {
    let max = SUPPORT.max_schema_bytes;
    if regex.is_empty() {
        return Err(refuse(format!("`{field}` must be a non-empty regex")));
    }
    if regex.len() > max {
        return Err(refuse(format!(
            "`{field}` must be at most {max} bytes. Given: {}",
            regex.len()
        )));
    }
    Ok(())
}

fn refuse(message: String) -> ValidationError {
    ValidationError::Constraint(message)
}

/// A JSON type name for messages.
pub(super) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn pointer_or_root(pointer: &str) -> &str {
    if pointer.is_empty() {
        "/"
    } else {
        pointer
    }
}

/// `pointer` extended by one reference token (RFC 6901 escaping).
fn child(pointer: &str, token: &str) -> String {
    format!("{pointer}/{}", token.replace('~', "~0").replace('/', "~1"))
}

/// The pointer of the first object or array deeper than `max` (`depth` is `value`'s own).
fn too_deep(value: &Value, depth: usize, max: usize, pointer: &str) -> Option<String> {
    let children: Vec<(String, &Value)> = match value {
        Value::Object(map) => map.iter().map(|(k, v)| (child(pointer, k), v)).collect(),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| (child(pointer, &i.to_string()), v))
            .collect(),
        _ => return None,
    };
    if depth > max {
        return Some(pointer_or_root(pointer).to_string());
    }
    children
        .into_iter()
        .find_map(|(at, v)| too_deep(v, depth + 1, max, &at))
}

/// The keyword walk over one schema document.
struct Walk<'a> {
    support: &'a SchemaSupport,
    root: &'a Value,
}

impl Walk<'_> {
    /// A (sub)schema: an object of keywords, or a boolean.
    fn schema(&self, schema: &Value, pointer: &str) -> Result<(), String> {
        match schema {
            Value::Bool(_) => Ok(()),
            Value::Object(map) => self.keywords(map, pointer),
            other => Err(format!(
                "a schema must be an object or a boolean; at `{}` it is {}",
                pointer_or_root(pointer),
                kind(other)
            )),
        }
    }

    fn keywords(&self, map: &Map<String, Value>, pointer: &str) -> Result<(), String> {
        let support = self.support;
        for (keyword, value) in map {
            let at = child(pointer, keyword);
            if !support.keywords.contains(keyword) && !support.annotations.contains(keyword) {
                return Err(format!(
                    "keyword `{keyword}` at `{at}` is not supported by constrained decoding; \
                     supported keywords: {}; annotations (accepted, not enforced): {}",
                    join(&support.keywords),
                    join(&support.annotations)
                ));
            }
            match keyword.as_str() {
                "properties" | "$defs" | "definitions" => self.named(value, &at)?,
                "items" if value.is_array() => {
                    return Err(format!(
                        "`items` at `{at}` must be a schema or a boolean (a list of schemas is \
                         `prefixItems`)"
                    ))
                }
                "items" | "additionalProperties" => self.schema(value, &at)?,
                "prefixItems" | "anyOf" | "oneOf" => self.list(value, &at)?,
                "format" => self.format(value, &at)?,
                "$ref" => self.reference(value, &at)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// A map of names to subschemas (`properties`, `$defs`, `definitions`).
    fn named(&self, value: &Value, pointer: &str) -> Result<(), String> {
        let Value::Object(map) = value else {
            return Err(format!("`{pointer}` must be an object of schemas"));
        };
        map.iter()
            .try_for_each(|(name, sub)| self.schema(sub, &child(pointer, name)))
    }

    /// A list of subschemas (`prefixItems`, `anyOf`, `oneOf`).
    fn list(&self, value: &Value, pointer: &str) -> Result<(), String> {
        let Value::Array(items) = value else {
            return Err(format!("`{pointer}` must be a list of schemas"));
        };
        items
            .iter()
            .enumerate()
            .try_for_each(|(i, sub)| self.schema(sub, &child(pointer, &i.to_string())))
    }

    fn format(&self, value: &Value, pointer: &str) -> Result<(), String> {
        let formats = &self.support.formats;
        match value.as_str() {
            Some(format) if formats.contains(format) => Ok(()),
            _ => Err(format!(
                "format {value} at `{pointer}` is not supported by constrained decoding; \
                 supported formats: {}",
                join(formats)
            )),
        }
    }

    /// `$ref` must point into this document: `#`, `#/json/pointer` (which must exist), or
    /// `#anchor`.
    fn reference(&self, value: &Value, pointer: &str) -> Result<(), String> {
        let Some(reference) = value.as_str() else {
            return Err(format!("`$ref` at `{pointer}` must be a string"));
        };
        let Some(fragment) = reference.strip_prefix('#') else {
            return Err(format!(
                "`$ref` at `{pointer}` must be local (start with `#`); remote references are \
                 not fetched. Given: {reference}"
            ));
        };
        if fragment.starts_with('/') && self.root.pointer(&percent_decode(fragment)).is_none() {
            return Err(format!(
                "`$ref` at `{pointer}` points to nothing in the schema. Given: {reference}"
            ));
        }
        Ok(())
    }
}

fn join(names: &BTreeSet<String>) -> String {
    names
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A URI fragment's percent-escapes decoded (invalid escapes are kept as they are).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const FIELD: &str = "response_format.schema";

    fn refusal(schema: Value) -> String {
        match check_schema(FIELD, &schema) {
            Err(ValidationError::Constraint(message)) => message,
            other => panic!("{schema}: expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn the_support_file_parses_and_is_consistent() {
        let s = &*SUPPORT;
        assert!(s.keywords.contains("properties") && s.keywords.contains("$ref"));
        assert!(s.annotations.contains("description"));
        assert!(s.formats.contains("date-time"));
        assert!(s.keywords.is_disjoint(&s.annotations));
        assert_eq!((s.max_schema_bytes, s.max_depth), (65536, 32));
    }

    #[test]
    fn accepts_the_supported_subset_and_returns_compact_json() {
        let schema = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "Person", "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 20, "pattern": "^[A-Z]"},
                "born": {"type": "string", "format": "date"},
                "age": {"type": "integer", "minimum": 0, "exclusiveMaximum": 150},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                "pair": {"type": "array", "prefixItems": [{"type": "number"}, true], "items": false},
                "kind": {"enum": ["a", "b"], "default": "a", "examples": [{"allOf": 1}]},
                "type": {"const": {"not": "a keyword here"}},
                "pet": {"anyOf": [{"$ref": "#/$defs/cat"}, {"type": "null"}]},
                "old": {"$ref": "#/definitions/legacy", "deprecated": true}
            },
            "required": ["name"], "additionalProperties": false,
            "$defs": {"cat": {"type": "object", "additionalProperties": {"type": "boolean"}}},
            "definitions": {"legacy": {"oneOf": [{"type": "string"}, {"type": "number", "multipleOf": 2}]}}
        });
        let text = check_schema(FIELD, &schema).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), schema);
        assert!(!text.contains(": ") && !text.contains('\n'));
        // The same schema as a string holding JSON.
        let as_string = Value::String(schema.to_string());
        assert_eq!(check_schema(FIELD, &as_string).unwrap(), text);
    }

    #[test]
    fn member_order_is_kept_for_the_shard() {
        // The shard generates object members in the order the schema lists them.
        let text = r#"{"type": "object", "required": ["reasoning", "answer"], "properties": {"reasoning": {"type": "string"}, "answer": {"type": "integer"}}}"#;
        let expected = r#"{"type":"object","required":["reasoning","answer"],"properties":{"reasoning":{"type":"string"},"answer":{"type":"integer"}}}"#;
        let as_string = Value::String(text.to_string());
        assert_eq!(check_schema(FIELD, &as_string).unwrap(), expected);
        let as_object: Value = serde_json::from_str(text).unwrap();
        assert_eq!(check_schema(FIELD, &as_object).unwrap(), expected);
    }

    #[test]
    fn property_names_are_not_keywords() {
        let schema = json!({"type": "object", "properties": {
            "allOf": {"type": "string"}, "if": {"type": "integer"}, "a/b~c": {"type": "null"}}});
        assert!(check_schema(FIELD, &schema).is_ok());
        let schema = json!({"$defs": {"not": {"type": "string"}}, "$ref": "#/$defs/not"});
        assert!(check_schema(FIELD, &schema).is_ok());
    }

    #[test]
    fn unsupported_keywords_name_the_field_the_place_and_the_allowed_ones() {
        let cases = [
            (
                json!({"allOf": [{"type": "string"}]}),
                "`allOf` at `/allOf`",
            ),
            (
                json!({"properties": {"a": {"type": "string", "not": {"const": "x"}}}}),
                "`not` at `/properties/a/not`",
            ),
            (
                json!({"properties": {"a/b": {"if": {"type": "string"}}}}),
                "`if` at `/properties/a~1b/if`",
            ),
            (
                json!({"items": {"uniqueItems": true}}),
                "`uniqueItems` at `/items/uniqueItems`",
            ),
            (
                json!({"anyOf": [{"type": "string"}, {"patternProperties": {"x": {}}}]}),
                "`patternProperties` at `/anyOf/1/patternProperties`",
            ),
            (
                json!({"$defs": {"x": {"dependentRequired": {}}}}),
                "`dependentRequired` at `/$defs/x/dependentRequired`",
            ),
            (
                json!({"additionalProperties": {"contains": {"type": "string"}}}),
                "`contains` at `/additionalProperties/contains`",
            ),
            (
                json!({"prefixItems": [{"type": "string", "unevaluatedItems": false}]}),
                "`unevaluatedItems` at `/prefixItems/0/unevaluatedItems`",
            ),
            (json!({"x-custom": 1}), "`x-custom` at `/x-custom`"),
        ];
        for (schema, says) in cases {
            let message = refusal(schema.clone());
            assert!(message.starts_with("`response_format.schema`"), "{message}");
            assert!(message.contains(says), "{schema}: {message}");
            assert!(
                message.contains("supported keywords: $defs, $ref"),
                "{message}"
            );
            assert!(message.contains("annotations (accepted, not enforced)"));
        }
    }

    #[test]
    fn formats_must_be_supported() {
        assert!(check_schema(FIELD, &json!({"type": "string", "format": "uuid"})).is_ok());
        let message = refusal(json!({"properties": {"a": {"format": "credit-card"}}}));
        assert!(
            message.contains("format \"credit-card\" at `/properties/a/format`"),
            "{message}"
        );
        assert!(
            message.contains("supported formats: date, date-time"),
            "{message}"
        );
    }

    #[test]
    fn references_must_be_local_and_resolve() {
        let message = refusal(json!({"$ref": "https://example.com/schema.json"}));
        assert!(
            message.contains("`$ref` at `/$ref` must be local"),
            "{message}"
        );
        let message = refusal(json!({"properties": {"a": {"$ref": "other.json#/x"}}}));
        assert!(message.contains("`/properties/a/$ref`"), "{message}");
        let message = refusal(json!({"$ref": "#/$defs/missing"}));
        assert!(message.contains("points to nothing"), "{message}");
        for ok in [
            json!({"$ref": "#"}),
            json!({"$defs": {"a b": {"type": "string"}}, "$ref": "#/$defs/a%20b"}),
            json!({"$defs": {"a": {"$anchor": "here", "type": "string"}}, "$ref": "#here"}),
        ] {
            assert!(check_schema(FIELD, &ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn the_schema_must_be_an_object_or_a_string_holding_one() {
        for (schema, says) in [
            (
                json!(true),
                "must be a JSON schema object. Given: a boolean",
            ),
            (json!([]), "Given: an array"),
            (json!("[1]"), "Given: an array"),
            (json!("{not json"), "the string is not JSON"),
        ] {
            let message = refusal(schema.clone());
            assert!(message.contains(says), "{schema}: {message}");
        }
    }

    #[test]
    fn the_meta_schema_is_enforced() {
        let message = refusal(json!({"properties": {"a": {"type": "strin"}}}));
        assert!(message.contains("not a valid JSON Schema"), "{message}");
        assert!(message.contains("/properties/a/type"), "{message}");
        let message = refusal(json!({"type": "object", "required": "name"}));
        assert!(message.contains("`/required`"), "{message}");
        let message = refusal(json!({"minLength": -1}));
        assert!(message.contains("`/minLength`"), "{message}");
        // A list of schemas under `items` (draft 7 tuples) is refused with the 2020-12 name.
        let draft7 = json!({"$schema": "http://json-schema.org/draft-07/schema#",
            "items": [{"type": "string"}]});
        assert!(refusal(draft7).contains("`prefixItems`"));
    }

    #[test]
    fn size_limit_is_inclusive() {
        let max = SUPPORT.max_schema_bytes;
        let padded = |len: usize| {
            // {"description":"…"} is 18 bytes around the text.
            json!({"description": "x".repeat(len - 18)})
        };
        assert_eq!(padded(max).to_string().len(), max);
        assert!(check_schema(FIELD, &padded(max)).is_ok());
        let message = refusal(padded(max + 1));
        assert!(
            message.contains(&format!(
                "at most {max} bytes as compact JSON. Given: {}",
                max + 1
            )),
            "{message}"
        );
    }

    #[test]
    fn depth_limit_is_inclusive() {
        let max = SUPPORT.max_depth;
        // Each `anyOf` level adds an array and an object: depth 1 + 2 × levels.
        let nested = |levels: usize, innermost: Value| {
            let mut schema = innermost;
            for _ in 0..levels {
                schema = json!({"anyOf": [schema]});
            }
            schema
        };
        let deepest_ok = (max - 1) / 2;
        let string = json!({"type": "string"});
        assert!(check_schema(FIELD, &nested(deepest_ok, string)).is_ok());
        // Two more levels inside the innermost object: depth max + 1.
        let over = nested(deepest_ok, json!({"enum": [["x"]]}));
        let message = refusal(over);
        assert!(
            message.contains(&format!("deeper than {max} levels (at `/anyOf/0")),
            "{message}"
        );
        assert!(message.contains("/enum/0`"), "{message}");
    }

    #[test]
    fn regexes_must_be_non_empty_and_bounded() {
        let max = SUPPORT.max_schema_bytes;
        assert!(check_regex("grammar.value", "[0-9]+").is_ok());
        assert!(check_regex("grammar.value", &"a".repeat(max)).is_ok());
        let too_long = check_regex("grammar.value", &"a".repeat(max + 1)).unwrap_err();
        assert!(too_long
            .to_string()
            .contains("`grammar.value` must be at most"));
        let empty = check_regex("grammar.value", "").unwrap_err();
        assert_eq!(
            empty.to_string(),
            "`grammar.value` must be a non-empty regex"
        );
    }

    #[test]
    fn pointers_and_decoding() {
        assert_eq!(child("/a", "b/c~d"), "/a/b~1c~0d");
        assert_eq!(percent_decode("/a%20b/%7e%zz"), "/a b/~%zz");
        assert_eq!(kind(&json!(null)), "null");
    }
}
