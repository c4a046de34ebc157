//! The constraint of a call: [`call_schema`] (the JSON schema of one call, the functions'
//! `$defs` moved to its root and their `$ref`s rewritten) and [`grammar`] (which grammar the
//! shard gets for a `tool_choice`).

use super::{FunctionDefinition, Tool, ToolChoice, Tools};
use crate::pb;
use serde_json::{json, Map, Value};

/// Which grammar type the shard gets (see `GrammarType` in `proto/generate.proto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrammarKind {
    /// The output is one JSON value valid against the schema.
    Json,
    /// The output is JSON valid against the schema, or text that does not start with `{`.
    JsonOrText,
}

impl GrammarKind {
    pub fn grammar_type(self) -> pb::GrammarType {
        match self {
            Self::Json => pb::GrammarType::Json,
            Self::JsonOrText => pb::GrammarType::JsonOrText,
        }
    }

    /// The shard's `Grammar` of this kind for `schema`.
    pub fn to_pb(self, schema: String) -> pb::Grammar {
        pb::Grammar {
            r#type: self.grammar_type() as i32,
            value: schema,
        }
    }
}

impl Tools {
    /// The grammar that constrains the output (see [`grammar`]).
    pub fn grammar(&self) -> Option<(GrammarKind, String)> {
        grammar(&self.tools, &self.choice)
    }

    /// The same as the shard's message. Its `value` lists the schema's members in order (so
    /// the call's `name` is generated before its `arguments`).
    pub fn pb_grammar(&self) -> Option<pb::Grammar> {
        self.grammar().map(|(kind, schema)| kind.to_pb(schema))
    }

    /// Each function's parameters schema (absent: the empty-object schema) and the field that
    /// names it in a refusal (`tools[i].function.parameters`), for the router's check of the
    /// JSON Schema subset the shard enforces.
    pub fn parameter_schemas(&self) -> Vec<(String, Value)> {
        self.tools
            .iter()
            .enumerate()
            .map(|(i, t)| {
                (
                    format!("tools[{i}].function.parameters"),
                    t.function.parameters(),
                )
            })
            .collect()
    }
}

/// The grammar for `choice`: none → None; auto → JSON or text, the schema of a call of any
/// tool; required → JSON, a call of any tool; a named function → JSON, a call of that one.
/// (`choice` as returned by [`validate`](super::validate); a name not in `tools` gives None.)
pub fn grammar(tools: &[Tool], choice: &ToolChoice) -> Option<(GrammarKind, String)> {
    if tools.is_empty() {
        return None;
    }
    match choice {
        ToolChoice::None => None,
        ToolChoice::Auto => Some((GrammarKind::JsonOrText, call_schema(tools))),
        ToolChoice::Required => Some((GrammarKind::Json, call_schema(tools))),
        ToolChoice::Function(name) => {
            let tool = tools.iter().find(|t| t.function.name == *name)?;
            Some((GrammarKind::Json, call_schema(std::slice::from_ref(tool))))
        }
    }
}

/// The JSON schema (as compact JSON text, members in this order) of one call of one of
/// `tools`: for one function
/// `{"type": "object", "properties": {"name": {"const": "<name>"}, "arguments": <parameters>},
/// "required": ["name", "arguments"], "additionalProperties": false}`, for several `{"anyOf":
/// [...]}` of those.
///
/// A function's `$defs` (and `definitions`) move to the root's `$defs`, named
/// `<function>.defs.<name>` (`<function>.definitions.<name>`), and its local `$ref`s are
/// rewritten to match: `#/$defs/X` to the moved definition, any other `#...` pointer to the
/// place the parameters now have inside the call's schema.
pub fn call_schema(tools: &[Tool]) -> String {
    let mut defs = Map::new();
    let mut schema = if let [tool] = tools {
        call_object(&tool.function, "/properties/arguments", &mut defs)
    } else {
        let calls: Vec<Value> = tools
            .iter()
            .enumerate()
            .map(|(i, t)| {
                call_object(
                    &t.function,
                    &format!("/anyOf/{i}/properties/arguments"),
                    &mut defs,
                )
            })
            .collect();
        json!({ "anyOf": calls })
    };
    if let Value::Object(members) = &mut schema {
        if !defs.is_empty() {
            members.insert("$defs".to_string(), Value::Object(defs));
        }
    }
    schema.to_string()
}

/// The schema of a call of `f`, its parameters placed at `embed_at` (a JSON pointer from the
/// root); its definitions are added to `defs`.
fn call_object(f: &FunctionDefinition, embed_at: &str, defs: &mut Map<String, Value>) -> Value {
    let mut parameters = f.parameters();
    if let Value::Object(members) = &mut parameters {
        for (key, value) in std::mem::take(members) {
            let segment = match key.as_str() {
                "$defs" => "defs",
                "definitions" => "definitions",
                _ => {
                    members.insert(key, value);
                    continue;
                }
            };
            match value {
                Value::Object(named) => {
                    for (name, mut schema) in named {
                        rewrite_refs(&mut schema, &f.name, embed_at);
                        defs.insert(format!("{}.{segment}.{name}", f.name), schema);
                    }
                }
                other => {
                    members.insert(key, other);
                }
            }
        }
    }
    rewrite_refs(&mut parameters, &f.name, embed_at);
    json!({
        "type": "object",
        "properties": {"name": {"const": f.name}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": false,
    })
}

/// Rewrites the local `$ref`s of a schema moved into a call's schema (see [`call_schema`]).
fn rewrite_refs(schema: &mut Value, function: &str, embed_at: &str) {
    match schema {
        Value::Object(members) => {
            for (key, value) in members.iter_mut() {
                match (key.as_str(), value) {
                    ("$ref", Value::String(reference)) => {
                        *reference = rewrite_ref(reference, function, embed_at);
                    }
                    // Maps of names to schemas: the names are not keywords.
                    (
                        "properties" | "patternProperties" | "$defs" | "definitions"
                        | "dependentSchemas",
                        Value::Object(named),
                    ) => {
                        for sub in named.values_mut() {
                            rewrite_refs(sub, function, embed_at);
                        }
                    }
                    // Values, not schemas.
                    ("const" | "enum" | "default" | "examples", _) => {}
                    (_, sub) => rewrite_refs(sub, function, embed_at),
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                rewrite_refs(item, function, embed_at);
            }
        }
        _ => {}
    }
}

fn rewrite_ref(reference: &str, function: &str, embed_at: &str) -> String {
    let Some(pointer) = reference.strip_prefix('#') else {
        return reference.to_string();
    };
    if let Some(rest) = pointer.strip_prefix("/$defs/") {
        return format!("#/$defs/{function}.defs.{rest}");
    }
    if let Some(rest) = pointer.strip_prefix("/definitions/") {
        return format!("#/$defs/{function}.definitions.{rest}");
    }
    format!("#{embed_at}{pointer}")
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{fields, tools, two_tools, weather};
    use super::*;

    #[test]
    fn schema_of_one_function() {
        let schema = call_schema(&weather());
        assert_eq!(
            schema,
            r#"{"type":"object","properties":{"name":{"const":"get_weather"},"arguments":{"type":"object","properties":{"location":{"type":"string"},"unit":{"enum":["c","f"]}},"required":["location"]}},"required":["name","arguments"],"additionalProperties":false}"#
        );
        // A function without parameters takes an empty object.
        let schema: Value = serde_json::from_str(&call_schema(&two_tools()[1..])).unwrap();
        assert_eq!(
            schema["properties"]["arguments"],
            json!({"type": "object", "properties": {}})
        );
    }

    #[test]
    fn schema_of_several_functions() {
        let schema: Value = serde_json::from_str(&call_schema(&two_tools())).unwrap();
        let calls = schema["anyOf"].as_array().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(
            calls[0]["properties"]["name"],
            json!({"const": "get_weather"})
        );
        assert_eq!(calls[1]["properties"]["name"], json!({"const": "now"}));
        for call in calls {
            assert_eq!(call["required"], json!(["name", "arguments"]));
            assert_eq!(call["additionalProperties"], json!(false));
        }
        assert!(schema.get("$defs").is_none());
    }

    #[test]
    fn schema_definitions_move_to_the_root() {
        let t = tools(
            r##"[{"type": "function", "function": {"name": "plan", "parameters": {
                "type": "object",
                "properties": {
                    "stops": {"type": "array", "items": {"$ref": "#/$defs/Stop"}},
                    "mode": {"$ref": "#/definitions/Mode"},
                    "$ref": {"type": "string"},
                    "again": {"$ref": "#"},
                    "first": {"$ref": "#/properties/stops/items"},
                    "remote": {"$ref": "https://example.com/s.json"},
                    "const": {"const": {"$ref": "#/not/a/ref"}}
                },
                "$defs": {"Stop": {"type": "object", "properties": {
                    "next": {"anyOf": [{"$ref": "#/$defs/Stop"}, {"type": "null"}]}}}},
                "definitions": {"Mode": {"enum": ["car", "bike"]}}
            }}},
            {"type": "function", "function": {"name": "other", "parameters": {
                "type": "object", "properties": {"x": {"$ref": "#/$defs/Stop"}},
                "$defs": {"Stop": {"type": "integer"}}}}}]"##,
        );
        let schema: Value = serde_json::from_str(&call_schema(&t)).unwrap();
        let plan = &schema["anyOf"][0]["properties"]["arguments"];
        assert!(plan.get("$defs").is_none() && plan.get("definitions").is_none());
        let p = &plan["properties"];
        assert_eq!(p["stops"]["items"]["$ref"], "#/$defs/plan.defs.Stop");
        assert_eq!(p["mode"]["$ref"], "#/$defs/plan.definitions.Mode");
        assert_eq!(p["$ref"], json!({"type": "string"}));
        assert_eq!(p["again"]["$ref"], "#/anyOf/0/properties/arguments");
        assert_eq!(
            p["first"]["$ref"],
            "#/anyOf/0/properties/arguments/properties/stops/items"
        );
        assert_eq!(p["remote"]["$ref"], "https://example.com/s.json");
        assert_eq!(p["const"]["const"], json!({"$ref": "#/not/a/ref"}));
        let defs = &schema["$defs"];
        assert_eq!(
            defs["plan.defs.Stop"]["properties"]["next"]["anyOf"][0]["$ref"],
            "#/$defs/plan.defs.Stop"
        );
        assert_eq!(
            defs["plan.definitions.Mode"],
            json!({"enum": ["car", "bike"]})
        );
        assert_eq!(defs["other.defs.Stop"], json!({"type": "integer"}));
        assert_eq!(
            schema["anyOf"][1]["properties"]["arguments"]["properties"]["x"]["$ref"],
            "#/$defs/other.defs.Stop"
        );
        // One function: pointers are from the call's object.
        let schema: Value = serde_json::from_str(&call_schema(&t[..1])).unwrap();
        assert_eq!(
            schema["properties"]["arguments"]["properties"]["again"]["$ref"],
            "#/properties/arguments"
        );
        assert!(schema["$defs"]["plan.defs.Stop"].is_object());
    }

    #[test]
    fn grammar_per_choice() {
        let t = two_tools();
        assert_eq!(grammar(&t, &ToolChoice::None), None);
        assert_eq!(grammar(&[], &ToolChoice::Auto), None);
        assert_eq!(
            grammar(&t, &ToolChoice::Auto),
            Some((GrammarKind::JsonOrText, call_schema(&t)))
        );
        assert_eq!(
            grammar(&t, &ToolChoice::Required),
            Some((GrammarKind::Json, call_schema(&t)))
        );
        assert_eq!(
            grammar(&t, &ToolChoice::Function("now".into())),
            Some((GrammarKind::Json, call_schema(&t[1..])))
        );
        assert_eq!(grammar(&t, &ToolChoice::Function("later".into())), None);
        let g = GrammarKind::JsonOrText.to_pb("{}".into());
        assert_eq!(g.r#type, pb::GrammarType::JsonOrText as i32);
        assert_eq!(g.value, "{}");
        assert_eq!(GrammarKind::Json.grammar_type(), pb::GrammarType::Json);
        let resolved = fields(json!({"tools": [{"type": "function", "function": {"name": "f"}}],
                                     "tool_choice": {"type": "function", "function": {"name": "f"}}}))
        .unwrap()
        .resolve()
        .unwrap()
        .unwrap();
        let g = resolved.pb_grammar().unwrap();
        assert_eq!(g.r#type, pb::GrammarType::Json as i32);
        assert!(g
            .value
            .starts_with(r#"{"type":"object","properties":{"name":{"const":"f"},"#));
        assert_eq!(
            resolved.parameter_schemas(),
            vec![(
                "tools[0].function.parameters".to_string(),
                json!({"type": "object", "properties": {}})
            )]
        );
    }
}
