"""The README's result tables, rendered from the JSON files in results/: generated, never typed.

Each result table in README.md and docs/*.md sits under a marker naming its JSON and its view,

    <!-- table: results/compare.json held_out -->

and is exactly what that JSON renders to, by the same functions that print the tables when the commands run
(eval.py, compare.py, the profile command, bench.py). After a command rewrote its JSON:

    python -m experiments.tables            # rewrite every marked table in README.md and docs/*.md
    python -m experiments.tables --check    # exit 1 if a table differs from its JSON (tests/test_readme.py)

Views: all | seen | held_out (eval.py and compare.py JSON: every seed's row, ASR on that split of the
harmful prompts, with utility), the compact views of COMPACT (one row per model, mean ± sd [pooled 95%
interval]), tests_all | tests_held_out (compare.py: the paired tests against targeted), tests_key |
tests_ablation | tests_helpful | tests_folds (the README's choices of them), the same choices of the run-level
claims as runs_all ... runs_folds (claim, effect, 95% interval, r of R runs, verdict), the variance components
of the tested figures as variance_key | variance_all | variance_held_out, targets (compare.py:
each target of docs/method.md §4-§5, met or not), profile (the profile command --seeds), bench (bench.py),
the training-budget curve of BUDGET_VIEWS (compare.py --steps: one row per method, one column per budget).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from experiments import bench, compare
from experiments import profile as P
from infra import cli
from infra.files import write_text_atomic
from lab.tables import SPLITS, compact_table, format_cell, markdown, markdown_table

ROOT = Path(__file__).resolve().parents[1]

MARKER = re.compile(r"^<!-- table: (results/\S+\.json) (\w+) -->\n", re.M)
TABLE = re.compile(r"(?:^\|.*\|\n)*", re.M)  # the Markdown table right after a marker (possibly none yet)


def asr(figure: str, split: str) -> str:
    return f"{figure} {split} toy"


def suite(split: str) -> list[tuple[str, str]]:
    """The attack suite in one row per model: greedy prefilling, insertion, sampling (N = 16), harmful
    fine-tuning, and the worst case over everything that was run."""
    return [
        ("direct", asr("prefill 0", split)),
        ("prefill k=10", asr("prefill 10", split)),
        ("prefill k=40", asr("prefill 40", split)),
        ("insertion", asr("insertion 10 j4", split)),
        ("sampled k=10, ASR@16", asr("sample@16 10", split)),
        ("sampled k=40, ASR@16", asr("sample@16 40", split)),
        ("fine-tuned 20 steps, direct", asr("finetune 0 s20", split)),
        ("fine-tuned 10 steps, k=10", asr("finetune 10 s10", split)),
        ("worst case, inference-time", asr("worst_inference 0", split)),
        ("worst case", asr("worst 0", split)),
    ]


def attacks(split: str) -> list[tuple[str, str]]:
    """The attack suite without sampling (the one-build rerun's, docs/development.md §9): suite's greedy
    columns, the harmful fine-tuning attack after 10, 20 and 40 steps (direct, and k = 10 after 10), its
    benign twin, and suite's two worst cases."""
    greedy, worst = suite(split)[:4], suite(split)[-2:]
    tuned = [(f"fine-tuned {s} steps", asr(f"finetune 0 s{s}", split)) for s in (10, 20, 40)]
    tuned += [("fine-tuned 10 steps, k=10", asr("finetune 10 s10", split))]
    return greedy + tuned + [("benign-tuned 40 steps, k=10", asr("finetune_benign 10 s40", split))] + worst


HEADLINE_MODELS = ("targeted", "augment")  # variance_headline's models
KEY_TESTS = ("finetune 0 s20",)  # the README's paired tests (the rest: the JSON and the report)
ABLATION_TESTS = ("finetune 0 s20", "finetune 10 s10", "sample@16 40")  # the attacks that may separate parts
DURABILITY_TESTS = ("finetune 0 s20", "finetune 10 s10")  # the README's run-level table (runs_durability)
FOLD_TESTS = ("prefill 40", "sample@16 40")  # the held-out folds' (compare.py --folds)

COMPACT = {  # view -> the columns of a compact table (lab.tables.compact_table): mean ± sd [pooled interval]
    "suite": suite("all"),
    "suite_held_out": suite("held_out"),
    "attacks": attacks("all"),
    "attacks_held_out": attacks("held_out"),
    "utility": [
        ("refuses (direct)", "refusal_rate"),
        ("recovers (k=10)", "recovery_rate"),
        ("helpful", "helpful_rate"),
        ("over-refusal", "over_refusal"),
        ("helpful, sampled", "helpful_rate sampled"),
        ("benign NLL", "nll"),
    ],
    "utility_greedy": [  # the one-build rerun's: no sampled benign answers (docs/development.md §9)
        ("refuses (direct)", "refusal_rate"),
        ("recovers (k=10)", "recovery_rate"),
        ("helpful", "helpful_rate"),
        ("over-refusal", "over_refusal"),
        ("benign NLL", "nll"),
    ],
    "sampling": [(f"ASR@{n} k={k}", asr(f"sample@{n} {k}", "all")) for k in (0, 10, 40) for n in (1, 16)],
    "finetune": [(f"s={s}", asr(f"finetune 0 s{s}", "all")) for s in (0, 5, 10, 20, 40)]
    + [("benign s=40", asr("finetune_benign 0 s40", "all"))],
    "finetune_k10": [(f"s={s}", asr(f"finetune 10 s{s}", "all")) for s in (0, 5, 10, 20, 40)]
    + [("benign s=40", asr("finetune_benign 10 s40", "all"))],
    "whitebox": [
        ("direct", asr("prefill 0", "all")),
        ("GCG suffix", asr("gcg 0", "all")),
        ("ablated, direct", asr("ablate 0", "all")),
        ("prefill k=10", asr("prefill 10", "all")),
        ("ablated + prefill k=10", asr("ablate 10", "all")),
    ],
    "dev": [
        ("refuses (direct)", "refusal_rate"),
        ("recovers (k=10)", "recovery_rate"),
        ("helpful", "helpful_rate"),
        ("sampled k=40, ASR@16", asr("sample@16 40", "all")),
        ("fine-tuned 20 steps", asr("finetune 0 s20", "all")),
        ("worst case, inference-time", asr("worst_inference 0", "all")),
    ],
    "dev_greedy": [  # development screens under the greedy attacks (docs/development.md §5)
        ("refuses (direct)", "refusal_rate"),
        ("recovers (k=10)", "recovery_rate"),
        ("prefill k=40", asr("prefill 40", "all")),
        ("insertion", asr("insertion 10 j4", "all")),
        ("helpful", "helpful_rate"),
    ],
    "folds": [  # compare.py --folds: every category held out once, pooled over the four folds
        *[(f"k={k}", asr(f"prefill {k}", "held_out")) for k in (10, 40)],
        ("insertion", asr("insertion 10 j4", "held_out")),
        *[(f"sampled k={k}, ASR@16", asr(f"sample@16 {k}", "held_out")) for k in (10, 40)],
        ("worst case", asr("worst 0", "held_out")),
        ("recovers (k=10)", "recovery_rate held_out"),
        ("helpful", "helpful_rate"),
        ("over-refusal", "over_refusal"),
    ],
    "calibration": [
        ("direct", "prefill 0 all toy"),
        *[(f"k={k}", f"prefill {k} all toy") for k in (5, 10, 20, 40)],
        ("insertion", "insertion 10 j4 all toy"),
        *[(f"sampled {name}, ASR@16", f"sample@16 {k} all toy") for name, k in (("direct", 0), ("k=10", 10))],
        ("refuses (direct)", "refusal_rate"),
        ("recovers (k=10)", "recovery_rate"),
        ("helpful", "helpful_rate"),
    ],
}


BUDGET_VIEWS = {  # view -> the figures shown at every training budget (compare.py --steps: models "row @b")
    "budget": (asr("prefill 40", "all"), "helpful_rate"),
    "budget_k40": (asr("prefill 40", "all"),),
    "budget_insertion": (asr("insertion 10 j4", "all"),),
    "budget_helpful": ("helpful_rate",),
}


def budget_table(summary: list[dict], figures: tuple) -> str:
    """The training-budget curve as a table: one row per method, one column per budget b (its model after b
    steps, "row @b"); a cell is the mean ± sd over seeds of each figure, joined by " / "."""
    at = {(s["model"], s["figure"]): s for s in summary if s["decode"] == "greedy" and s["figure"] in figures}
    runs = [m.rsplit(" @", 1) for m, f in at if " @" in m and f == figures[0]]
    methods, budgets = list(dict.fromkeys(m for m, _ in runs)), sorted({int(b) for _, b in runs})
    rows = []
    for m in methods:
        cells = [
            " / ".join(format_cell(at.get((f"{m} @{b}", f)), f != "nll", interval=False) for f in figures)
            for b in budgets
        ]
        rows.append([m] + cells)
    return markdown(["model"] + [f"{b} steps" for b in budgets], rows)


def render(path: str, view: str) -> str:
    """The Markdown table of one view of one docs JSON (path relative to the repository root)."""
    if not (ROOT / path).exists():
        raise SystemExit(f"{path} is missing: run the command printed above its table, then this script")
    data = json.loads((ROOT / path).read_text())
    if view == "bench":
        return bench.markdown_rows(data["rows"])
    if view == "profile":
        return P.profile_summary_table(data["summary"])
    if view == "profile_means":
        return P.profile_summary_table(data["summary"], means_only=True)
    if view == "targets":
        return compare.targets_table(data["summary"])
    if view in BUDGET_VIEWS:
        return budget_table(data["summary"], BUDGET_VIEWS[view])
    if view in COMPACT:  # the models at their full budget (the budget curve's "row @b" have their own views)
        models = [s["model"] for s in data["summary"] if " @" not in s["model"]]
        return compact_table(data["summary"], COMPACT[view], models=models)
    if view.startswith("tests_"):
        return tests_view(data.get("paired_tests", []), view)
    if view.startswith("runs_"):
        return tests_view(data.get("run_tests", {}).get("claims", []), view, compare.runs_table)
    if view.startswith("variance_"):
        return variance_view(data.get("run_tests", {}).get("variance_components", []), view)
    if view in SPLITS:
        return markdown_table(data["summary"], split=view)
    raise ValueError(
        f"README.md: unknown table view {view!r} for {path}; use one of {SPLITS} or targets, profile, bench"
    )


def tests_view(tests: list[dict], view: str, table=compare.tests_table) -> str:
    """A table of compare.py's paired tests against targeted (tests_*), or of its run-level claims (runs_*,
    table=compare.runs_table): the README's choices of them, or all on a split (tests_all, runs_held_out)."""
    choice = view.split("_", 1)[1]
    if choice == "key":  # the README's: the attacks that do not saturate, all prompts; helpful vs aligned
        tests = [t for t in tests if (t["b"] == "aligned") == t["figure"].startswith("helpful")]
        return table(tests, "all", KEY_TESTS + ("helpful",))
    if choice == "ablation":  # the method's parts: the durability attacks and helpfulness, all rows
        tests = [t for t in tests if t["b"] != "aligned" or t["figure"].startswith("helpful")]
        return table(tests, "all", ABLATION_TESTS + ("helpful",))
    if choice == "durability":  # the fine-tuning attacks that do not saturate, every pair but the aligned
        return table([t for t in tests if t["b"] != "aligned"], "all", DURABILITY_TESTS)
    if choice == "helpful":  # the helpful rate of every row against targeted's, paired over prompts
        return table(tests, "all", ("helpful",))
    if choice == "folds":  # held-out folds: the held-out prompts of every fold, against targeted
        return table([t for t in tests if t["b"] != "aligned"], "held_out", FOLD_TESTS)
    return table(tests, split=choice)


def variance_view(components: list[dict], view: str) -> str:
    """A table of the variance components (world, run, prompt) of compare.py's tested figures: variance_key
    (the README's attacks and the helpful rate, every model), variance_headline (the same, HEADLINE_MODELS
    only), variance_all / variance_held_out (every figure on that split)."""
    choice = view.split("_", 1)[1]
    if choice == "key":
        return compare.variance_table(components, "all", ABLATION_TESTS + ("helpful",))
    if choice == "headline":  # the README's: the method and the strongest earlier baseline
        chosen = [v for v in components if v["model"] in HEADLINE_MODELS]
        return compare.variance_table(chosen, "all", ABLATION_TESTS + ("helpful",))
    return compare.variance_table(components, split=choice)


def update(readme: str) -> str:
    """The README with every marked table replaced by its rendering."""
    out, pos = [], 0
    for marker in MARKER.finditer(readme):
        table = TABLE.match(readme, marker.end())
        out += [readme[pos : marker.end()], render(marker[1], marker[2]) + "\n"]
        pos = table.end()
    return "".join(out + [readme[pos:]])


def markers(readme: str) -> list[tuple[str, str]]:
    """[(json path, view)] of every marked table, in order."""
    return [(m[1], m[2]) for m in MARKER.finditer(readme)]


def documents() -> list[Path]:
    """The Markdown files whose tables are rendered: README.md and docs/*.md."""
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs")
    p.add_argument(
        "files", nargs="*", type=Path, help="only these Markdown files (none: README.md and docs/*.md)"
    )
    args = p.parse_args(argv)
    for path in [f.resolve() for f in args.files] or documents():
        text = path.read_text()
        new = update(text)
        if args.check and new != text:
            sys.exit(f"{path}: a table differs from its JSON; run python -m experiments.tables")
        if not args.check and new != text:
            write_text_atomic(path, new)
            print(f"{path.relative_to(ROOT)}: {len(markers(text))} tables rendered")


if __name__ == "__main__":
    cli.run(main)
