"""Renders the router's OpenAPI document as a Markdown reference page (operations, then schemas).

The documentation site builds its "OpenAPI schema" page with this (scripts/docs_hooks.py), so the
page always says what the document says. Both OpenAPI 3.0 (`nullable`) and 3.1 (type lists) forms
are read. Standalone: `python scripts/openapi_markdown.py docs/reference/openapi.json`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

Schema = dict[str, Any]
METHODS = ("get", "put", "post", "delete", "patch", "options", "head")

# Constraint keywords worth showing beside a field, in the order shown, with their labels.
CONSTRAINTS = {
    "default": "default",
    "minimum": "minimum",
    "exclusiveMinimum": "greater than",
    "maximum": "maximum",
    "exclusiveMaximum": "less than",
    "minLength": "min length",
    "maxLength": "max length",
    "minItems": "min items",
    "maxItems": "max items",
    "pattern": "pattern",
    "format": "format",
    "example": "example",
}


def schema_anchor(name: str) -> str:
    return "schema-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def operation_anchor(method: str, path: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-") or "root"
    return f"op-{method}-{slug}"


def cell(text: str) -> str:
    """Text made safe for one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def type_of(schema: Schema) -> str:
    """A short Markdown description of a schema's type, linking named schemas."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[`{name}`](#{schema_anchor(name)})"
    for combinator in ("oneOf", "anyOf"):
        if combinator in schema:
            return " or ".join(dict.fromkeys(type_of(s) for s in schema[combinator]))
    if "allOf" in schema:
        return " and ".join(type_of(s) for s in schema["allOf"])
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    if "enum" in schema:
        return " or ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    kinds = schema.get("type", "any")
    kinds = list(kinds) if isinstance(kinds, list) else [kinds]
    if schema.get("nullable"):
        kinds.append("null")
    return " or ".join(dict.fromkeys(single_type(schema, kind) for kind in kinds))


def single_type(schema: Schema, kind: str) -> str:
    if kind == "array":
        return f"array of {type_of(schema.get('items', {}))}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"map of string to {type_of(schema['additionalProperties'])}"
    if kind == "object" and "properties" in schema:
        return "object {" + ", ".join(f"`{name}`" for name in schema["properties"]) + "}"
    return kind


def constraints_of(schema: Schema) -> str:
    parts = []
    for key, label in CONSTRAINTS.items():
        if key in schema and not isinstance(schema[key], bool):
            parts.append(f"{label}: `{json.dumps(schema[key])}`")
    if schema.get("exclusiveMinimum") is True:  # the 3.0 form: `minimum` itself is excluded
        parts.append("minimum excluded")
    return "; ".join(parts)


def describe(schema: Schema) -> str:
    return cell(" ".join(p for p in (schema.get("description", ""), constraints_of(schema)) if p))


def render_schema(name: str, schema: Schema) -> list[str]:
    lines = [f"### `{name}` {{#{schema_anchor(name)}}}", ""]
    if schema.get("description"):
        lines += [schema["description"], ""]
    # An allOf of named schemas and inline objects: the inline fields are listed here, the named
    # schemas linked (their fields are listed under their own names).
    parts = [schema, *schema.get("allOf", [])]
    included = [type_of(part) for part in parts if "$ref" in part]
    properties = {k: v for part in parts for k, v in part.get("properties", {}).items()}
    required = {field for part in parts for field in part.get("required", [])}
    if included:
        lines += [f"Also has every field of {', '.join(included)}.", ""]
    if not properties:
        if not included:
            lines += [f"Type: {type_of(schema)}.", ""]
        extra = constraints_of(schema)
        return lines + ([extra, ""] if extra else [])
    lines += ["| field | type | required | description |", "|---|---|---|---|"]
    for field, sub in properties.items():
        mark = "yes" if field in required else ""
        lines.append(f"| `{field}` | {type_of(sub)} | {mark} | {describe(sub)} |")
    return lines + [""]


def render_operation(method: str, path: str, operation: Schema) -> list[str]:
    lines = [f"### `{method.upper()} {path}` {{#{operation_anchor(method, path)}}}", ""]
    for key in ("summary", "description"):
        if operation.get(key):
            lines += [operation[key], ""]
    parameters = operation.get("parameters", [])
    if parameters:
        lines += ["| parameter | in | type | required | description |", "|---|---|---|---|---|"]
        for p in parameters:
            mark = "yes" if p.get("required") else ""
            lines.append(f"| `{p['name']}` | {p['in']} | {type_of(p.get('schema', {}))} | {mark} | {describe(p)} |")
        lines.append("")
    body = operation.get("requestBody")
    if body:
        lines += [f"Request body{' (required)' if body.get('required') else ''}: {content_of(body)}", ""]
    lines += ["| status | meaning | body |", "|---|---|---|"]
    for status, response in sorted(operation.get("responses", {}).items()):
        lines.append(f"| {status} | {cell(response.get('description', ''))} | {content_of(response)} |")
    return lines + [""]


def content_of(part: Schema) -> str:
    """The media types of a request body or response with their schemas."""
    content = part.get("content", {})
    if not content:
        return "none"
    shown = []
    for media, spec in content.items():
        schema = spec.get("schema")
        shown.append(f"`{media}`" + (f" {type_of(schema)}" if schema else ""))
    return cell("; ".join(shown))


def render(document: Schema) -> str:
    """The whole reference page for an OpenAPI document."""
    info = document.get("info", {})
    lines = [
        "# OpenAPI schema",
        "",
        f"{info.get('title', 'API')} {info.get('version', '')}, OpenAPI {document.get('openapi', '')}. "
        "This page is generated from `docs/reference/openapi.json`, the document the router serves at "
        "`/api-doc/openapi.json`; the [REST API](rest_api.md) page explains each route with examples.",
        "",
        "## Operations",
        "",
        "| method | path | summary |",
        "|---|---|---|",
    ]
    operations = [
        (method, path, operation)
        for path, item in document.get("paths", {}).items()
        for method, operation in item.items()
        if method in METHODS
    ]
    for method, path, operation in operations:
        link = f"[`{path}`](#{operation_anchor(method, path)})"
        lines.append(f"| `{method.upper()}` | {link} | {cell(operation.get('summary', ''))} |")
    lines.append("")
    for method, path, operation in operations:
        lines += render_operation(method, path, operation)
    schemas = document.get("components", {}).get("schemas", {})
    if schemas:
        lines += ["## Schemas", ""]
        for name, schema in schemas.items():
            lines += render_schema(name, schema)
    return "\n".join(lines)


def main() -> None:
    print(render(json.loads(Path(sys.argv[1]).read_text())))


if __name__ == "__main__":
    main()
