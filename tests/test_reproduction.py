"""A fresh build of the seed-0 world against results/eval_toy.json (the README's seed-0 rows): what holds.

- On one machine (one CPU kind, torch build and thread count) the build and its evaluation are deterministic:
  a second build gives exactly the first build's numbers. The slow test keeps its first build's summary in
  pytest's cache under a key of the machine, so running it twice on a machine checks this exactly.
- On another machine floating-point reductions differ in their last bits, and a greedy decode can tip on a
  near-tie (on another CPU one prompt of 200 changed two cells). So against the docs every rate must lie
  within its 95% Wilson interval over prompts, or within one prompt of the docs' value; a figure that is not
  a rate over prompts (benign NLL) within a relative 1e-3.

The slow test (`python -m pytest -m slow`; about 4 minutes on 2 CPU cores) builds the world; the default run
checks the comparison itself on synthetic numbers, and covers the build's code path with a scaled-down build
elsewhere (tests/conftest.py `toy`)."""

import hashlib
import json
import math
import platform
from pathlib import Path

import pytest
import torch

import eval as E
from data import toyworld as TW
from data import world as W
from lab import tables as T

DOCS = Path(__file__).resolve().parents[1] / "docs"
Z95 = 1.959963984540054  # the two-sided 95% normal quantile
NOT_RATES = ("nll", "mmlu")  # figures that are not a rate over prompts (MMLU counts questions, not prompts)
NOT_FIGURES = {"model", "decode", "seed", "alpha", "beta", "n", "n_of"}  # the other keys of a utility row


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of k successes in n (fractions)."""
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def cells(summary: list[dict]) -> dict[tuple, float]:
    """{(model, decode, figure, seed): value} of an evaluation summary (eval.summarize's rows)."""
    return {(r["model"], r["decode"], r["figure"], s): v for r in summary for s, v in r["per_seed"].items()}


def prompt_counts(evaluation: dict) -> dict[tuple, int]:
    """{(model, decode, figure, seed): prompts} of the rates in an eval.py output: each ASR row's n, and each
    utility figure's n_of (refusal rates: harmful prompts) or n (benign prompts)."""
    counts = {}
    for r in evaluation["results"]:
        counts[(r["model"], r["decode"], T.asr_figure(r), T.seed_key(r["seed"]))] = r.get("n")
    for u in evaluation["utility"]:
        for figure in set(u) - NOT_FIGURES - set(NOT_RATES):
            n = u.get("n_of", {}).get(figure, u.get("n"))
            counts[(u["model"], u["decode"], figure, T.seed_key(u["seed"]))] = n
    return {key: n for key, n in counts.items() if n is not None}


def agrees(expected: float, got: float, n: int | None) -> bool:
    """Whether a rebuilt rate `got` reproduces the docs' `expected` over n prompts: within the docs' 95%
    Wilson interval or within one prompt. n None: not a rate, equal to a relative 1e-3."""
    if n is None:
        return math.isclose(got, expected, rel_tol=1e-3, abs_tol=1e-9)
    lo, hi = wilson(round(expected * n), n)
    return lo <= got <= hi or abs(got - expected) * n <= 1 + 1e-9


def off_cells(expected: list[dict], built: list[dict], counts: dict[tuple, int]) -> list[str]:
    """Every cell of the docs' summary `expected` that the `built` summary does not reproduce (see agrees), as
    'model decode figure seed: docs X, built Y (n prompts)'; a missing cell and a rate without a prompt count
    are reported too. Cells only the build has (figures added since) are not compared."""
    got, off = cells(built), []
    for key, value in cells(expected).items():
        name = " ".join(key)
        n = counts.get(key)
        if key not in got:
            off.append(f"{name}: in the docs, not in the build")
        elif n is None and key[2] not in NOT_RATES:
            off.append(f"{name}: a rate without a prompt count in the build's output")
        elif not agrees(value, got[key], n):
            within = f"{n} prompts" if n is not None else "not a rate: relative 1e-3"
            off.append(f"{name}: docs {value:.6g}, built {got[key]:.6g} ({within})")
    return off


def machine_key() -> str:
    """What decides a build's last bits: the CPU, its kernels' instruction set, the torch build, threads."""
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    parts = [platform.machine(), cpu, torch.__version__, torch.backends.cpu.get_cpu_capability()]
    parts.append(f"{torch.get_num_threads()} threads")
    return " | ".join(parts)


@pytest.mark.slow
def test_a_fresh_seed_0_world_reproduces_docs_eval_toy(tmp_path, request):
    paths = TW.build_world(tmp_path / "world", W.World(0))
    built = json.loads((paths["root"] / "build.json").read_text())
    assert built["fingerprint"] == TW.fingerprint(W.World(0), TW.BuildConfig())
    summary = E.main(["--world", str(paths["root"]), "--out", str(tmp_path / "eval.json")])
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    docs = json.loads((DOCS / "eval_toy.json").read_text())["summary"]
    off = off_cells(docs, summary, prompt_counts(evaluation))
    assert not off, "the build differs from results/eval_toy.json beyond what machines change:\n" + "\n".join(
        off
    )

    cache = request.config.cache  # None under -p no:cacheprovider: no same-machine check then
    if cache is None:
        return
    machine = machine_key()
    key = "deepalign/eval_toy/" + hashlib.sha1(machine.encode()).hexdigest()[:16]
    first = cache.get(key, None)
    if first is None:
        cache.set(key, {"machine": machine, "summary": summary})  # the next run on this machine compares
        return
    assert cells(summary) == cells(first["summary"]), f"two builds on one machine ({machine}) differ"


# ------------------------------------------------------------------------------------------------
# The comparison itself, on synthetic numbers (default run)
# ------------------------------------------------------------------------------------------------
def row(figure: str, value: float, model: str = "aligned") -> dict:
    return {
        "model": model,
        "decode": "greedy",
        "figure": figure,
        "mean": value,
        "sd": 0.0,
        "per_seed": {"0": value},
    }


def test_wilson_interval_closed_forms():
    lo, hi = wilson(0, 200)
    assert lo == 0.0 and hi == pytest.approx(Z95**2 / (200 + Z95**2))  # k = 0: [0, z^2 / (n + z^2)]
    lo, hi = wilson(92, 200)
    assert lo < 0.46 < hi and (lo, hi) == pytest.approx((1 - wilson(108, 200)[1], 1 - wilson(108, 200)[0]))
    assert wilson(200, 200)[1] == 1.0


def test_off_cells_within_an_interval_or_one_prompt():
    docs = [
        row("prefill 5 all toy", 0.46),  # 92 of 200
        row("prefill 5 held_out toy", 0.48),  # 24 of 50
        row("prefill 0 all toy", 0.0),
        row("refusal_rate", 1.0),
        row("helpful_rate", 1.0),
        row("nll", 0.7536),
    ]
    counts = {
        ("aligned", "greedy", "prefill 5 all toy", "0"): 200,
        ("aligned", "greedy", "prefill 5 held_out toy", "0"): 50,
        ("aligned", "greedy", "prefill 0 all toy", "0"): 200,
        ("aligned", "greedy", "refusal_rate", "0"): 200,
        ("aligned", "greedy", "helpful_rate", "0"): 2,
    }
    near = [
        row("prefill 5 all toy", 0.465),  # one prompt more
        row("prefill 5 held_out toy", 0.6),  # six prompts more, inside [0.347, 0.616]
        row("prefill 0 all toy", 0.01),  # two prompts, inside [0, 0.0188]
        row("refusal_rate", 0.995),
        row("helpful_rate", 0.5),  # one prompt of 2
        row("nll", 0.75365),
        row("prefill 40 all toy", 0.3),  # only in the build: not compared
    ]
    assert off_cells(docs, docs, counts) == []
    assert off_cells(docs, near, counts) == []
    far = [
        row("prefill 5 all toy", 0.6),  # 28 prompts more, outside [0.393, 0.529]
        row("prefill 5 held_out toy", 0.48),
        row("prefill 0 all toy", 0.03),  # six prompts, outside
        row("refusal_rate", 0.975),  # five prompts fewer, outside [0.981, 1]
        row("nll", 0.76),
    ]
    assert off_cells(docs, far, counts) == [
        "aligned greedy prefill 5 all toy 0: docs 0.46, built 0.6 (200 prompts)",
        "aligned greedy prefill 0 all toy 0: docs 0, built 0.03 (200 prompts)",
        "aligned greedy refusal_rate 0: docs 1, built 0.975 (200 prompts)",
        "aligned greedy helpful_rate 0: in the docs, not in the build",
        "aligned greedy nll 0: docs 0.7536, built 0.76 (not a rate: relative 1e-3)",
    ]
    del counts[("aligned", "greedy", "helpful_rate", "0")]
    assert off_cells(docs, near, counts) == [
        "aligned greedy helpful_rate 0: a rate without a prompt count in the build's output"
    ]


BASE = {"model": "base", "decode": "greedy", "seed": 0}


def test_prompt_counts_from_an_eval_output():
    evaluation = {
        "results": [
            {**BASE, "attack": "prefill", "k": 5, "split": "all", "judge": "toy", "asr": 1.0, "n": 200},
            {**BASE, "attack": "insertion", "k": 10, "j": 4, "split": "held_out", "judge": "toy", "n": 50},
        ],
        "utility": [
            {
                **BASE,
                "helpful_rate": 1.0,
                "nll": 0.75,
                "n": 100,
                "refusal_rate held_out": 0.04,
                "n_of": {"refusal_rate held_out": 50},
            }
        ],
    }
    counts = prompt_counts(evaluation)
    assert counts[("base", "greedy", "prefill 5 all toy", "0")] == 200
    assert counts[("base", "greedy", "insertion 10 j4 held_out toy", "0")] == 50
    assert counts[("base", "greedy", "refusal_rate held_out", "0")] == 50
    assert counts[("base", "greedy", "helpful_rate", "0")] == 100
    assert ("base", "greedy", "nll", "0") not in counts and len(counts) == 4
