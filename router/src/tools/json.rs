//! JSON text as Python's `json.dumps` writes it ([`PyFormatter`], [`python_json`],
//! [`spaced_json`]): what the shard generates and what Hugging Face chat templates show a model
//! (their `tojson` filter), so prompts read as the model saw them in training. Here rather than
//! in `template` because `tools` writes such JSON too and sits above `template`.

use serde::Serialize;
use serde_json::Value;
use std::io;

/// How a JSON value is named in messages ("a list", "a string", ...).
pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// `value` as JSON text with `", "` and `": "` separators (Python's `json.dumps` default), as
/// the shard writes JSON and Hugging Face templates show it. (Compact text, as OpenAI writes a
/// call's `arguments`, is `Value`'s `to_string`.)
pub fn spaced_json<T: Serialize + ?Sized>(value: &T) -> String {
    python_json(value, PyFormatter::spaced()).unwrap_or_default()
}

/// `value` as JSON text laid out by `formatter`.
pub fn python_json<T: Serialize + ?Sized>(
    value: &T,
    formatter: PyFormatter,
) -> serde_json::Result<String> {
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    value.serialize(&mut serializer)?;
    // serde_json writes UTF-8 only.
    Ok(String::from_utf8(out).unwrap_or_default())
}

/// JSON with Python's `json.dumps` layout: the given separators, and with `indent` a newline and
/// the indentation before every item.
pub struct PyFormatter {
    item: Vec<u8>,
    key: Vec<u8>,
    indent: Option<Vec<u8>>,
    level: usize,
    has_value: bool,
}

impl PyFormatter {
    /// `json.dumps(value, separators=(item, key), indent=indent)` (an indent as text: Python's
    /// `indent=2` is `"  "`).
    pub fn new(item: &str, key: &str, indent: Option<&str>) -> Self {
        Self {
            item: item.as_bytes().to_vec(),
            key: key.as_bytes().to_vec(),
            indent: indent.map(|i| i.as_bytes().to_vec()),
            level: 0,
            has_value: false,
        }
    }

    /// Python's default layout: `", "` and `": "`, on one line.
    pub fn spaced() -> Self {
        Self::new(", ", ": ", None)
    }

    fn newline<W: ?Sized + io::Write>(&self, w: &mut W) -> io::Result<()> {
        if let Some(indent) = &self.indent {
            w.write_all(b"\n")?;
            for _ in 0..self.level {
                w.write_all(indent)?;
            }
        }
        Ok(())
    }

    fn begin<W: ?Sized + io::Write>(&mut self, w: &mut W, open: &[u8]) -> io::Result<()> {
        self.level += 1;
        self.has_value = false;
        w.write_all(open)
    }

    fn end<W: ?Sized + io::Write>(&mut self, w: &mut W, close: &[u8]) -> io::Result<()> {
        self.level -= 1;
        if self.has_value {
            self.newline(w)?;
        }
        w.write_all(close)
    }

    fn item<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if !first {
            w.write_all(&self.item)?;
        }
        self.newline(w)
    }
}

impl serde_json::ser::Formatter for PyFormatter {
    fn begin_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.begin(w, b"[")
    }

    fn end_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.end(w, b"]")
    }

    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.item(w, first)
    }

    fn end_array_value<W: ?Sized + io::Write>(&mut self, _: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn begin_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.begin(w, b"{")
    }

    fn end_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.end(w, b"}")
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.item(w, first)
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(&self.key)
    }

    fn end_object_value<W: ?Sized + io::Write>(&mut self, _: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What the module relies on `serde_json::Value` for (the `preserve_order` feature).
    #[test]
    fn json_keeps_member_order() {
        let text = r#"{"z": 1, "a": [true, null, -2.5, "s"], "m": {"y": {}, "b": []}}"#;
        let value: Value = serde_json::from_str(text).unwrap();
        assert_eq!(spaced_json(&value), text);
        assert_eq!(
            value.to_string(),
            r#"{"z":1,"a":[true,null,-2.5,"s"],"m":{"y":{},"b":[]}}"#
        );
        assert_eq!(json_kind(value.get("a").unwrap()), "a list");
        assert!(value.get("nope").is_none());
        // A repeated key keeps its first place and its last value.
        let value: Value = serde_json::from_str(r#"{"a": 1, "b": 2, "a": 3}"#).unwrap();
        assert_eq!(value.to_string(), r#"{"a":3,"b":2}"#);
        // Large and negative integers survive.
        let value: Value =
            serde_json::from_str("[18446744073709551615, -9223372036854775808]").unwrap();
        assert_eq!(
            value.to_string(),
            "[18446744073709551615,-9223372036854775808]"
        );
        assert_eq!(json!({"b": 1, "a": "x"}).to_string(), r#"{"b":1,"a":"x"}"#);
    }

    /// `spaced_json` once had a formatter of its own; these are the cases where one on one line
    /// could differ from an indenting one (empty and nested containers, scalars at the top,
    /// escapes), each as Python's `json.dumps(value, ensure_ascii=False)` writes it.
    #[test]
    fn spaced_json_is_python_json_dumps() {
        let cases = [
            (json!({}), "{}"),
            (json!([]), "[]"),
            (json!([[]]), "[[]]"),
            (json!([{}, [{}], {"a": []}]), r#"[{}, [{}], {"a": []}]"#),
            (
                json!({"a": {"b": {"c": [1, [2, [3]]]}}, "d": {}}),
                r#"{"a": {"b": {"c": [1, [2, [3]]]}}, "d": {}}"#,
            ),
            (json!(null), "null"),
            (json!(1.5), "1.5"),
            (json!("x"), r#""x""#),
            (
                json!({"q\"": "é🙂\n\t\u{1}</a>"}),
                r#"{"q\"": "é🙂\n\t\u0001</a>"}"#,
            ),
        ];
        for (value, python) in cases {
            assert_eq!(spaced_json(&value), python);
            let explicit = python_json(&value, PyFormatter::new(", ", ": ", None)).unwrap();
            assert_eq!(explicit, python);
        }
        // Python's `indent=2` on the same shapes: empty containers stay on their line.
        let value = json!({"a": [], "b": [{}], "c": {"d": 1}});
        assert_eq!(
            python_json(&value, PyFormatter::new(",", ": ", Some("  "))).unwrap(),
            "{\n  \"a\": [],\n  \"b\": [\n    {}\n  ],\n  \"c\": {\n    \"d\": 1\n  }\n}"
        );
    }
}
