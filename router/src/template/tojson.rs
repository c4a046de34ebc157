//! JSON values as the template sees them and writes them back: objects keep their members in
//! order ([`OrderedMap`]; minijinja's own maps sort them), and the `tojson` filter writes JSON as
//! Python's `json.dumps` does (with [`PyFormatter`]), as Hugging Face renders chat templates.

use crate::tools::{python_json, PyFormatter};
use minijinja::value::{Enumerator, Kwargs, Object};
use minijinja::{Error, ErrorKind, Value};
use serde::Serialize;
use std::sync::Arc;

/// `value` for the template, its objects' members in order (minijinja's own maps sort them).
pub(super) fn ordered_value<T: Serialize + ?Sized>(value: &T) -> Result<Value, String> {
    let json = serde_json::to_value(value).map_err(|e| e.to_string())?;
    Ok(jinja_value(&json))
}

/// A JSON value as a template value; objects keep their member order.
pub(super) fn jinja_value(value: &serde_json::Value) -> Value {
    match value {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(items) => {
            Value::from(items.iter().map(jinja_value).collect::<Vec<_>>())
        }
        serde_json::Value::Object(members) => Value::from_object(OrderedMap(
            members
                .iter()
                .map(|(k, v)| (Value::from(k.as_str()), jinja_value(v)))
                .collect(),
        )),
    }
}

/// A template map that keeps the order of its keys (iteration, `items()`, `tojson`).
#[derive(Debug)]
struct OrderedMap(Vec<(Value, Value)>);

impl Object for OrderedMap {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(self.0.iter().map(|(k, _)| k.clone()).collect())
    }
}

/// Hugging Face's `tojson` filter (Python's `json.dumps(value, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`): `", "` and `": "` separators, `","` between
/// items when indenting, no HTML escaping (minijinja's own filter writes compact JSON and
/// escapes `<`, `>`, `&` and `'`, which changes prompts).
pub(super) fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(indent) => Some(indent),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => " ".repeat(usize::try_from(v)?),
        }),
    };
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: `separators` must be a list of two strings",
            ))
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let formatter = PyFormatter::new(&item, &key, indent.as_deref());
    let written = if sort_keys.unwrap_or(false) {
        serde_json::to_value(value).and_then(|mut v| {
            v.sort_all_objects();
            python_json(&v, formatter)
        })
    } else {
        python_json(value, formatter)
    };
    let mut text = written.map_err(|e| {
        Error::new(ErrorKind::InvalidOperation, "cannot serialize to JSON").with_source(e)
    })?;
    if ensure_ascii.unwrap_or(false) {
        let mut escaped = String::with_capacity(text.len());
        for c in text.chars() {
            if c.is_ascii() {
                escaped.push(c);
            } else {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    escaped.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
        text = escaped;
    }
    Ok(Value::from_safe_string(text))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::messages;
    use super::super::ChatTemplate;

    #[test]
    fn tojson_writes_json_as_python_does() {
        let render = |source: &str| {
            let t = ChatTemplate::new(source.into(), String::new(), String::new()).unwrap();
            t.apply(&messages(
                r#"[{"role": "user", "content": "<a href='x'>&</a> é🙂"}]"#,
            ))
            .unwrap()
        };
        assert_eq!(
            render("{{ messages[0] | tojson }}"),
            r#"{"role": "user", "content": "<a href='x'>&</a> é🙂"}"#
        );
        assert_eq!(
            render("{{ messages[0].content | tojson(ensure_ascii=true) }}"),
            r#""<a href='x'>&</a> \u00e9\ud83d\ude42""#
        );
        assert_eq!(
            render("{{ {'b': [1, 2.5, none, true], 'a': {}} | tojson(separators=(',', ':')) }}"),
            r#"{"a":{},"b":[1,2.5,null,true]}"#
        );
        assert_eq!(
            render("{{ messages[0] | tojson(sort_keys=true) }}"),
            r#"{"content": "<a href='x'>&</a> é🙂", "role": "user"}"#
        );
        assert_eq!(
            render("{{ {'a': [1, []], 'b': {}} | tojson(indent=2) }}"),
            "{\n  \"a\": [\n    1,\n    []\n  ],\n  \"b\": {}\n}"
        );
        assert_eq!(
            render("{{ [1] | tojson(indent='\\t') }}|{{ [1, 2] | tojson(indent=0) }}"),
            "[\n\t1\n]|[\n1,\n2\n]"
        );
        assert_eq!(render("{{ 'x' | tojson(indent=none) }}"), "\"x\"");
        let t = ChatTemplate::new(
            "{{ 1 | tojson(colour=1) }}".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        assert!(t.apply(&[]).is_err());
    }

    #[test]
    fn ordered_maps_behave_as_maps() {
        let source = "{% set m = messages[0] %}{{ m | length }} {{ 'role' in m }} \
            {{ 'name' in m }} {{ m.get('name', 'anon') }} {{ m['role'] }} {{ m.keys() | list }} \
            {% for k, v in m.items() %}{{ k }}={{ v }};{% endfor %} {{ m is mapping }} \
            {{ m.content is string }} {% if m %}true{% endif %} {{ messages | length }} \
            {{ messages[-1:][0].role }} {{ m | dictsort | first | first }}";
        let t = ChatTemplate::new(source.into(), String::new(), String::new()).unwrap();
        let m = messages(
            r#"[{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]"#,
        );
        assert_eq!(
            t.apply(&m).unwrap(),
            "2 True False anon user [\"role\", \"content\"] role=user;content=c; True True \
             true 2 assistant content"
        );
    }
}
