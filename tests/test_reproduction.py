"""Slow reproductions (`python -m pytest -m slow`; about 4 minutes on 2 CPU cores): a fresh build of the
seed-0 world reproduces docs/eval_toy.json, the README's seed-0 rows, exactly. The default run covers the same
code path with a scaled-down build."""

import json
from pathlib import Path

import pytest

import eval as E
from data import toyworld as TW
from data import world as W

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.slow
def test_a_fresh_seed_0_world_reproduces_docs_eval_toy(tmp_path):
    paths = TW.build_world(tmp_path / "world", W.World(0))
    built = json.loads((paths["root"] / "build.json").read_text())
    assert built["fingerprint"] == TW.fingerprint(W.World(0), TW.BuildConfig())
    summary = E.main(["--world", str(paths["root"]), "--out", str(tmp_path / "eval.json")])
    expected = json.loads((DOCS / "eval_toy.json").read_text())["summary"]
    assert E.markdown_table(summary) == E.markdown_table(expected)
    assert E.markdown_table(summary, split="held_out") == E.markdown_table(expected, split="held_out")
