"""Reading the service's /openapi.json: which schema documents an answer, and does it conform.

A small JSON Schema walker for the subset FastAPI/pydantic emit ($ref, anyOf, const, enum,
type, properties, required, items, additionalProperties). Stricter than JSON Schema in one way:
a field that an object schema with declared properties does not declare is a violation (an
undocumented field), except in a problem body, whose extension members RFC 9457 allows.
"""

from __future__ import annotations

import re
from typing import Any

Schema = dict[str, Any]
PROBLEM = "Problem"
_TYPES = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def ref_name(schema: Schema) -> str | None:
    """The component a ``$ref`` schema names."""
    ref = schema.get("$ref")
    return None if ref is None else str(ref).rsplit("/", 1)[1]


def component(spec: Schema, name: str) -> Schema:
    """One schema of ``components.schemas``."""
    return dict(spec["components"]["schemas"][name])


def violations(
    value: Any, schema: Schema, spec: Schema, where: str = "body", extensions: bool = False
) -> list[str]:
    """Where `value` does not conform to `schema` (empty: it conforms)."""
    name = ref_name(schema)
    if name is not None:
        return violations(value, component(spec, name), spec, where, extensions or name == PROBLEM)
    if "anyOf" in schema:
        tried = [violations(value, alt, spec, where, extensions) for alt in schema["anyOf"]]
        if any(not problems for problems in tried):
            return []
        return [f"{where}: matches none of anyOf: " + " | ".join(p[0] for p in tried)]
    if "const" in schema and value != schema["const"]:
        return [f"{where}: {value!r} is not {schema['const']!r}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} is not one of {schema['enum']}"]
    kind = schema.get("type")
    if kind is None:
        return []  # Any
    if not _TYPES[kind](value):
        return [f"{where}: {value!r} is not of type {kind}"]
    if kind == "array":
        items = schema.get("items", {})
        return [p for i, v in enumerate(value) for p in violations(v, items, spec, f"{where}[{i}]")]
    if kind == "object":
        return _object_violations(value, schema, spec, where, extensions)
    return []


def _object_violations(
    value: dict[str, Any], schema: Schema, spec: Schema, where: str, extensions: bool
) -> list[str]:
    declared: Schema = schema.get("properties", {})
    found = [
        f"{where}.{n}: required but missing" for n in schema.get("required", ()) if n not in value
    ]
    for key, item in value.items():
        if key in declared:
            found += violations(item, declared[key], spec, f"{where}.{key}")
        elif isinstance(schema.get("additionalProperties"), dict):
            found += violations(item, schema["additionalProperties"], spec, f"{where}.{key}")
        elif declared and not extensions and "additionalProperties" not in schema:
            found.append(f"{where}.{key}: sent, but not in the schema")
    return found


def nullable(schema: Schema, spec: Schema) -> bool:
    """Whether `schema` admits null."""
    return not violations(None, schema, spec)


def documented_component(value: Any, schema: Schema, spec: Schema) -> str | None:
    """The component schema (one alternative of an anyOf) that `value` conforms to."""
    for alternative in schema.get("anyOf", [schema]):
        name = ref_name(alternative)
        if name is not None and not violations(value, alternative, spec):
            return name
    return None


def operation(spec: Schema, method: str, path: str) -> tuple[str, Schema] | None:
    """The path template and operation object that serve `method path`, if any."""
    for template, operations in spec["paths"].items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, path) and method.lower() in operations:
            return template, operations[method.lower()]
    return None


def response_schema(op: Schema, status: int, media_type: str) -> Schema | None:
    """The schema an operation documents for one status and media type (None: undocumented)."""
    documented = op.get("responses", {}).get(str(status))
    if documented is None:
        return None
    content = documented.get("content", {})
    if media_type not in content:
        return None
    return dict(content[media_type].get("schema", {}))
