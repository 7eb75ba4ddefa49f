"""Readers of the public prompt sets a user may have locally (docs/method.md §9): a file in, our rows out.

    harmful rows  {"prompt", "harmful_response"?, "category"?, "source"}
    benign rows   {"prompt", "response"?, "category"?, "source"}
`source` names the layout the file was read as; `harmful_response` is the text a prefilling attack forces into
the assistant turn (AdvBench's and JailbreakBench's "Sure, here is ..." targets are short ones).

The layout is detected from the file's header (CSV) or first record (JSON lines), never from its name; the one
use of the name is that a `.txt` file which is neither is read as one prompt per line. Nothing is shipped or
downloaded: these read the user's own copies.

Read top to bottom: the converters (one per layout: a record in, our row out), LAYOUTS (each layout's columns
and converter, in detection order), the readers of the file families (JSON lines, CSV), read_prompts.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


class BadRow(ValueError):
    """A record that does not fit its layout; read_prompts puts '<path>:<line>: ' in front."""


def text_field(rec: dict, key: str, required: bool = True) -> str | None:
    """rec[key], stripped; a missing or empty value is an error when required, else None."""
    value = rec.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRow(f"{key!r} must be a string, got {type(value).__name__}")
    if value is None or not value.strip():
        if required:
            raise BadRow(f"empty or missing {key!r}")
        return None
    return value.strip()


def with_optional(row: dict, **fields) -> dict:
    """row plus those fields that have a value (an optional column left empty is left out)."""
    return {**row, **{k: v for k, v in fields.items() if v is not None}}


# ----------------------------------------------------------------------------------------------
# Converters: (record, kind) -> our row, or None for a record of the other kind (XSTest's other half)
# ----------------------------------------------------------------------------------------------
def from_ours(rec: dict, kind: str) -> dict:
    """Our own JSON lines keep every key of the record (the toy world's rows also carry topic, held_out)."""
    answer = "harmful_response" if kind == "harmful" else "response"
    for key, required in (("prompt", True), (answer, False), ("category", False)):
        text_field(rec, key, required)
    return {**rec, "source": "ours"}


def from_ours_csv(rec: dict, kind: str) -> dict:
    answer = "harmful_response" if kind == "harmful" else "response"
    row = {"prompt": text_field(rec, "prompt"), "source": "ours"}
    optional = {answer: text_field(rec, answer, False), "category": text_field(rec, "category", False)}
    return with_optional(row, **optional)


def from_hexphi(rec: dict, kind: str) -> dict:
    row = {"prompt": text_field(rec, "instruction"), "source": "hexphi"}
    return with_optional(row, category=text_field(rec, "category", required=False))


def from_hexphi_prefill(rec: list, kind: str) -> dict:
    """Qi et al.'s Harmful-HEx-PHI.jsonl: every line [{"role": "user", ...}, {"role": "assistant", ...}]."""
    if len(rec) < 2 or not all(isinstance(m, dict) for m in rec[:2]):
        raise BadRow("expected a list [user message, assistant message] of objects")
    roles = (rec[0].get("role"), rec[1].get("role"))
    if roles != ("user", "assistant"):
        raise BadRow(f"expected the roles user, assistant; got {roles[0]!r}, {roles[1]!r}")
    prompt, response = text_field(rec[0], "content"), text_field(rec[1], "content")
    return {"prompt": prompt, "harmful_response": response, "source": "hexphi_prefill"}


def from_advbench(rec: dict, kind: str) -> dict:
    prompt, target = text_field(rec, "goal"), text_field(rec, "target")
    return {"prompt": prompt, "harmful_response": target, "source": "advbench"}


def from_harmbench(rec: dict, kind: str) -> dict:
    """A contextual behavior is its context, a '---' rule, then the behavior, joined as HarmBench's own test
    cases join them (baselines/direct_request/direct_request.py:
    f"{context_str}\\n\\n---\\n\\n{behavior}")."""
    behavior, context = text_field(rec, "Behavior"), text_field(rec, "ContextString", required=False)
    prompt = f"{context}\n\n---\n\n{behavior}" if context else behavior
    row = {"prompt": prompt, "source": "harmbench"}
    return with_optional(row, category=text_field(rec, "SemanticCategory", required=False))


def from_jailbreakbench(rec: dict, kind: str) -> dict:
    """Harmful and benign files share the layout. Target ("Sure, here is ...") is a prefill for harmful rows
    only: it is not a reference answer to a benign prompt."""
    row = {"prompt": text_field(rec, "Goal"), "source": "jailbreakbench"}
    target = text_field(rec, "Target", required=False) if kind == "harmful" else None
    return with_optional(row, harmful_response=target, category=text_field(rec, "Category", required=False))


def from_strongreject(rec: dict, kind: str) -> dict:
    row = {"prompt": text_field(rec, "forbidden_prompt"), "source": "strongreject"}
    return with_optional(row, category=text_field(rec, "category", required=False))


def from_xstest(rec: dict, kind: str) -> dict | None:
    """The safe prompts are the benign half (for over-refusal), the unsafe contrast prompts the harmful
    half."""
    label = text_field(rec, "label")
    if label not in ("safe", "unsafe"):
        raise BadRow(f"label {label!r} is neither 'safe' nor 'unsafe'")
    if label != ("unsafe" if kind == "harmful" else "safe"):
        return None
    row = {"prompt": text_field(rec, "prompt"), "source": "xstest"}
    return with_optional(row, category=text_field(rec, "type", required=False))


# ----------------------------------------------------------------------------------------------
# Layouts, in detection order: a file is read as the first layout whose columns it has
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    name: str
    family: str  # "csv" or "jsonl"
    columns: tuple[str, ...]  # the CSV header's columns, or the first JSON record's keys, that identify it
    convert: Callable
    harmful_only: bool = False
    record: type = dict  # what every JSON line must be (CSV records are always dicts)


HARMBENCH_COLUMNS = (
    "Behavior",
    "FunctionalCategory",
    "SemanticCategory",
    "Tags",
    "ContextString",
    "BehaviorID",
)
LAYOUTS = (
    Layout("harmbench", "csv", HARMBENCH_COLUMNS, from_harmbench, harmful_only=True),
    Layout(
        "jailbreakbench",
        "csv",
        ("Index", "Goal", "Target", "Behavior", "Category", "Source"),
        from_jailbreakbench,
    ),
    Layout(
        "strongreject",
        "csv",
        ("category", "source", "forbidden_prompt"),
        from_strongreject,
        harmful_only=True,
    ),
    Layout("advbench", "csv", ("goal", "target"), from_advbench, harmful_only=True),
    Layout("xstest", "csv", ("prompt", "type", "label"), from_xstest),
    Layout("ours", "csv", ("prompt",), from_ours_csv),
    Layout("hexphi", "jsonl", ("instruction", "category"), from_hexphi, harmful_only=True),
    Layout("xstest", "jsonl", ("prompt", "type", "label"), from_xstest),
    Layout("ours", "jsonl", ("prompt",), from_ours),
)
HEXPHI_PREFILL = Layout(
    "hexphi_prefill",
    "jsonl",
    ("[user message, assistant message]",),
    from_hexphi_prefill,
    harmful_only=True,
    record=list,
)


def layouts_understood() -> str:
    """Every layout with its columns, for the unknown-layout error."""
    layouts = LAYOUTS + (HEXPHI_PREFILL,)
    each = [f"{lay.name} {lay.family.upper()} ({', '.join(lay.columns)})" for lay in layouts]
    return "; ".join(each + ["plain .txt (one prompt per line)"])


def detect(path: Path, family: str, columns) -> Layout:
    for lay in LAYOUTS:
        if lay.family == family and set(lay.columns) <= set(columns):
            return lay
    raise ValueError(
        f"{path}: unknown layout, found {family.upper()} columns {list(columns)}; "
        f"understood: {layouts_understood()}"
    )


def is_known_csv(path: Path) -> bool:
    """Whether the file starts with the header of a CSV layout (then a .txt file is not plain prompts)."""
    header = set(csv_header(path))
    return any(lay.family == "csv" and set(lay.columns) <= header for lay in LAYOUTS)


# ----------------------------------------------------------------------------------------------
# File families: (line number, record) pairs
# ----------------------------------------------------------------------------------------------
def first_line(path: Path) -> str | None:
    with open(path, encoding="utf-8-sig") as f:  # utf-8-sig drops a byte-order mark
        return next((line for line in f if line.strip()), None)


def is_json_lines(line: str) -> bool:
    try:
        return isinstance(json.loads(line), (dict, list))
    except json.JSONDecodeError:
        return False


def json_records(path: Path):
    """(line, record) for every non-blank line; bad JSON is an error naming the line."""
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: bad JSON ({e.msg} at column {e.colno})") from None


def json_layout(path: Path) -> Layout:
    _, first = next(json_records(path))
    return HEXPHI_PREFILL if isinstance(first, list) else detect(path, "jsonl", first.keys())


def header_of(reader) -> list[str]:
    """The first non-blank record of a CSV reader, its column names stripped."""
    return [c.strip() for c in next((fields for fields in reader if fields), [])]


def csv_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return header_of(csv.reader(f))


def csv_records(path: Path):
    """(line where the record starts, {column: value}) for every non-blank record after the header. Quoted
    fields may hold commas and newlines; a record whose field count differs from the header's is an error."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = header_of(reader)
        start = reader.line_num + 1
        try:
            for fields in reader:
                if fields:  # the csv module returns [] for a blank line
                    if len(fields) != len(header):
                        raise ValueError(
                            f"{path}:{start}: {len(fields)} fields, but the header has "
                            f"{len(header)}; quote fields that contain commas"
                        )
                    yield start, dict(zip(header, fields))
                start = reader.line_num + 1
        except csv.Error as e:
            raise ValueError(f"{path}:{start}: unreadable CSV ({e})") from None


def text_rows(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    return [{"prompt": line.strip(), "source": "txt"} for line in lines if line.strip()]


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
def read_prompts(path, kind: str) -> list[dict]:
    """Rows in our schema (module docstring) from one local file whose layout is detected from its content
    (docs/method.md §9). kind "harmful" or "benign" picks the answer column (harmful_response or response)
    and, for XSTest, the half (unsafe or safe prompts). Errors name the file, and the line of a bad record."""
    path = Path(path)
    if kind not in ("harmful", "benign"):
        raise ValueError(f"read_prompts: kind must be 'harmful' or 'benign', got {kind!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (--{kind})")
    line = first_line(path)
    if line is None:
        raise ValueError(f"{path}: empty file; understood: {layouts_understood()}")
    if is_json_lines(line):
        layout, records = json_layout(path), json_records(path)
    elif path.suffix == ".txt" and not is_known_csv(path):
        return text_rows(path)
    else:
        layout, records = detect(path, "csv", csv_header(path)), csv_records(path)
    if layout.harmful_only and kind == "benign":
        raise ValueError(f"{path}: a {layout.name} file holds harmful prompts only; read it as --harmful")
    rows = []
    for lineno, rec in records:
        if not isinstance(rec, layout.record):
            raise ValueError(
                f"{path}:{lineno}: expected a JSON {layout.record.__name__} like the first "
                f"record, got {type(rec).__name__}"
            )
        try:
            row = layout.convert(rec, kind)
        except BadRow as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
        if row is not None:
            rows.append(row)
    return rows
