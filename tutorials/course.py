"""What every lesson shares: the repository on the import path, the world it runs on, its sizes, and a small
HTML view of coloured tokens. Every lesson imports it first.

    DEEPALIGN_COURSE_WORLD=<folder>   run the lessons on that built world instead of the seed-0 one
    DEEPALIGN_COURSE_QUICK=1          the test suite's sizes: few prompts, few steps (tests/test_course.py)
"""

from __future__ import annotations

import html
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

QUICK = os.environ.get("DEEPALIGN_COURSE_QUICK", "") not in ("", "0")
RUNS = Path(os.environ.get("DEEPALIGN_COURSE_RUNS", ROOT / "runs" / "course"))  # what lessons write


def size(full, quick):
    """A lesson's size: `full` on the seed-0 world, `quick` under the test suite."""
    return quick if QUICK else full


def world() -> dict:
    """The paths of the world the lessons use: DEEPALIGN_COURSE_WORLD if set, else the seed-0 toy world
    (built on first use: about 3 minutes on 2 CPU cores, once)."""
    from data import toyworld

    folder = os.environ.get("DEEPALIGN_COURSE_WORLD")
    start = time.perf_counter()
    if folder is None and not toyworld.is_built(toyworld.default_world_dir(0), toyworld.W.World(0)):
        print("building the seed-0 toy world (about 3 minutes on 2 CPU cores, done once) ...")
    paths = toyworld.ensure_world(folder)
    print(f"world: {paths['root']} (ready in {time.perf_counter() - start:.1f} s)")
    return paths


def rows(paths: dict, name: str, full: int, quick: int) -> list[dict]:
    """`size(full, quick)` rows of one of the world's data sets, spread evenly over it (the sets are stored
    category by category, so the first rows would all be of one or two categories)."""
    from data import toyworld
    from infra.files import spread

    return spread(toyworld.read_set(paths, name), size(full, quick))


def load_models(paths: dict):
    """(tokenizer, base model, aligned model) of a world, in float32 on the CPU, in eval mode."""
    from infra.hf import load_model
    from infra.tokenizer import Tokenizer

    return Tokenizer(paths["aligned"]), load_model(paths["base"]).eval(), load_model(paths["aligned"]).eval()


def token_html(texts: list[str], values: list[float], vmax: float | None = None, title: str = "") -> str:
    """Tokens as coloured spans: the larger the value, the redder the background (value / vmax, capped at 1);
    each token's value in its tooltip. For IPython.display.HTML."""
    vmax = vmax or max(max(values, default=0.0), 1e-9)
    spans = []
    for text, v in zip(texts, values):
        level = min(1.0, max(0.0, v / vmax))
        colour = f"rgba(220, 40, 40, {level:.2f})"
        spans.append(
            f'<span title="{v:.3f}" style="background:{colour};padding:1px 2px;margin:0 1px;'
            f'border-radius:3px;font-family:monospace">{html.escape(text)}</span>'
        )
    head = f"<div><b>{html.escape(title)}</b></div>" if title else ""
    return f'{head}<div style="line-height:2">{"".join(spans)}</div>'


def bars(rows: list[tuple[str, float]], width: int = 40, fmt: str = "{:.3f}") -> None:
    """Print a text bar chart: one row per (label, value), bars scaled to the largest value."""
    top = max((v for _, v in rows), default=0.0) or 1.0
    pad = max((len(label) for label, _ in rows), default=0)
    for label, v in rows:
        print(f"{label:>{pad}}  {fmt.format(v):>8}  {'#' * round(width * max(v, 0.0) / top)}")


def elapsed(start: float) -> None:
    """The lesson's closing line: how long it took."""
    print(f"this lesson ran in {time.perf_counter() - start:.0f} s" + (" (test sizes)" if QUICK else ""))
