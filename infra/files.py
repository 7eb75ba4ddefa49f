"""Data files in and out: our JSONL schema, and files written atomically (a temporary name, renamed when
complete), so that an interrupted command never leaves a half-written output behind."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text_atomic(path, text: str) -> Path:
    """Write `text` to a temporary name beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path, obj, indent: int = 1) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path, rows) -> Path:
    """One JSON object per line, written atomically."""
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path, required_keys=()) -> list:
    """Rows of a JSONL file. `required_keys`: key names (values must be strings) or a {key: type} mapping.

    Raises ValueError '<path>:<line>: <problem>' (1-based line) on bad JSON, a non-object line, a missing
    key or a value of the wrong type. Blank lines are skipped."""
    required = dict(required_keys) if isinstance(required_keys, dict) else {k: str for k in required_keys}
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: bad JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for key, typ in required.items():
                if key not in row:
                    raise ValueError(f"{path}:{lineno}: missing key {key!r}")
                if not isinstance(row[key], typ) or (typ is int and isinstance(row[key], bool)):
                    raise ValueError(
                        f"{path}:{lineno}: key {key!r} must be {typ.__name__}, got {type(row[key]).__name__}"
                    )
            rows.append(row)
    return rows


def spread(rows: list, limit: int | None) -> list:
    """At most `limit` rows, spread evenly over the list (data files are often sorted by category, so the
    first N rows would be one category). None or 0: all of them."""
    if not limit or limit >= len(rows):
        return rows
    return [rows[i * len(rows) // limit] for i in range(limit)]
