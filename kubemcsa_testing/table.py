"""Table output (meta.k8s.io/v1 Table), which kubectl asks for on `get`, so that it prints a CRD's printer columns.

kube-apiserver answers `Accept: application/json;as=Table;v=v1;g=meta.k8s.io` with a Table. For custom resources
the columns are Name plus the CRD version's additionalPrinterColumns (default: Age); the first JSONPath result
fills a cell, and a `date` cell is the time since then as apimachinery's HumanDuration writes it, so a date in the
future prints `<invalid>`, as on a real cluster. Built-in types get the generic convertor's Name and Created At
(kube-apiserver has richer printers for some of them, which no test needs).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from kubemcsa.contract.timefmt import format_time, parse_time

Obj = dict[str, Any]

_NAME_COLUMN = {
    "name": "Name",
    "type": "string",
    "format": "name",
    "description": "Name must be unique within a namespace.",
    "priority": 0,
}
_CREATED_AT_COLUMN = {
    "name": "Created At",
    "type": "date",
    "format": "",
    "description": "CreationTimestamp is a timestamp representing the server time when this object was created.",
    "priority": 0,
}
_DEFAULT_CRD_COLUMNS = [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
# `.a.b`, `[0]`, `[?(@.key=="value")]`: the JSONPath subset printer columns use.
_STEP = re.compile(r"""\.([A-Za-z0-9_\-]+)|\[(\d+)\]|\[\?\(@\.([A-Za-z0-9_\-]+)\s*==\s*["']([^"']*)["']\)\]""")


def wants_table(accept: str | None) -> bool:
    """True if an Accept header asks for a Table (kubectl get does; client libraries do not)."""
    return bool(accept) and "as=Table" in accept


def evaluate(obj: Any, path: str) -> Any:
    """The value at a printer column's JSONPath, or None where the path leads nowhere (the cell is then empty)."""
    values = [obj]
    position = 0
    path = path.strip()
    while position < len(path):
        step = _STEP.match(path, position)
        if step is None:
            return None  # a JSONPath beyond the subset: an empty cell, as kube prints for a path that finds nothing
        position = step.end()
        field, index, key, wanted = step.groups()
        found = []
        for value in values:
            if field is not None and isinstance(value, dict) and field in value:
                found.append(value[field])
            elif index is not None and isinstance(value, list) and int(index) < len(value):
                found.append(value[int(index)])
            elif key is not None and isinstance(value, list):
                found.extend(item for item in value if isinstance(item, dict) and str(item.get(key)) == wanted)
        values = found
    return values[0] if values else None  # kube prints the first result only


def human_duration(seconds: float) -> str:
    """apimachinery's duration.HumanDuration: `45s`, `3m20s`, `5h10m`, `2d4h`, `3y`; `<invalid>` for the future."""
    whole = int(seconds)
    if whole < -1:
        return "<invalid>"
    if whole < 0:
        return "0s"
    if whole < 120:
        return f"{whole}s"
    minutes = whole // 60
    if minutes < 10:
        return f"{minutes}m" if whole % 60 == 0 else f"{minutes}m{whole % 60}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h" if minutes % 60 == 0 else f"{hours}h{minutes % 60}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d" if hours % 24 == 0 else f"{hours // 24}d{hours % 24}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if days == 0 else f"{hours // 24 // 365}y{days}d"
    return f"{hours // 24 // 365}y"


def _cell(value: Any, column_type: str, now: float) -> Any:
    if value is None:
        return None
    if column_type == "date":
        when = parse_time(value) if isinstance(value, str) else None
        return "<invalid>" if when is None else human_duration(now - when)
    if column_type == "string":
        return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return value if isinstance(value, int | float | bool) else None


def _column(definition: Obj) -> Obj:
    return {
        "name": definition.get("name", ""),
        "type": definition.get("type", "string"),
        "format": definition.get("format", ""),
        "description": definition.get("description", ""),
        "priority": definition.get("priority", 0),
    }


def to_table(result: Obj, printer_columns: list[Obj] | None, *, custom: bool, now: float | None = None) -> Obj:
    """The Table for a get (one object) or a list answer: a custom resource's printer columns (from its CRD), or
    the generic Name and Created At of a built-in type."""
    now = time.time() if now is None else now
    is_list = isinstance(result.get("items"), list)
    objects = result["items"] if is_list else [result]
    extra = (printer_columns or _DEFAULT_CRD_COLUMNS) if custom else []
    columns = [_NAME_COLUMN, *(_column(c) for c in extra)] if custom else [_NAME_COLUMN, _CREATED_AT_COLUMN]
    rows = []
    for obj in objects:
        metadata = obj.get("metadata") or {}
        if custom:
            extra_cells = [_cell(evaluate(obj, c.get("jsonPath", "")), c.get("type", "string"), now) for c in extra]
        else:
            created = parse_time(metadata.get("creationTimestamp"))
            extra_cells = [None if created is None else format_time(created)]
        cells = [metadata.get("name", ""), *extra_cells]
        rows.append(
            {
                "cells": cells,
                "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": metadata},
            }
        )
    list_metadata = (
        result.get("metadata")
        if is_list
        else {"resourceVersion": (result.get("metadata") or {}).get("resourceVersion", "")}
    )
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_metadata or {},
        "columnDefinitions": columns,
        "rows": rows,
    }
