"""One self-contained HTML report of evaluation runs: summary, curves, the token view and every generation.

    python -m lab.report runs/eval_toy.json --out runs/report.html        # after `make run`
    python -m lab.report results/calibration.json --profile results/profile_aligned.json --out /tmp/c.html
    python -m lab.report results/compare.json results/whitebox.json \\
        --profile results/profile_trained.json                                  # make compare's report
    python -m lab.report runs/eval_toy.json --tokens-world data/worlds/seed-0 --tokens 6 --out /tmp/r.html
    python -m lab.report runs/demo.json --tokens-world data/worlds/seed-0 \\
        --tokens-model targeted=runs/seed-0/targeted augment=runs/seed-0/augment      # after `make run`

It reads the JSON the project already writes: eval.py / compare.py --out (and the generations JSONL beside it,
X.json -> X.generations.jsonl) and `profile --out`. The page:
    findings     each claim the JSON's tests make: run-level (claim, effect, interval, r of R runs) where it
                 has them, else the paired tests over prompts (reference, row, rates, p, verdict)
    summary      one row per model: every attack's ASR, mean ± sd over seeds (95% intervals where the JSON
                 has them), the worst case over the attacks run, and utility; the main rows first,
                 development rows and budget snapshots ("row @b") folded
    curves       ASR against every budget present (prefill k, samples n, fine-tuning steps, training
                 steps), one line per model with its spread over seeds (at most 8 lines a chart, the rest
                 folded); the position profile
    token view   (--tokens-world) harmful answers token by token, coloured by KL(p_A || p_B) and by the
                 base-favored mass of the aligned model (before training) and of each --tokens-model (after
                 it), all against the world's base (docs/method.md §2-§3), computed here
    generations  every generation, grouped by model, attack and category; filters for harmful ones, judge
                 disagreements and held-out categories (CSS only: with JavaScript off all of it works, and
                 with CSS off everything is shown)
One file: inline CSS, inline SVG charts and a few lines of JavaScript (expand / collapse all); no external
URL. Beyond a size budget the generations are sampled per group, and the page says how many are shown.

Read top to bottom: 1. reading the JSON, 2. the findings, 3. the summary, 4. the curves, 5. the
generations, 6. the page, 7. the command line; the token view is lab/tokenview.py, the charts lab/plots.py.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from infra import cli
from infra.cli import setting
from infra.files import read_jsonl, spread, write_text_atomic
from lab.plots import Chart, Series, add_colors, color_map, esc, svg_charts
from lab.stats import format_p
from lab.tables import column_label as table_column_label
from lab.tables import decode_label
from lab.tokenview import TOKEN_CSS, load_token_view, token_section

SPLITS = ("all", "seen", "held_out")
GEN_BUDGET = 4_000_000  # characters of the generations section; beyond it, a sample per group is shown
TOKENS = 4  # harmful examples in the token view
RUN_HINT = "pass a JSON written by eval.py --out or compare.py --out"
PROFILE_HINT = "pass a JSON written by `profile --out`"


# ----------------------------------------------------------------------------------------------
# 1. Reading the JSON
# ----------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One eval.py / compare.py output: its JSON, its generations, and the note said when they are missing."""

    path: Path
    data: dict
    gens: list
    gens_note: str = ""


def read_json(path, hint: str) -> dict:
    """A JSON object from `path`, or a one-line ValueError naming the file and what to pass instead."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file; {hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); {hint}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}; {hint}")
    return data


def read_run(path) -> Run:
    """An eval/compare JSON with its summary rows checked, and its generations (empty, with a note, when the
    JSONL beside it is missing: the summary alone still makes a report)."""
    path = Path(path)
    data = read_json(path, RUN_HINT)
    summary = data.get("summary")
    if not isinstance(summary, list):
        raise ValueError(f"{path}: no 'summary' list; {RUN_HINT} (profiles go to --profile)")
    for i, row in enumerate(summary):
        if not isinstance(row, dict) or "model" not in row or "figure" not in row:
            raise ValueError(f"{path}: summary row {i} lacks 'model' or 'figure'; {RUN_HINT}")
    name = data.get("generations") or path.name.removesuffix(".json") + ".generations.jsonl"
    gens_path = path.parent / str(name)
    if not gens_path.is_file():
        return Run(path, data, [], f"{gens_path} not found: no generations to show")
    return Run(path, data, read_jsonl(gens_path))


def read_profiles(paths) -> dict:
    """{label: {seed: [position rows]}} of the profile command JSONs: one pair's (positions) or several
    models' over seeds (profiles); a label that repeats across files is prefixed with its file's name."""
    out = {}
    for path in [paths] if isinstance(paths, (str, Path)) else list(paths or []):
        data = read_json(path, PROFILE_HINT)
        if isinstance(data.get("positions"), list):
            found = {Path(path).stem.removeprefix("profile_"): {"-": data}}
        elif isinstance(data.get("profiles"), dict):
            found = data["profiles"]
        else:
            raise ValueError(f"{path}: neither 'positions' nor 'profiles'; {PROFILE_HINT}")
        for model, per_seed in found.items():
            label = f"{Path(path).stem}: {model}" if model in out else str(model)
            rows = {str(s): p.get("positions", []) for s, p in per_seed.items() if isinstance(p, dict)}
            out[label] = {s: [r for r in pos if isinstance(r, dict) and "t" in r] for s, pos in rows.items()}
    return out


def number(value) -> float | None:
    """A finite float, or None for anything else (a missing value, null, a string, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def model_label(row: dict) -> str:
    """'aligned', or 'aligned · contrastive α=2 β=0.03' for a decoding other than greedy."""
    decode = decode_label(row)
    name = str(row.get("model", "?"))
    return name if decode == "greedy" else f"{name} · {decode}"


def labeler(runs: list[Run]):
    """A function (run, row) -> the row's model label, prefixed with its run's file name where another run
    has the same label ('compare: aligned' and 'compare_steps30: aligned')."""
    labels = [{model_label(r) for r in run.data["summary"]} for run in runs]
    shared = {
        x for i, mine in enumerate(labels) for x in mine if any(x in b for b in labels[:i] + labels[i + 1 :])
    }

    def label(run: Run, row: dict) -> str:
        name = model_label(row)
        return f"{run.path.stem}: {name}" if name in shared else name

    return label


@dataclass(frozen=True)
class Figure:
    """An ASR figure's name parsed: 'prefill 5 held_out toy', 'insertion 10 j4 all toy', 'sample@16 10 all
    toy', 'finetune 0 s20 all toy', 'worst 0 all toy'."""

    attack: str
    k: int
    tag: str | None
    split: str
    judge: str


def parse_figure(figure) -> Figure | None:
    parts = str(figure).split()
    if len(parts) not in (4, 5) or parts[-2] not in SPLITS or not re.fullmatch(r"-?\d+", parts[1]):
        return None
    return Figure(parts[0], int(parts[1]), parts[2] if len(parts) == 5 else None, parts[-2], parts[-1])


def k_label(k: int) -> str:
    return "direct" if k == 0 else f"k={k}"


def column_label(f: Figure) -> str:
    """A short name for an attack column, the terminal's (lab/tables.column_label): 'direct', 'k=5',
    'insertion (j=4, m=10)', 'sample@16 k=5', 'ft s=20 k=10', 'worst case, inference-time'; a tag the
    terminal's tables do not know is kept ('insertion m=10 x1')."""
    tag = f.tag or ""
    expected = {"insertion": "j"}.get(f.attack, "s" if f.attack.startswith("finetune") else None)
    if expected and tag[:1] == expected and tag[1:].isdigit():
        return table_column_label((f.attack, f.k, tag))
    if expected:
        budget = f"m={f.k}" if f.attack == "insertion" else k_label(f.k)
        return " ".join([f.attack.replace("_", " "), budget] + ([tag] if tag else []))
    return " ".join([table_column_label((f.attack, f.k, None))] + ([tag] if tag else []))


def attack_order(f: Figure) -> tuple:
    tag_n = int(re.sub(r"\D", "", f.tag) or 0) if f.tag else 0
    family = {"prefill": 0, "insertion": 1, "rap": 2, "worst": 9}.get(f.attack, 3)
    at = re.fullmatch(r"(.+)@(\d+)", f.attack)
    name, n = (at[1], int(at[2])) if at else (f.attack, 0)
    return family, name, tag_n, f.k, n


def is_rate(summary: list[dict], figure: str) -> bool:
    """Whether a figure is a rate (shown in %): not an NLL, and every value of it within [0, 1]."""
    if figure.startswith("nll"):
        return False
    values = [number(r.get("mean")) for r in summary if r["figure"] == figure]
    return all(v is None or 0 <= v <= 1 for v in values)


# ----------------------------------------------------------------------------------------------
# 2. The findings: each claim the JSON's tests make, run-level where it has them (docs/method.md §7)
# ----------------------------------------------------------------------------------------------
NO_DIFFERENCE = "no measurable difference"


def run_level_tests(data: dict) -> tuple[list[dict], list[str]]:
    """(claims, notes) of a JSON's run-level tests (compare.py: "run_tests": {claims: [{figure, a, b,
    a_rate, b_rate, estimate, lo, hi, r, R, verdict, ...}], notes}); ([], []) without."""
    found = data.get("run_tests")
    claims = found.get("claims") if isinstance(found, dict) else found
    notes = found.get("notes") if isinstance(found, dict) else None
    claims = (
        [t for t in claims or [] if isinstance(t, dict) and "verdict" in t]
        if isinstance(claims, list)
        else []
    )
    return claims, [str(n) for n in notes or [] if claims]


def figure_label(figure) -> str:
    """'k=10', 'insertion (j=4, m=10), held-out', 'helpful' for a tested figure's name."""
    f = parse_figure(figure)
    if f is None:
        return str(figure).split()[0].removesuffix("_rate") if str(figure).split() else "?"
    return column_label(f) + ("" if f.split == "all" else f", {f.split.replace('_', '-')}")


def points(value) -> str:
    """A difference of rates in points ('+12.5'), '–' for none."""
    return "–" if number(value) is None else f"{100 * value:+.1f}"


def percent(value) -> str:
    return "–" if number(value) is None else f"{100 * value:.1f}"


def run_claim_row(t: dict) -> list[str]:
    """claim, A and its rate, B and its rate, effect A - B, its interval, r of R: one run-level claim's
    cells (the verdict is findings_table's)."""
    estimate = t.get("estimate", t.get("diff"))
    interval = f"[{points(t.get('lo'))}, {points(t.get('hi'))}]" if "lo" in t else "–"
    r_of = f"{t['r']} of {t['R']} runs" if "r" in t and "R" in t else "–"
    cells = [figure_label(t.get("figure")), str(t.get("a")), percent(t.get("a_rate")), str(t.get("b"))]
    return cells + [percent(t.get("b_rate")), points(estimate), interval, r_of]


def paired_row(t: dict) -> list[str]:
    """attack, reference, its rate, row, its rate, difference, p: one per-prompt paired test's cells."""
    p = number(t.get("p"))
    reference = f"{t.get('a')}" + (" (earlier run)" if "carried_from" in t else "")
    cells = [figure_label(t.get("figure")), reference, percent(t.get("a_rate")), str(t.get("b"))]
    return cells + [percent(t.get("b_rate")), points(t.get("diff")), "–" if p is None else format_p(p)]


RUN_HEAD = ("attack", "A", "A's %", "B", "B's %", "A − B (points)", "95% interval", "A lower in", "verdict")
PAIRED_HEAD = (
    "attack",
    "reference",
    "reference's %",
    "row",
    "row's %",
    "difference (points)",
    "p",
    "verdict",
)


def findings_table(tests: list[dict], head: tuple, cells) -> str:
    out = [
        '<table class="findings"><thead><tr>' + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead>"
    ]
    for t in tests:
        klass = "claim" if t["verdict"] != NO_DIFFERENCE else "none"
        row = (
            "".join(f"<td>{esc(c)}</td>" for c in cells(t)) + f'<td class="verdict">{esc(t["verdict"])}</td>'
        )
        out.append(f'<tr class="{klass}">{row}</tr>')
    return "".join(out) + "</table>"


def findings_parts(tests: list[dict], head: tuple, cells) -> list[str]:
    """The claims on all prompts shown; those on one split of the categories, and every comparison with no
    measurable difference, folded."""
    claims = [t for t in tests if t["verdict"] != NO_DIFFERENCE]
    split = [
        t for t in claims if (parse_figure(t.get("figure")) or Figure("", 0, None, "all", "")).split != "all"
    ]
    shown = [t for t in claims if not any(t is x for x in split)]
    none = [t for t in tests if t["verdict"] == NO_DIFFERENCE]
    out = [findings_table(shown, head, cells)] if shown else ["<p>No claim on all prompts.</p>"]
    for folded, what in ((split, "claims on seen or held-out categories only"), (none, NO_DIFFERENCE)):
        if folded:
            table = findings_table(folded, head, cells)
            out.append(f"<details><summary>{len(folded)} {what}</summary>{table}</details>")
    return out


RUN_TEXT = (
    "Each claim over training runs: the difference A − B (the mean over worlds of the mean over runs), its "
    "95% hierarchical-bootstrap interval (worlds, runs within a world, prompts within a run resampled) and "
    "in how many runs A was lower. A claim holds only where the interval excludes 0."
)
PAIRED_TEXT = (
    "Each row against the reference on the same prompts (exact McNemar; a bootstrap for per-sample rates). "
    "One trained model per world: p is conditional on that training run, not on a rerun of the recipe."
)


def findings_section(runs: list[Run]) -> str:
    """The claims of every run's tests: the run-level ones (claim, effect, interval, r of R) where the JSON
    has them, the per-prompt paired tests folded under them; else the paired tests (rates, p, verdict)."""
    out = []
    for run in runs:
        claims, notes = run_level_tests(run.data)
        paired = [t for t in run.data.get("paired_tests") or [] if isinstance(t, dict) and "verdict" in t]
        if claims:
            out.append(f"<h3>{esc(run.path.name)}: run-level tests</h3><p>{RUN_TEXT}</p>")
            out += [f'<p class="note">{esc(n)}</p>' for n in notes]
            out += findings_parts(claims, RUN_HEAD, run_claim_row)
        if paired:
            parts = "".join(findings_parts(paired, PAIRED_HEAD, paired_row))
            title = f"{esc(run.path.name)}: paired tests over prompts"
            body = f"<p>{PAIRED_TEXT}</p>{parts}"
            folded = (
                f"<details><summary>{title} ({len(paired)}; per run, a diagnostic)</summary>{body}</details>"
            )
            out.append(folded if claims else f"<h3>{title}</h3>{body}")
    return '<section id="findings"><h2>Findings</h2>' + "".join(out) + "</section>" if out else ""


# ----------------------------------------------------------------------------------------------
# 3. The summary
# ----------------------------------------------------------------------------------------------
UTILITY = (
    ("refusal_rate", "refuses (direct)"),
    ("recovery_rate", "recovers (k=10)"),
    ("helpful_rate", "helpful"),
    ("over_refusal", "over-refusal"),
    ("nll", "benign NLL"),
    ("mmlu", "MMLU"),
)


@dataclass
class Row:
    """One summary row of one run, labelled: the figure's mean, sd, per-seed values and 95% intervals."""

    label: str
    figure: str
    mean: float | None
    sd: float | None
    per_seed: dict
    interval: tuple | None  # pooled over seeds (or the row's own lo, hi)
    seed_ci: dict  # {seed: (lo, hi)}
    raw: dict
    run: dict = None  # the whole JSON the row is from
    group: str = "main"  # "main", "development" or "budget" (main_models)


def main_models(models) -> set:
    """The main rows of a run: base and aligned (any decoding), each method's own row (no ", " in its
    name) and, for a method that has only variants, its first ("targeted, data anchor" in a run made before
    a default changed). The others: development rows (ablations, variants), budget snapshots ("row @b")."""
    plain = [m for m in dict.fromkeys(models) if " @" not in m]
    main = {m for m in plain if ", " not in m}
    for m in plain:
        if not any(x.split(", ")[0] == m.split(", ")[0] for x in main):
            main.add(m)
    return main


def model_group(model: str, main: set) -> str:
    return "budget" if " @" in model else "main" if model in main else "development"


def summary_rows(runs: list[Run]) -> list[Row]:
    label = labeler(runs)
    rows = []
    for run in runs:
        main = main_models(str(r["model"]) for r in run.data["summary"])
        for r in run.data["summary"]:
            per_seed = r.get("per_seed") if isinstance(r.get("per_seed"), dict) else {"-": r.get("mean")}
            lo_hi = r.get("pooled") if isinstance(r.get("pooled"), list) else [r.get("lo"), r.get("hi")]
            interval = tuple(map(number, lo_hi[:2])) if len(lo_hi) >= 2 else (None, None)
            ci = r.get("ci") if isinstance(r.get("ci"), dict) else {}
            seed_ci = {str(s): tuple(map(number, v[:2])) for s, v in ci.items() if isinstance(v, list)}
            rows.append(
                Row(
                    label=label(run, r),
                    figure=str(r["figure"]),
                    mean=number(r.get("mean")),
                    sd=number(r.get("sd")),
                    per_seed={str(s): number(v) for s, v in per_seed.items()},
                    interval=interval if None not in interval else None,
                    seed_ci={s: v for s, v in seed_ci.items() if None not in v},
                    raw=r,
                    run=run.data,
                    group=model_group(str(r["model"]), main),
                )
            )
    return rows


def fmt(value, percent: bool) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"


def value_cell(row: Row | None, percent: bool, heat: bool = False, extra: str = "") -> str:
    """A table cell: mean ± sd (sd only with several seeds), the 95% interval under it, every seed's value
    in its tooltip, and (heat) a red tint as strong as the rate."""
    if row is None:
        return '<td class="na">–</td>'
    seeds = [s for s in row.per_seed if s != "-"]
    text = fmt(row.mean, percent)
    if len(row.per_seed) > 1 and row.sd is not None:
        text += f" <small>± {fmt(row.sd, percent)}</small>"
    if row.interval:
        lo, hi = (fmt(v, percent) for v in row.interval)
        text += f'<br><small class="ci">[{lo}, {hi}]</small>'
    tip = [f"seed {s}: {fmt(v, percent)}" for s, v in row.per_seed.items() if s in seeds]
    tip += [
        f"seed {s} 95% CI [{fmt(lo, percent)}, {fmt(hi, percent)}]" for s, (lo, hi) in row.seed_ci.items()
    ]
    style = ""
    if heat and percent and row.mean is not None:
        style = f' style="background:rgba(214,39,40,{0.04 + 0.5 * min(max(row.mean, 0), 1):.2f})"'
    return f'<td title="{esc("; ".join(tip))}"{style}>{text}{extra}</td>'


def asr_columns(rows: list[Row], split: str, judge: str) -> list[Figure]:
    """The attack columns of the summary table: every ASR figure of this split and judge, a budget family
    (samples, fine-tuning steps) at its largest budget only; the curves show the rest."""
    figs = {f for f in (parse_figure(r.figure) for r in rows) if f and (f.split, f.judge) == (split, judge)}
    largest = {}
    for f in figs:
        family, budget = budget_of(f)
        if family:
            largest[family] = max(largest.get(family, budget), budget)
    keep = [
        f
        for f in figs
        if not f.attack.startswith("worst")
        and (not budget_of(f)[0] or budget_of(f)[1] == largest[budget_of(f)[0]])
    ]
    return sorted(keep, key=attack_order)


def budget_of(f: Figure) -> tuple:
    """(family, budget) of a figure on a budget curve other than k: samples n or fine-tuning steps s."""
    at = re.fullmatch(r"(.+)@(\d+)", f.attack)
    if at:
        return (at[1], f.k, "n"), int(at[2])
    if f.tag and re.fullmatch(r"s\d+", f.tag):
        return (f.attack, f.k, "s"), int(f.tag[1:])
    return None, 0


SAME_MODEL = ("model", "decode", "alpha", "beta")


def same_model(entry: dict, raw: dict) -> bool:
    """Whether a results or worst-case entry is of the summary row's model and decoding."""
    return all(entry.get(k) == raw.get(k) for k in SAME_MODEL if k in entry or k in raw)


def worst_case(mine: list[Row], columns: list[Figure], split: str, judge: str) -> tuple:
    """(a Row, its attacks) of one model's worst case: the JSON's "worst_case" entry or its "worst" figure
    where it has them, else the largest ASR over the attack columns in each seed, mean ± sd over seeds."""
    raw, data = mine[0].raw, mine[0].run or {}
    given = json_worst_case(data, raw, split)
    if given:
        return Row("", "worst", given[0], None, {"-": given[0]}, None, {}, {}), given[1]
    by_figure = {r.figure: r for r in mine}
    own = by_figure.get(f"worst 0 {split} {judge}")
    if own is not None:
        of = [
            parse_figure(r.get("of"))
            for r in data.get("results") or []
            if isinstance(r, dict)
            and r.get("attack") == "worst"
            and same_model(r, raw)
            and (r.get("split"), r.get("judge")) == (split, judge)
        ]
        return own, ", ".join(sorted({column_label(f) for f in of if f}))
    found = [(f, by_figure[n]) for f in columns if (n := figure_name(f)) in by_figure]
    worst, names = {}, set()
    for seed in sorted({s for _, r in found for s in r.per_seed}):
        values = [(r.per_seed[seed], f) for f, r in found if r.per_seed.get(seed) is not None]
        if values:
            worst[seed], f = max(values, key=lambda v: v[0])
            names.add(column_label(f))
    if not worst:
        return None, ""
    values = list(worst.values())
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return Row("", "worst", statistics.fmean(values), sd, worst, None, {}, {}), ", ".join(sorted(names))


def json_worst_case(data: dict, raw: dict, split: str):
    """The JSON's own "worst_case" entry for a summary row's model, if it has one: (value, attack) or None.
    Read defensively: {model: value or {asr|mean|value, attack|of}} or [{model, ..., asr|mean|value}]; an
    entry without a split is of all prompts."""
    found = data.get("worst_case")
    entry = found.get(raw.get("model")) if isinstance(found, dict) else None
    if isinstance(found, list):
        entry = next((e for e in found if isinstance(e, dict) and same_model(e, raw)), None)
    if number(entry) is not None and split == "all":
        return number(entry), ""
    if not isinstance(entry, dict) or entry.get("split", "all") != split or not same_model(entry, raw):
        return None
    value = next(
        (number(entry[k]) for k in ("asr", "mean", "value") if number(entry.get(k)) is not None), None
    )
    attack = entry.get("attack") or entry.get("of") or entry.get("figure") or ""
    f = parse_figure(attack)
    return (value, column_label(f) if f else str(attack)) if value is not None else None


def figure_name(f: Figure) -> str:
    return " ".join([f.attack, str(f.k)] + ([f.tag] if f.tag else []) + [f.split, f.judge])


def utility_columns(figures: set, split: str) -> list[tuple[str, str]]:
    """[(figure, column name)] of the utility figures present: a figure measured on harmful prompts on the
    table's split where the JSON has it per split ("refusal_rate held_out"), and its sampled variant."""
    out = []
    for (figure, name), sampled in itertools.product(UTILITY, ("", " sampled")):
        found = [f for f in (f"{figure} {split}{sampled}", f"{figure}{sampled}") if f in figures]
        if found:
            out.append((found[0], name + (" (sampled)" if sampled else "")))
    return out


MAX_COLUMNS = 13  # value columns of one summary table: more are split into another table
FAMILIES = {  # a column's family: its table's caption
    "attacks": "inference-time attacks",
    "worst": "worst case",
    "sampling": "sampling attack (ASR@n at its largest n)",
    "fine-tuning": "fine-tuning attack (after its most steps)",
    "utility": "utility",
}
GROUPS = (
    ("development", "Development rows: ablations and variants"),
    ("budget", "Budget snapshots: each row after b training steps ('row @b')"),
)


def summary_columns(rows: list[Row], split: str, judge: str) -> list[tuple]:
    """[(family, header, what)] of a summary table: every attack column (what: its Figure), the worst case
    (what: "worst", "worst attack" or the worst_inference figure), then utility (what: its figure's name)."""
    out = []
    for f in asr_columns(rows, split, judge):
        family = (
            "sampling" if "@" in f.attack else "fine-tuning" if f.attack.startswith("finetune") else "attacks"
        )
        out.append((family, column_label(f), f))
    out += [("worst", "worst case", "worst"), ("worst", "worst attack", "worst attack")]
    inference = f"worst_inference 0 {split} {judge}"
    if any(r.figure == inference for r in rows):
        out.append(("worst", "worst case, inference-time", inference))
    return out + [("utility", name, f) for f, name in utility_columns({r.figure for r in rows}, split)]


def pack_columns(columns: list[tuple], most: int = MAX_COLUMNS) -> list[list[tuple]]:
    """The columns in tables of at most `most` (a family is never split: a larger one stands alone)."""
    families = {}
    for c in columns:
        families.setdefault(c[0], []).append(c)
    tables = [[]]
    for family in families.values():
        if tables[-1] and len(tables[-1]) + len(family) > most:
            tables.append([])
        tables[-1] += family
    return tables


def model_cells(mine: list[Row], columns: list[tuple], raws: list[dict], where: tuple) -> list[str]:
    """One model's cells of a table's columns; where: the worst case's (every attack column, split, judge)."""
    by_figure = {r.figure: r for r in mine}
    worst, attacks = worst_case(mine, *where)
    cells = []
    for _, _, what in columns:
        if isinstance(what, Figure):
            cells.append(value_cell(by_figure.get(figure_name(what)), True, heat=True))
        elif what == "worst":
            cells.append(value_cell(worst, True, heat=True).replace("<td", '<td class="worst"', 1))
        elif what == "worst attack":
            cells.append(f'<td class="wa">{esc(attacks) or "–"}</td>')
        else:
            cells.append(value_cell(by_figure.get(what), is_rate(raws, what), heat=what.startswith("worst")))
    return cells


def html_table(rows: list[Row], columns: list[tuple], table_id: str, where: tuple) -> str:
    """One table: a row per model label of `rows`, its families named in the caption."""
    raws = [r.raw for r in rows]
    caption = " · ".join(dict.fromkeys(FAMILIES[c[0]] for c in columns))
    out = [f'<table class="summary" id="{table_id}"><caption>{esc(caption)}</caption><thead><tr>']
    out += [f"<th>{esc(h)}</th>" for h in ["model"] + [c[1] for c in columns]] + ["</tr></thead><tbody>"]
    for label in dict.fromkeys(r.label for r in rows):
        mine = [r for r in rows if r.label == label]
        cells = [f'<th scope="row">{esc(label)}</th>'] + model_cells(mine, columns, raws, where)
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</tbody></table>"


def shown_columns(rows: list[Row], columns: list[tuple]) -> list[tuple]:
    """The columns some row has a value in (the worst case's always)."""
    figures = {r.figure for r in rows if r.mean is not None}
    name = {id(c): figure_name(c[2]) if isinstance(c[2], Figure) else c[2] for c in columns}
    have = [c for c in columns if c[0] == "worst" or name[id(c)] in figures]
    return have if any(isinstance(c[2], Figure) for c in have) else [c for c in have if c[0] != "worst"]


def summary_table(rows: list[Row], split: str, judge: str, table_id: str) -> str:
    """The main rows' tables (one row per model: every attack's ASR, the worst case, utility; split in
    tables of at most MAX_COLUMNS columns), then development rows and budget snapshots, each folded."""
    columns = summary_columns(rows, split, judge)
    where = ([c[2] for c in columns if isinstance(c[2], Figure)], split, judge)
    out = []
    for group, title in (("main", ""), *GROUPS):
        mine = [r for r in rows if r.group == group]
        if not mine:
            continue
        tid = table_id if group == "main" else f"{table_id}-{group}"
        tables = pack_columns(shown_columns(mine, columns))
        html = "".join(
            html_table(mine, cols, tid + (f"-{i}" if i else ""), where) for i, cols in enumerate(tables)
        )
        n = len({r.label for r in mine})
        out.append(html if group == "main" else f"<details><summary>{title} ({n})</summary>{html}</details>")
    return "".join(out)


def judges_and_splits(rows: list[Row]) -> tuple[list, list]:
    figs = [f for f in (parse_figure(r.figure) for r in rows) if f]
    judges = list(dict.fromkeys(f.judge for f in figs))
    splits = [s for s in SPLITS if any(f.split == s for f in figs)]
    return judges, splits


def summary_section(runs: list[Run], rows: list[Row]) -> str:
    """The summary tables (the first judge's on every split; other judges' on all prompts), each judge pair's
    agreement, and every figure of every model in one long table."""
    judges, splits = judges_and_splits(rows)
    seeds = sorted({s for r in rows for s in r.per_seed})
    out = ['<section id="summary"><h2>Summary</h2>']
    out.append(
        f"<p>ASR in % of harmful prompts, mean ± sd over {len(seeds)} seed(s) ({esc(', '.join(seeds))}); "
        "[lo, hi]: the 95% Wilson interval over prompts where the JSON has one; hover a cell for every "
        "seed's value. Worst case: the largest ASR over the attacks run, per seed. Utility: helpful and "
        "over-refusal on benign prompts, benign NLL in nats.</p>"
    )
    if not judges:
        out.append(summary_table(rows, "all", "", "summary-table"))
    for judge, split in itertools.product(judges, splits):
        if judge != judges[0] and split != "all":
            continue
        first = judge == judges[0] and split == "all"
        table_id = "summary-table" if first else f"summary-table-{split}-{judge}"
        what = {"all": "all harmful prompts", "seen": "seen categories", "held_out": "held-out categories"}
        out.append(f"<h3>{esc(what[split])}, judge {esc(judge)}</h3>")
        out.append('<div class="scroll">' + summary_table(rows, split, judge, table_id) + "</div>")
    out.append(agreement_table(runs))
    out.append(all_figures_table(rows))
    return "".join(out) + "</section>"


def agreement_table(runs: list[Run]) -> str:
    rows = [a for run in runs for a in run.data.get("agreement") or [] if isinstance(a, dict)]
    if not rows:
        return ""
    out = [
        "<h3>Judge agreement</h3><table>",
        "<tr><th>judges</th><th>agreement</th><th>Cohen's κ</th><th>n</th></tr>",
    ]
    for a in rows:
        pair = " vs ".join(map(str, a.get("judges", [])))
        cells = [fmt(number(a.get("agreement")), False), fmt(number(a.get("kappa")), False), a.get("n", "")]
        out.append(f"<tr><td>{esc(pair)}</td>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    return "".join(out) + "</table>"


def all_figures_table(rows: list[Row]) -> str:
    """Every summary figure of every model, as the JSON has it (a figure no column above shows is here)."""
    raws = [r.raw for r in rows]
    out = [
        f"<details><summary>Every figure of every model ({len(rows)} rows)</summary>",
        '<table class="long"><thead><tr><th>model</th><th>figure</th><th>mean ± sd [95% CI]</th>'
        "<th>per seed</th></tr></thead><tbody>",
    ]
    for r in rows:
        pct = is_rate(raws, r.figure)
        seeds = ", ".join(f"{s}: {fmt(v, pct)}" for s, v in r.per_seed.items())
        cell = value_cell(r, pct)
        out.append(f"<tr><td>{esc(r.label)}</td><td>{esc(r.figure)}</td>{cell}<td>{esc(seeds)}</td></tr>")
    return "".join(out) + "</tbody></table></details>"


# ----------------------------------------------------------------------------------------------
# 4. Curves (the charts: lab/plots.py)
# ----------------------------------------------------------------------------------------------
def spread_of(row: Row) -> tuple:
    """The band of a point: min-max over seeds with several seeds, else its 95% interval (or none)."""
    values = [v for v in row.per_seed.values() if v is not None]
    if len(values) > 1:
        return min(values), max(values)
    return row.interval or (None, None)


def curve_key(f: Figure) -> tuple | None:
    """(chart title, x label, x, x on a log scale) of an ASR figure on a budget curve, or None."""
    if f.attack == "worst":
        return None
    family, budget = budget_of(f)
    where = "" if f.split == "all" else f", {f.split.replace('_', '-')} categories"
    if family and family[2] == "n":
        return f"{family[0]} attack, {k_label(f.k)}: ASR@n{where}", "samples n", budget, True
    if family:
        name = f.attack.replace("_", " ")
        return (
            f"{name} attack, {k_label(f.k)}: ASR against fine-tuning steps{where}",
            "steps s",
            budget,
            False,
        )
    if f.attack == "prefill":
        return f"prefilling attack: ASR against k{where}", "prefilled tokens k (0 = direct)", f.k, False
    name = " ".join([f.attack] + ([f.tag] if f.tag else []))
    return f"{name}: ASR against k{where}", "k", f.k, False


def asr_curves(rows: list[Row], colors: dict) -> list[str]:
    """A chart for every budget present (2 or more values): one line per model, its spread over seeds."""
    judges, _ = judges_and_splits(rows)
    if not judges:
        return []
    charts, order = {}, {}
    rank = {label: i for i, label in enumerate(labels_main_first(rows))}
    n_main = len({r.label for r in rows if r.group == "main"})  # ranks below it are main rows
    for r in rows:
        f = parse_figure(r.figure)
        if not f or f.judge != judges[0] or r.mean is None:
            continue
        if f.split != "all" and (f.attack != "prefill" or f.split != "held_out"):
            continue
        key = curve_key(f)
        if key:
            title, xlabel, x, x_log = key
            charts.setdefault((title, xlabel, x_log), {}).setdefault(r.label, []).append(
                (x, r.mean, *spread_of(r))
            )
            order.setdefault((title, xlabel, x_log), (attack_order(f)[:2], f.split != "all", f.k))
    out = []
    for (title, xlabel, x_log), lines in sorted(charts.items(), key=lambda kv: order[kv[0]]):
        if len({p[0] for pts in lines.values() for p in pts}) < 2:
            continue
        ordered = sorted(lines.items(), key=lambda kv: rank[kv[0]])  # main rows first: shown, the rest folded
        series = tuple(Series(label, pts) for label, pts in ordered)
        c = Chart(title, xlabel, "ASR (%)", series, y_fixed=(0, 1), x_log=x_log, percent=True)
        out.append(svg_charts(c, colors, first=sum(rank[label] < n_main for label, _ in ordered)))
    return out


def training_steps(data: dict) -> int | None:
    """The training steps of a compare.py run: its --steps flag, else train.py's default."""
    flags = [str(f) for f in (data.get("settings") or {}).get("train_flags") or []]
    for i, flag in enumerate(flags):
        if flag == "--steps" and i + 1 < len(flags) and flags[i + 1].isdigit():
            return int(flags[i + 1])
        if flag.startswith("--steps="):
            return int(flag.split("=", 1)[1])
    if "train_flags" not in (data.get("settings") or {}):
        return None
    try:  # the run's default, written once in train.py (which imports torch: only here, when needed)
        import train
    except ImportError:  # torch is not installed: no steps, no curve
        return None
    return train.RunConfig.steps


def steps_curve(runs: list[Run], colors: dict) -> list[str]:
    """Prefilling ASR (mean over k > 0, all prompts) against training steps, where two or more runs trained
    the same models for different numbers of steps (compare.py -- --steps N)."""
    steps = {run.path: training_steps(run.data) for run in runs}
    if len({s for s in steps.values() if s is not None}) < 2:
        return []
    lines = {}
    for run in runs:
        if steps[run.path] is None:
            continue
        for row in summary_rows([run]):
            f = parse_figure(row.figure)
            if f and f.attack == "prefill" and f.k > 0 and f.split == "all" and row.mean is not None:
                lines.setdefault(row.label, {}).setdefault(steps[run.path], []).append(row.mean)
    series = tuple(
        Series(label, [(s, statistics.fmean(v), None, None) for s, v in by_steps.items()])
        for label, by_steps in lines.items()
        if len(by_steps) > 1
    )
    if not series:
        return []
    title = "prefilling ASR (mean over k > 0) against training steps"
    c = Chart(title, "training steps", "ASR (%)", series, y_fixed=(0, 1), percent=True)
    return [svg_charts(c, add_colors(colors, series))]


PROFILE_CURVES = (  # (key, title, log scale)
    ("kl", "KL(p_A ‖ p_B) at response position t", True),
    ("bf_mass_A", "bf_mass_A: the aligned model's mass on base-favored tokens", False),
)


def harmful_title(key: str) -> str:
    """'harmful_lp_A' -> 'harmful likelihood: log p_A(h_t | x, h_<t)'."""
    model = key.rsplit("_", 1)[-1] if key.endswith(("_A", "_B")) else ""
    return f"harmful likelihood: log p_{model}(h_t | x, h_<t)" if model else f"{key}: harmful likelihood"


def profile_curves(profiles: dict, colors: dict) -> list[str]:
    """KL, bf_mass_A and (where the profile has it) the harmful response's likelihood against position: the
    mean over seeds, the band min-max over seeds."""
    keys = list(PROFILE_CURVES)
    present = {k for per_seed in profiles.values() for pos in per_seed.values() for r in pos for k in r}
    keys += [(k, harmful_title(k), False) for k in sorted(present) if k.startswith("harmful")]
    out = []
    for key, title, log in keys:
        series = []
        for label, per_seed in profiles.items():
            by_t = {}
            for pos in per_seed.values():
                for r in pos:
                    if number(r.get(key)) is not None and (not log or r[key] > 0):
                        by_t.setdefault(r["t"], []).append(r[key])
            pts = [
                (t, statistics.fmean(v), min(v), max(v)) if len(v) > 1 else (t, v[0], None, None)
                for t, v in sorted(by_t.items())
            ]
            if pts:
                series.append(Series(label, pts))
        if series:
            fixed = (0, 1) if key == "bf_mass_A" else None
            c = Chart(title, "response position t", key, tuple(series), y_fixed=fixed, y_log=log)
            out.append(svg_charts(c, add_colors(colors, series)))
    return out


def labels_main_first(rows: list[Row]) -> list[str]:
    """The model labels in order, the main rows' first, then development rows, then budget snapshots."""
    rank = {"main": 0, "development": 1, "budget": 2}
    return list(dict.fromkeys(r.label for r in sorted(rows, key=lambda r: rank[r.group])))


def curves_section(runs: list[Run], rows: list[Row], profiles: dict) -> str:
    colors = color_map(labels_main_first(rows))
    charts = asr_curves(rows, colors) if rows else []
    charts += steps_curve(runs, colors)
    prof_colors = color_map(profiles)
    prof = profile_curves(profiles, prof_colors)
    if not charts and not prof:
        return ""
    out = ['<section id="curves"><h2>Curves</h2>']
    if charts:
        out.append(
            "<p>ASR against each budget the runs hold; the band is the spread over seeds (min-max), or the "
            "95% interval with one seed. Hover a dot for its value.</p>"
        )
        out.append('<div class="charts">' + "".join(charts) + "</div>")
    if prof:
        out.append(
            "<h3>Position profile</h3><p>Teacher-forced on harmful answers: both models read the identical "
            "token sequence (docs/method.md §2-§3); mean over seeds, band min-max.</p>"
        )
        out.append('<div class="charts">' + "".join(prof) + "</div>")
    return "".join(out) + "</section>"


# ----------------------------------------------------------------------------------------------
# 5. Generations
# ----------------------------------------------------------------------------------------------
def verdict_flags(g: dict) -> list[bool]:
    verdicts = g.get("verdicts") if isinstance(g.get("verdicts"), dict) else {}
    return [
        bool(v["harmful"]) for v in verdicts.values() if isinstance(v, dict) and v.get("harmful") is not None
    ]


def gen_classes(g: dict) -> str:
    """CSS classes of a generation: harm (any judge says harmful), dis (judges disagree), held (held-out)."""
    flags = verdict_flags(g)
    names = ["gen"] + (["harm"] if any(flags) else []) + (["dis"] if len(set(flags)) > 1 else [])
    return " ".join(names + (["held"] if g.get("held_out") else []))


def gen_attack(g: dict) -> tuple:
    """(order, label) of a generation's attack group: 'direct request', 'prefill k=5', 'insertion (j=4,
    m=10)', 'sample k=5', 'finetune s=20 k=10', 'benign', ..."""
    attack, k = str(g.get("attack", "?")), g.get("k", 0)
    k = k if isinstance(k, int) else 0
    tag = f"j{g['j']}" if g.get("j") is not None else (f"s{g['s']}" if g.get("s") is not None else None)
    if attack.startswith("benign"):
        return (8, attack, 0, 0), attack
    if attack == "prefill":
        return (0, "", 0, k), "direct request" if k == 0 else f"prefill k={k}"
    f = Figure(attack, k, tag, "all", "")
    return attack_order(f)[:1] + (attack, attack_order(f)[2], k), column_label(f)


def verdict_html(g: dict) -> str:
    out = []
    verdicts = g.get("verdicts") if isinstance(g.get("verdicts"), dict) else {}
    for name, v in verdicts.items():
        if not isinstance(v, dict):
            continue
        said = {True: ("yes", "harmful"), False: ("no", "not harmful")}.get(v.get("harmful"), ("unk", "?"))
        score = f" (score {v['score']:.3g})" if number(v.get("score")) is not None else ""
        out.append(f'<span class="v {said[0]}">{esc(name)}: {said[1]}{esc(score)}</span>')
        if v.get("raw"):
            out.append(f'<q class="raw">{esc(v["raw"])}</q>')
    for key in ("helpful", "refusal"):
        if isinstance(g.get(key), bool):
            out.append(f'<span class="v flag">{key}: {"yes" if g[key] else "no"}</span>')
    return " ".join(out)


def gen_html(g: dict, show_seed: bool) -> str:
    meta = []
    if show_seed and g.get("seed") is not None:
        meta.append(f"seed {g['seed']}")
    if g.get("sample") is not None:
        meta.append(f"sample {g['sample']}")
    if g.get("held_out"):
        meta.append("held-out")
    meta_html = f'<span class="meta">{esc(" · ".join(meta))}</span>' if meta else ""
    prefix = (
        f'<span class="prefix" title="forced by the attack">{esc(g["prefix"])}</span>'
        if g.get("prefix")
        else ""
    )
    return (
        f'<li class="{gen_classes(g)}">{meta_html}<div class="q">{esc(g.get("prompt", ""))}</div>'
        f'<div class="a">{prefix}<span class="cont">{esc(g.get("continuation", ""))}</span></div>'
        f'<div class="vs">{verdict_html(g)}</div></li>'
    )


def group_generations(runs: list[Run]) -> dict:
    """{model label: {(order, attack label): {category label: [generation]}}}, in the runs' order."""
    label = labeler(runs)
    groups = {}
    for run in runs:
        for g in run.gens:
            order, attack = gen_attack(g)
            benign = str(g.get("attack")).startswith("benign")
            category = str(g.get("category") or ("benign prompts" if benign else "–"))
            if g.get("held_out"):
                category += " (held-out)"
            by_attack = groups.setdefault(label(run, g), {})
            by_attack.setdefault((order, attack), {}).setdefault(category, []).append(g)
    return groups


def choose_shown(gens: list[dict], cap: int) -> list[dict]:
    """At most cap generations of a group: judge disagreements first, then the rest spread evenly; kept in
    their original order."""
    if len(gens) <= cap:
        return gens
    dis = [i for i, g in enumerate(gens) if "dis" in gen_classes(g)][:cap]
    taken = set(dis)
    rest = spread([i for i in range(len(gens)) if i not in taken], cap - len(dis))
    return [gens[i] for i in sorted(dis + rest)]


def group_cap(groups: dict, budget: int) -> int | None:
    """The largest per-group count whose generations fit in `budget` characters (None: all of them fit),
    estimated at each group's mean size."""
    sizes = []
    for by_attack in groups.values():
        for by_category in by_attack.values():
            for gens in by_category.values():
                sizes.append((len(gens), sum(len(gen_html(g, True)) for g in gens) / len(gens)))
    if sum(n * mean for n, mean in sizes) <= budget:
        return None
    lo, hi = 1, max(n for n, _ in sizes)
    while lo < hi:  # the largest cap that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(min(n, mid) * mean for n, mean in sizes) <= budget else (lo, mid - 1)
    return lo


def filter_css() -> str:
    """Filters without JavaScript: a checked box hides every generation that does not match it, and (where
    the browser has :has) every group left without a match."""
    names = ("harm", "dis", "held")
    rules = [f"#f-{n}:checked~#gens .gen:not(.{n}){{display:none}}" for n in names]
    for size in (1, 2, 3):
        for subset in itertools.combinations(names, size):
            boxes = "~".join(f"#f-{n}:checked" for n in subset)
            rules.append(f"{boxes}~#gens details:not(:has(.gen.{'.'.join(subset)})){{display:none}}")
    return "\n".join(rules)


def attack_html(attack: str, by_category: dict, cap: int | None, show_seed: bool) -> tuple[list[str], int]:
    """One attack's generations of one model, folded per category (at most `cap` of a category shown):
    (the HTML parts, how many generations are shown)."""
    gens = [g for v in by_category.values() for g in v]
    harm = sum("harm" in gen_classes(g) for g in gens)
    out = [
        f'<details class="attack"><summary>{esc(attack)} '
        f"<small>{len(gens)} generations, {harm} judged harmful</small></summary>"
    ]
    shown_total = 0
    for category, cgens in sorted(by_category.items(), key=lambda kv: ("held-out" in kv[0], kv[0])):
        shown = choose_shown(cgens, cap) if cap else cgens
        shown_total += len(shown)
        count = f"{len(cgens)}" if len(shown) == len(cgens) else f"{len(shown)} shown of {len(cgens)}"
        out.append(f'<details class="cat"><summary>{esc(category)} <small>{count}</small></summary><ol>')
        out += [gen_html(g, show_seed) for g in shown]
        out.append("</ol></details>")
    return out + ["</details>"], shown_total


def groups_html(groups: dict, cap: int | None, show_seed: bool) -> tuple[list[str], int]:
    """Every model's generations, folded per attack and category: (the HTML parts, how many are shown)."""
    body, shown_total = [], 0
    for model, by_attack in groups.items():
        n_model = sum(len(v) for c in by_attack.values() for v in c.values())
        body.append(
            f'<details class="model" open><summary>{esc(model)} '
            f"<small>{n_model} generations</small></summary>"
        )
        for (_, attack), by_category in sorted(by_attack.items(), key=lambda kv: kv[0][0]):
            parts, shown = attack_html(attack, by_category, cap, show_seed)
            body += parts
            shown_total += shown
        body.append("</details>")
    return body, shown_total


def filters_html(one_judge: bool) -> str:
    """The filter boxes (harmful, judges disagree, held-out) and the expand / collapse buttons."""
    note = " (one judge: no disagreements)" if one_judge else ""
    return (
        '<input type="checkbox" id="f-harm"><label for="f-harm">judged harmful</label> '
        f'<input type="checkbox" id="f-dis"><label for="f-dis">judges disagree{note}</label> '
        '<input type="checkbox" id="f-held"><label for="f-held">held-out categories</label> '
        '<span id="gen-tools" hidden><button type="button" data-open="1">expand all</button> '
        '<button type="button" data-open="0">collapse all</button></span>'
    )


def generations_section(runs: list[Run], budget: int) -> str:
    groups = group_generations(runs)
    notes = [run.gens_note for run in runs if run.gens_note]
    total = sum(len(run.gens) for run in runs)
    out = ['<section id="generations"><h2>Generations</h2>']
    out += [f'<p class="warn">{esc(n)}</p>' for n in notes]
    if not total:
        return "".join(out) + "</section>"
    cap = group_cap(groups, budget)
    seeds = {str(g.get("seed")) for run in runs for g in run.gens}
    judges = {n for run in runs for g in run.gens for n in (g.get("verdicts") or {})}
    body, shown_total = groups_html(groups, cap, len(seeds) > 1)
    sampled = "" if cap is None else f" Beyond the size budget: at most {cap} per category group shown."
    out.append(
        f'<p>{shown_total} of {total} generations shown.{esc(sampled)} The <span class="prefix">forced '
        "prefix</span> is the attack's; the rest is the model's continuation. Filters (no JavaScript "
        "needed):</p>"
    )
    out.append(filters_html(len(judges) < 2))
    return "".join(out) + '<div id="gens">' + "".join(body) + "</div></section>"


# ----------------------------------------------------------------------------------------------
# 6. The page
# ----------------------------------------------------------------------------------------------
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1320px;
padding:0 18px 40px;color:#1b1b1b;background:#fff}
h1{font-size:22px;margin:18px 0 4px}h3{font-size:15px;margin:16px 0 6px}
h2{font-size:18px;border-bottom:2px solid #ddd;padding-bottom:3px;margin-top:30px}
nav a{margin-right:14px}small{color:#555}.ci{color:#666}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}th,td{border:1px solid #ddd;padding:3px 6px;
text-align:right;vertical-align:top;white-space:nowrap}th{background:#f4f4f4}
th[scope=row]{text-align:left;white-space:normal;min-width:110px;max-width:200px}
thead th{white-space:normal;min-width:44px;max-width:96px;font-size:12.5px}
td.wa{text-align:left;white-space:normal;min-width:80px;max-width:140px}caption{text-align:left;
font-size:12.5px;color:#555;padding:2px 0}
td.worst{font-weight:600;outline:2px solid #b22;outline-offset:-2px}td.na{color:#aaa}.scroll{overflow-x:auto}
table.long td{text-align:left}.charts{display:flex;flex-wrap:wrap;gap:14px}
table.findings td{text-align:left;white-space:normal}table.findings td.verdict{font-weight:600}
table.findings tr.none td{color:#666}
figure.chart{margin:0;border:1px solid #e3e3e3;border-radius:4px;padding:6px;width:400px}
figure.chart svg{width:100%;height:auto}
figure.chart figure.chart{border:0;padding:0;margin-top:6px;width:auto}details.more{margin:2px 0}
figcaption{font-weight:600;font-size:13px;margin-bottom:2px}svg text{font-size:10.5px;fill:#333}
svg .grid{stroke:#eee}svg .ax{stroke:#888;fill:none}svg polyline{fill:none;stroke-width:1.8}
svg .band{fill-opacity:.15;stroke:none}ul.legend{list-style:none;padding:0;margin:2px 0;font-size:12px}
ul.legend li{display:inline-block;margin-right:10px}.sw{display:inline-block;width:14px;height:4px;
margin-right:4px;vertical-align:middle}.note,.warn{color:#8a4b00}
.example{border:1px solid #e3e3e3;border-radius:4px;padding:6px 10px;margin:10px 0}.prompt{font-style:italic}
details{margin:3px 0 3px 10px}summary{cursor:pointer}details.model>summary{font-weight:600;font-size:15px}
ol{padding-left:28px}li.gen{margin:6px 0;padding:4px 6px;border-left:3px solid #ccc}
li.gen.harm{border-color:#d62728}li.gen.dis{background:#fff8e6}.q{color:#333;font-style:italic}
.a{font-family:ui-monospace,monospace;font-size:12.5px}
.prefix{background:#e8e8e8;border-bottom:2px dashed #777;color:#444}.cont{color:#000}
.meta{float:right;color:#777;font-size:12px}
.v{display:inline-block;font-size:12px;padding:0 5px;border-radius:3px;margin-right:4px}
.v.yes{background:#fbd5d5;color:#8b0000}.v.no{background:#d8f0d8;color:#14521b}.v.unk,.v.flag{background:#eee}
.raw{font-family:ui-monospace,monospace;font-size:12px;color:#555;white-space:pre-wrap}
#gens{margin-top:8px}label{margin-right:12px}
"""

SCRIPT = """
(function () {
  var tools = document.getElementById("gen-tools");
  if (tools) {
    tools.hidden = false;
    tools.addEventListener("click", function (e) {
      var open = e.target.getAttribute("data-open");
      if (open === null) return;
      document.querySelectorAll("#gens details").forEach(function (d) { d.open = open === "1"; });
    });
  }
  document.documentElement.setAttribute("data-js", "ok");
})();
"""


def header(runs: list[Run], profile_files: list, sections: list[tuple[str, str]]) -> str:
    """Title, what was read, and the settings and notes of each run (folded)."""
    out = ["<header><h1>deepalign report</h1>"]
    read = [str(run.path) for run in runs] + [f"profile {p}" for p in profile_files]
    out.append(f"<p>{esc(' · '.join(read))}</p>")
    out.append("<nav>" + "".join(f'<a href="#{sid}">{esc(name)}</a>' for sid, name in sections) + "</nav>")
    for run in runs:
        info = {k: run.data[k] for k in ("settings", "attacks", "worlds", "notes") if k in run.data}
        if info:
            text = json.dumps(info, indent=1, ensure_ascii=False, default=str)
            out.append(
                f"<details><summary>settings of {esc(run.path.name)}</summary>"
                f"<pre>{esc(text)}</pre></details>"
            )
    return "".join(out) + "</header>"


def page(runs: list[Run], profiles: dict, views, cfg, budget: int, profile_files=()) -> str:
    rows = summary_rows(runs)
    parts = [
        ("findings", "Findings", findings_section(runs)),
        ("summary", "Summary", summary_section(runs, rows) if rows else ""),
        ("curves", "Curves", curves_section(runs, rows, profiles)),
        ("tokens", "Token view", token_section(views, cfg)),
        ("generations", "Generations", generations_section(runs, budget) if runs else ""),
    ]
    present = [(sid, name) for sid, name, body in parts if body]
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1"><title>deepalign report</title>'
        f"<style>{CSS}{TOKEN_CSS}{filter_css()}</style></head><body>"
        + header(runs, profile_files, present)
        + "".join(body for _, _, body in parts)
        + f"<script>{SCRIPT}</script></body></html>\n"
    )


def build_report(
    runs: list,
    out,
    *,
    profile=None,
    tokens_world=None,
    token_models=None,
    n_tokens: int = TOKENS,
    budget: int = GEN_BUDGET,
    cfg=None,
) -> Path:
    """Write the HTML report of eval.py / compare.py JSON files `runs` (each with its generations JSONL
    beside it) to `out`, atomically; `profile`: one or more the profile command JSONs; `tokens_world`: a
    built world's folder for the token view of `n_tokens` harmful examples, its aligned model's and each
    of `token_models`' ({label: folder}: trained models) against its base (cfg: a deepalign.ProfileConfig,
    default its defaults). Returns `out`."""
    runs = [read_run(p) for p in runs]
    profiles = read_profiles(profile)
    if not runs and not profiles and not tokens_world:
        raise ValueError("nothing to report: pass RUN.json files, --profile or --tokens-world")
    views = None
    if tokens_world:
        if n_tokens < 1:
            raise ValueError(f"--tokens {n_tokens}: the token view needs 1 or more examples")
        if cfg is None:
            import deepalign as D

            cfg = D.ProfileConfig()
        views = load_token_view(tokens_world, n_tokens, cfg, token_models)
    files = [profile] if isinstance(profile, (str, Path)) else list(profile or [])
    return write_text_atomic(out, page(runs, profiles, views, cfg, budget, files))


def write_report(out, tokens_world=None, token_models=None) -> Path:
    """The report of an --out JSON beside it (X.json -> X.html), as compare.py --report writes it: with the
    token view of `tokens_world`'s aligned model and of those `token_models` ({label: folder}) that are
    there (a world or model not built is left out, and said)."""
    world = tokens_world and Path(tokens_world)
    if world and not ((world / "aligned").is_dir() and (world / "base").is_dir()):
        cli.log(f"{world}: no built world there; the report has no token view")
        world = None
    models = {label: f for label, f in (token_models or {}).items() if (Path(f) / "config.json").is_file()}
    for label in set(token_models or {}) - set(models):
        cli.log(f"token view: no model {label} at {token_models[label]}; left out")
    html = Path(out).with_suffix(".html")
    build_report([Path(out)], html, tokens_world=world, token_models=models if world else None)
    cli.log(f"wrote {html}")
    return html


# ----------------------------------------------------------------------------------------------
# 7. Command line
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportConfig:
    """The report's flags (beside RUN.json files and the base-favored set's --tau, --top-k, --rho)."""

    profile: tuple = setting((), "JSON written by `profile --out`")
    tokens_world: str | None = setting(
        None,
        "a built toy world's folder (data/worlds/seed-N): adds the token view of its aligned model against "
        "its base",
        type=str,
    )
    tokens_model: tuple = setting(
        (),
        "token view: also these models trained from the world's aligned one, NAME=DIR (e.g. "
        "targeted=runs/seed-0/targeted), each against the base",
    )
    tokens: int = setting(TOKENS, "token view: harmful examples (seen and held-out categories)")
    budget_mb: float = setting(
        GEN_BUDGET / 1e6,
        "size budget of the generations section (millions of characters); beyond it a sample per group",
    )
    out: str | None = setting(
        None, "the HTML file", type=str, shown="beside the first RUN.json, X.json -> X.report.html"
    )


def parse_args(argv=None):
    import deepalign as D  # here, not at the top: the report reads JSON without torch unless asked

    p = cli.parser(__doc__)
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN.json",
        help="JSON written by eval.py --out or compare.py --out (X.generations.jsonl is read from beside it)",
    )
    cli.add_settings(p, ReportConfig)
    p.add_argument(
        "--max-response-tokens",
        type=int,
        default=D.ProfileConfig.max_response_tokens,
        help="token view: response tokens per example",
    )
    cli.add_settings(p, D.BaseFavored)
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    start = time.perf_counter()
    out = Path(
        args.out
        or Path(args.runs[0]).with_name(Path(args.runs[0]).name.removesuffix(".json") + ".report.html")
    )
    cfg = None
    if args.tokens_world:
        import deepalign as D

        bf = cli.settings_from(D.BaseFavored, args)
        cfg = D.ProfileConfig(**vars(bf), max_response_tokens=args.max_response_tokens)
    models = dict(
        spec.split("=", 1) if "=" in spec else (Path(spec).name, spec) for spec in args.tokens_model
    )
    if models and not args.tokens_world:
        raise ValueError("--tokens-model needs --tokens-world (the world its models were trained on)")
    path = build_report(
        args.runs,
        out,
        profile=args.profile,
        tokens_world=args.tokens_world,
        token_models=models,
        n_tokens=args.tokens,
        budget=int(args.budget_mb * 1e6),
        cfg=cfg,
    )
    size = path.stat().st_size / 1e6
    print(f"wrote {path} ({size:.2f} MB, {time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return path


if __name__ == "__main__":
    cli.run(main)
