"""The course in tutorials/: every lesson runs top to bottom with its exercises solved (tutorials/solutions/)
and with them not done (the checker says "not done yet" and the lesson goes on), on the small test world
(the `toy` fixture) at the lessons' test sizes; and every checker accepts the solution and rejects plausible
wrong answers (a checker that accepts anything would teach nothing)."""

import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

import deepalign as D

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
sys.path.insert(0, str(TUTORIALS))
LESSONS = sorted(TUTORIALS.glob("lesson*.ipynb"))

import checks  # noqa: E402


def solution(name: str):
    return runpy.run_path(str(TUTORIALS / "solutions" / f"{name}.py"))[name]


def exercise_names(nb) -> list[str]:
    tags = [t for cell in nb.cells for t in cell.metadata.get("tags", [])]
    return [t.split(":", 1)[1] for t in tags if t.startswith("exercise:")]


def read(path):
    nbformat = pytest.importorskip("nbformat")
    return nbformat.read(path, as_version=4)


def execute(nb, monkeypatch, world: Path, runs: Path) -> str:
    """Run a notebook in a fresh kernel (cwd tutorials/) on `world` at test sizes; its text outputs."""
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("DEEPALIGN_COURSE_WORLD", str(world))
    monkeypatch.setenv("DEEPALIGN_COURSE_QUICK", "1")
    monkeypatch.setenv("DEEPALIGN_COURSE_RUNS", str(runs))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(TUTORIALS)}}
    )
    client.execute()
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_lessons_are_stored_clean_and_linked():
    assert len(LESSONS) >= 6
    for path in LESSONS:
        nb = read(path)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} holds outputs"
        prose = "".join(c.source for c in nb.cells if c.cell_type == "markdown")
        assert "docs/method.md" in prose and ".py](../" in prose, f"{path.name} links no source or section"
        names = exercise_names(nb)
        assert 1 <= len(names) <= 3, path.name
        for name in names:
            assert (TUTORIALS / "solutions" / f"{name}.py").exists() and hasattr(checks, name)
            assert name in WRONG, f"{name}: no wrong answer shows that its checker rejects anything"


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs_solved_and_undone(path, toy, tmp_path, monkeypatch):
    nb = read(path)
    names = exercise_names(nb)
    undone = execute(read(path), monkeypatch, toy["root"], tmp_path / "undone")
    for name in names:
        assert f"{name}: not done yet" in undone
    for cell in nb.cells:
        for tag in cell.metadata.get("tags", []):
            if tag.startswith("exercise:"):
                cell.source = (TUTORIALS / "solutions" / f"{tag.split(':', 1)[1]}.py").read_text()
    solved = execute(nb, monkeypatch, toy["root"], tmp_path / "solved")
    for name in names:
        assert f"{name}: all " in solved and "not done yet" not in solved, solved[-2000:]
    assert "this lesson ran in" in solved


def plugin_asr(c, N, n):
    return 1 - (1 - c / N) ** n


def wald(k, n, z=1.959963984540054):
    p = k / n if n else 0.0
    half = z * math.sqrt(p * (1 - p) / n) if n else 1.0
    return max(0.0, p - half), min(1.0, p + half)


def binom_cdf(m, n):
    return sum(math.comb(n, i) for i in range(m + 1)) / 2**n


def strict_top_k(lp_A, lp_B, tau, k, rho):
    """Ties at the k-th place left out (topk's indices)."""
    top = torch.zeros_like(lp_B, dtype=torch.bool).scatter(-1, lp_B.topk(k, -1).indices, True)
    return D.base_favored_mask(lp_A, lp_B, D.BaseFavored(tau, lp_B.shape[-1], rho)) & top


def head(lp_A, beta):
    return D.head_mask(lp_A, beta)


WRONG = {  # exercise: [(what the wrong answer does, the function)]
    "kl_per_position": [
        ("arguments swapped: KL(Q || P)", lambda P, Q: D.kl_per_position(Q, P)),
        ("0 * log 0 left as nan", lambda P, Q: (P.exp() * (P - Q)).sum(-1)),
        ("log-ratio without the p weight", lambda P, Q: (P - Q).clamp(-1e9, 1e9).sum(-1)),
    ],
    "base_favored_mask": [
        (
            "no top-k filter",
            lambda A, B, t, k, r: D.base_favored_mask(A, B, D.BaseFavored(t, B.shape[-1], r)),
        ),
        ("no relative floor rho", lambda A, B, t, k, r: D.base_favored_mask(A, B, D.BaseFavored(t, k, 0.0))),
        ("tau ignored", lambda A, B, t, k, r: D.base_favored_mask(A, B, D.BaseFavored(1.0, k, r))),
        ("ties at the k-th place left out", strict_top_k),
        (
            "top-k of the aligned model",
            lambda A, B, t, k, r: (
                D.base_favored_mask(B, A, D.BaseFavored(t, k, r))
                & D.base_favored_mask(A, B, D.BaseFavored(t, k, r))
            ),
        ),
    ],
    "bf_mass": [
        ("log-probabilities summed", lambda lp, m: torch.where(m, lp, 0.0).sum(-1)),
        ("mean instead of sum", lambda lp, m: torch.where(m, lp.exp(), 0.0).mean(-1)),
    ],
    "contrastive_scores": [
        ("no plausibility head", lambda A, B, a, b: A + a * (A - B.clamp(min=-1e4))),
        ("the contrast's sign flipped", lambda A, B, a, b: D.contrastive_logits(A, B, D.Contrast(-a, b))),
        (
            "head read from the base",
            lambda A, B, a, b: (A + a * (A - B.clamp(min=-1e4))).masked_fill(~head(B, b), float("-inf")),
        ),
        ("lp_B not floored", lambda A, B, a, b: (A + a * (A - B)).masked_fill(~head(A, b), float("-inf"))),
    ],
    "penalty_weights": [
        ("no clip at w_max", lambda m, w: m / m.mean().clamp(min=1e-8)),
        ("normalised by the max", lambda m, w: (m / m.max().clamp(min=1e-8)).clamp(0, w)),
        ("mean not clamped (nan at 0)", lambda m, w: (m / m.mean()).clamp(0, w)),
    ],
    "hybrid_teacher": [
        ("lam on the soft part", lambda p, t, lam: D.clean_teacher(p, t, 1 - lam)),
        ("the soft part alone", lambda p, t, lam: p),
    ],
    "asr_at_n": [
        ("1 - (1 - c/N)^n on the sample rate", plugin_asr),
        ("the sample rate c/N, whatever n", lambda c, N, n: c / N),
    ],
    "wilson_interval": [
        ("the Wald interval", wald),
        (
            "Wilson without the clipping at k = 0 and k = n",
            lambda k, n: checks.stats.wilson_interval(k, n) if 0 < k < n or n == 0 else wald(k, n),
        ),
    ],
    "mcnemar_p": [
        ("one-sided", lambda a, b: binom_cdf(min(a, b), a + b)),
        (
            "mid-p",
            lambda a, b: min(
                1.0, 2 * (binom_cdf(min(a, b), a + b) - 0.5 * math.comb(a + b, min(a, b)) / 2 ** (a + b))
            ),
        ),
        (
            "chi-square approximation",
            lambda a, b: math.erfc(abs(a - b) / math.sqrt(2 * (a + b))) if a + b else 1.0,
        ),
    ],
}


@pytest.mark.parametrize("name", sorted(WRONG))
def test_checker_accepts_the_solution_and_waits_for_the_undone(name, capsys):
    check = getattr(checks, name)
    assert check(solution(name)) is True

    def undone(*args):
        raise NotImplementedError

    assert check(undone) is None
    assert "not done yet" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name, what, wrong",
    [(n, what, f) for n, answers in WRONG.items() for what, f in answers],
    ids=[f"{n}: {what}" for n, answers in WRONG.items() for what, _ in answers],
)
def test_checker_rejects_a_wrong_answer(name, what, wrong, capsys):
    assert getattr(checks, name)(wrong) is False, f"{name} accepted: {what}"
    out = capsys.readouterr().out
    assert "is wrong" in out or "raised" in out, out  # it says which input, and expected vs got
