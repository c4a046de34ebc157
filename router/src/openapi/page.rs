//! `/docs`: a self-contained HTML page listing the operations of the OpenAPI document (no
//! assets fetched from anywhere).

use serde_json::Value;

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
