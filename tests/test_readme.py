"""The README's numbers are generated, never typed: every table in README.md follows the command that wrote
its JSON in docs/, and equals what that JSON renders to (the same functions print the tables when the commands
run). A table whose JSON changed, or a number typed by hand, fails here."""

import json
import re
from pathlib import Path

import bench
import deepalign as D
import eval as E

ROOT = Path(__file__).resolve().parents[1]


def sections(readme: str):
    """[(the docs/*.json a code block writes, [the Markdown tables that follow it, up to the next code block
    or heading])]."""
    out = []
    blocks = re.split(r"^```[a-z]*\n(.*?)^```\n", readme, flags=re.S | re.M)
    # re.split with one group: text, code, text, code, ...
    for i in range(1, len(blocks), 2):
        written = re.findall(r"--out (docs/\S+\.json)", blocks[i])
        following = re.split(r"^#", blocks[i + 1], flags=re.M)[0] if i + 1 < len(blocks) else ""
        tables = re.findall(r"((?:^\|.*\|\n)+)", following, flags=re.M)
        for path in written:
            out.append((path, [t.rstrip("\n") for t in tables]))
    return out


def rendered(path: Path) -> set[str]:
    """Every table a docs JSON renders to."""
    data = json.loads(path.read_text())
    if "rows" in data:  # bench.py
        return {bench.markdown_rows(data["rows"])}
    if isinstance(data.get("summary"), dict):  # deepalign.py profile --seeds
        return {D.profile_summary_table(data["summary"])}
    return {E.markdown_table(data["summary"], split=split) for split in E.SPLITS}


def test_every_readme_table_is_what_its_json_renders():
    readme = (ROOT / "README.md").read_text()
    found = sections(readme)
    assert found, "README.md shows no command that writes docs/*.json"
    for path, tables in found:
        assert (ROOT / path).exists(), f"README.md cites {path}, which does not exist"
        assert tables, f"README.md: no table follows the command that writes {path}"
        expected = rendered(ROOT / path)
        for table in tables:
            assert table in expected, f"README.md: a table after {path} is not what it renders to:\n{table}"
