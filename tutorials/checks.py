"""The exercises' checker: each check runs the student's function and the project's on random tensors and
hand-made edge cases, and prints what is wrong (which input, expected vs got). A function that still raises
NotImplementedError is "not done yet": the check says so and returns None, and the lesson goes on.

    import checks
    checks.kl_per_position(kl_per_position)    # True: every case passes; False: one did not; None: not done

Each check names the project's function it compares with; tests/test_course.py shows that each one rejects
plausible wrong answers.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import course  # noqa: F401  (puts the repository on the import path)
import torch

import deepalign as D
from lab import stats

RESULTS: dict[str, bool | None] = {}  # the last verdict of each check, by exercise name


class Case(NamedTuple):
    what: str  # the input, in words
    args: tuple


# ---- comparing answers ----
def short(x) -> str:
    if isinstance(x, torch.Tensor):
        flat = x.flatten()[:6].tolist()
        more = ", ..." if x.numel() > 6 else ""
        return f"tensor{tuple(x.shape)} [{', '.join(_num(v) for v in flat)}{more}]"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(short(v) for v in x) + ")"
    return _num(x) if isinstance(x, (int, float, bool)) else repr(x)


def _num(v) -> str:
    return str(v) if isinstance(v, bool) else f"{v:.6g}" if isinstance(v, float) else str(v)


def tensor_problem(expected: torch.Tensor, got, atol: float, rtol: float) -> str | None:
    """What is wrong with `got` against `expected` (a tensor), or None: shape, kind, infinities, values."""
    if not isinstance(got, torch.Tensor):
        return f"expected a tensor, got {type(got).__name__}"
    if got.shape != expected.shape:
        return f"expected shape {tuple(expected.shape)}, got {tuple(got.shape)}"
    if expected.dtype == torch.bool:
        if got.dtype != torch.bool:
            return f"expected a bool mask, got dtype {got.dtype}"
        wrong = got != expected
    else:
        e, g = expected.double(), got.detach().double()
        same_inf = torch.isinf(e) & torch.isinf(g) & (torch.sign(e) == torch.sign(g))
        wrong = ~same_inf & ~torch.isclose(g, e.nan_to_num(), atol=atol, rtol=rtol)
    if not wrong.any():
        return None
    at = tuple(int(i) for i in wrong.nonzero()[0])
    where = f" at index {at}" if at else ""
    return (
        f"{int(wrong.sum())} of {wrong.numel()} values differ; first{where}: expected "
        f"{_num(expected[at].item())}, got {_num(got[at].item())}"
    )


def value_problem(expected, got, atol: float = 1e-9, rtol: float = 1e-9) -> str | None:
    """What is wrong with a number or a tuple of numbers, or None."""
    if isinstance(expected, tuple):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"expected {len(expected)} numbers, got {short(got)}"
        problems = [value_problem(e, g, atol, rtol) for e, g in zip(expected, got)]
        return next((f"expected {short(expected)}, got {short(got)}" for p in problems if p), None)
    try:
        g = float(got)
    except (TypeError, ValueError):
        return f"expected a number, got {short(got)}"
    if math.isnan(g) or not math.isclose(g, expected, abs_tol=atol, rel_tol=rtol):
        return f"expected {_num(float(expected))}, got {_num(g)}"
    return None


def check(
    name: str, student: Callable, reference: Callable, cases: list[Case], problem: Callable
) -> bool | None:
    """Run every case through both functions; print the first failure (its input, expected vs got) or that
    every case passed. Returns True, False, or None (the student's function raises NotImplementedError)."""
    for i, case in enumerate(cases):
        expected = reference(*case.args)
        try:
            got = student(*case.args)
        except NotImplementedError:
            print(
                f"{name}: not done yet (it raises NotImplementedError); the lesson goes on with the project's"
            )
            RESULTS[name] = None
            return None
        except Exception as e:  # a wrong answer, not a crash of the lesson
            print(f"{name}: case {i + 1} ({case.what}) raised {type(e).__name__}: {e}")
            RESULTS[name] = False
            return False
        wrong = problem(expected, got)
        if wrong:
            print(f"{name}: case {i + 1} of {len(cases)} is wrong.\n  input: {case.what}")
            print(f"  arguments: {short(case.args)}\n  {wrong}")
            RESULTS[name] = False
            return False
    print(f"{name}: all {len(cases)} cases pass")
    RESULTS[name] = True
    return True


def tensors(atol=1e-5, rtol=1e-5):
    return lambda e, g: tensor_problem(e, g, atol, rtol)


def random_lp(*shape, seed: int, scale: float = 3.0) -> torch.Tensor:
    """Random log-probabilities (..., V): log_softmax of scaled normal logits."""
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).log_softmax(-1)


# ---- lesson 1 ----
def kl_per_position(student) -> bool | None:
    """student(lp_P, lp_Q) -> KL(P || Q) per position, against deepalign.kl_per_position."""
    one_hot = torch.full((1, 6), float("-inf"))
    one_hot[0, 2] = 0.0  # P puts all its mass on token 2: p(v) = 0 elsewhere, lp_P(v) = -inf
    both_zero = random_lp(1, 6, seed=3)
    both_zero[0, 5] = float("-inf")
    cases = [
        Case("random P and Q, shape (2, 4, 50)", (random_lp(2, 4, 50, seed=0), random_lp(2, 4, 50, seed=1))),
        Case("P = Q (KL must be 0)", (random_lp(3, 20, seed=2), random_lp(3, 20, seed=2))),
        Case("P one-hot: 0 * log 0 must count 0, not nan", (one_hot, random_lp(1, 6, seed=4))),
        Case("a token both give probability 0", (both_zero, both_zero.clone().roll(1, -1))),
        Case("peaked P, flat Q", (random_lp(2, 30, seed=5, scale=8.0), random_lp(2, 30, seed=6, scale=0.1))),
    ]
    return check("kl_per_position", student, D.kl_per_position, cases, tensors(1e-5, 1e-4))


# ---- lesson 2 ----
def base_favored_mask(student) -> bool | None:
    """student(lp_A, lp_B, tau, top_k, rho) -> BF_t as a bool mask, against deepalign.base_favored_mask."""

    def reference(lp_A, lp_B, tau, top_k, rho):
        return D.base_favored_mask(lp_A, lp_B, D.BaseFavored(tau, top_k, rho))

    confident = random_lp(2, 100, seed=13, scale=1.0)
    confident[:, 0] += 12.0  # the base is sure of token 0: most of its top-k is below rho * max
    confident = confident.log_softmax(-1)
    near_A = random_lp(3, 60, seed=16)
    noise = random_lp(3, 60, seed=17, scale=1.0)
    near_B = (near_A + noise).log_softmax(-1)  # close to A: ratios between 1 and 2 are common
    ties = torch.tensor([[0.0, -1.0, -1.0, -1.0, -2.0, -3.0]]).log_softmax(-1)  # tokens 1-3 tie for 2nd
    cases = [
        Case(
            "random, V = 200, tau 1, top-k 20, rho 0.01",
            (random_lp(4, 200, seed=10), random_lp(4, 200, seed=11), 1.0, 20, 0.01),
        ),
        Case(
            "random, V = 200, rho 0 (version 1)",
            (random_lp(3, 200, seed=12), random_lp(3, 200, seed=14), 1.0, 20, 0.0),
        ),
        Case(
            "a confident base: the floor rho decides", (random_lp(2, 100, seed=15), confident, 1.0, 20, 0.01)
        ),
        Case(
            "tau 2: p_B must exceed twice p_A",
            (near_A, near_B, 2.0, 30, 0.0),
        ),
        Case("ties at the k-th place count as in the top-k", (random_lp(1, 6, seed=18), ties, 1.0, 2, 0.0)),
    ]
    return check("base_favored_mask", student, reference, cases, tensors())


def bf_mass(student) -> bool | None:
    """student(lp, mask) -> sum of p over the mask per position, against deepalign.bf_mass."""
    lp = random_lp(3, 5, 40, seed=20)
    mask = torch.rand(3, 5, 40, generator=torch.Generator().manual_seed(21)) < 0.2
    lp_inf = random_lp(2, 8, seed=22)
    lp_inf[:, 3] = float("-inf")
    cases = [
        Case("random log-probs, random mask, shape (3, 5, 40)", (lp, mask)),
        Case("an empty set: mass 0", (random_lp(2, 10, seed=23), torch.zeros(2, 10, dtype=torch.bool))),
        Case(
            "the whole vocabulary: mass 1", (random_lp(2, 10, seed=24), torch.ones(2, 10, dtype=torch.bool))
        ),
        Case("a token of probability 0 in the set", (lp_inf, torch.ones(2, 8, dtype=torch.bool))),
    ]
    return check("bf_mass", student, D.bf_mass, cases, tensors())


# ---- lesson 3 ----
def contrastive_scores(student) -> bool | None:
    """student(lp_A, lp_B, alpha, beta) -> s_t, against deepalign.contrastive_logits (cd_mode "full")."""

    def reference(lp_A, lp_B, alpha, beta):
        return D.contrastive_logits(lp_A, lp_B, D.Contrast(alpha, beta))

    never = random_lp(2, 30, seed=33)
    never[:, :5] = float("-inf")  # the base never says tokens 0-4
    aligned = random_lp(2, 30, seed=34, scale=1.0)
    cases = [
        Case(
            "random, V = 100, alpha 2, beta 0.03",
            (random_lp(4, 100, seed=30), random_lp(4, 100, seed=31), 2.0, 0.03),
        ),
        Case("alpha 0: lp_A on the head", (random_lp(3, 50, seed=32), random_lp(3, 50, seed=35), 0.0, 0.1)),
        Case(
            "beta 0: the head is the whole vocabulary",
            (random_lp(2, 40, seed=36), random_lp(2, 40, seed=37), 1.0, 0.0),
        ),
        Case(
            "beta 0.5: a narrow head",
            (random_lp(2, 40, seed=38, scale=1.0), random_lp(2, 40, seed=39), 1.0, 0.5),
        ),
        Case("the base gives some tokens probability 0 (-inf)", (aligned, never, 2.0, 0.0)),
    ]
    return check("contrastive_scores", student, reference, cases, tensors(1e-4, 1e-5))


# ---- lesson 4 ----
def penalty_weights(student) -> bool | None:
    """student(bf_mass_A, w_max) -> adaptive w_t, against deepalign.penalty_weights (penalty_weight
    "adaptive")."""

    def reference(mass, w_max):
        return D.penalty_weights(mass, torch.zeros_like(mass), D.LossConfig(w_max=w_max))

    g = torch.Generator().manual_seed(40)
    outlier = torch.full((10,), 0.01)
    outlier[3] = 0.9  # one position the aligned model left very incomplete: its weight hits the clip
    cases = [
        Case("random masses in [0, 1), 12 positions, w_max 5", (torch.rand(12, generator=g), 5.0)),
        Case("one large mass among small ones, w_max 5 (the clip)", (outlier, 5.0)),
        Case("the same, w_max 2", (outlier, 2.0)),
        Case("every mass 0 (weights 0, not nan)", (torch.zeros(6), 5.0)),
        Case("one position", (torch.tensor([0.3]), 5.0)),
    ]
    return check("penalty_weights", student, reference, cases, tensors())


def hybrid_teacher(student) -> bool | None:
    """student(p_clean, targets, lam) -> q, against deepalign.clean_teacher."""
    g = torch.Generator().manual_seed(41)
    p = random_lp(6, 25, seed=42).exp()
    targets = torch.randint(0, 25, (6,), generator=g)
    cases = [
        Case("random p_clean (6, 25), lam 0.5", (p, targets, 0.5)),
        Case("lam 0.8", (p, targets, 0.8)),
        Case("lam 1: the one-hot label alone", (p, targets, 1.0)),
        Case("lam 0: the clean-context distribution alone", (p, targets, 0.0)),
    ]
    return check("hybrid_teacher", student, D.clean_teacher, cases, tensors())


# ---- lesson 5 ----
def asr_at_n(student) -> bool | None:
    """student(c, N, n) -> the unbiased ASR@n estimate, against lab.stats.asr_at_n."""
    grid = [
        (3, 16, 1),
        (3, 16, 4),
        (3, 16, 16),
        (0, 16, 8),
        (16, 16, 1),
        (1, 8, 8),
        (5, 8, 4),
        (2, 10, 9),
        (7, 20, 5),
    ]
    cases = [Case(f"c = {c} harmful of N = {N} samples, n = {n}", (c, N, n)) for c, N, n in grid]
    return check("asr_at_n", student, stats.asr_at_n, cases, value_problem)


# ---- lesson 6 ----
def wilson_interval(student) -> bool | None:
    """student(k, n) -> (lo, hi) at 95%, against lab.stats.wilson_interval."""
    grid = [(3, 10), (50, 200), (0, 25), (25, 25), (1, 600), (0, 0)]
    cases = [Case(f"k = {k} of n = {n}", (k, n)) for k, n in grid]
    return check(
        "wilson_interval", student, stats.wilson_interval, cases, lambda e, g: value_problem(e, g, 1e-7, 1e-7)
    )


def mcnemar_p(student) -> bool | None:
    """student(a_only, b_only) -> the exact two-sided McNemar p, against lab.stats.binom_two_sided_p."""
    grid = [(5, 0), (10, 3), (3, 10), (20, 20), (1, 0), (0, 0), (60, 35), (1, 7)]
    cases = [Case(f"a_only = {a}, b_only = {b}", (a, b)) for a, b in grid]
    return check(
        "mcnemar_p",
        student,
        lambda a, b: stats.binom_two_sided_p(a, a + b),
        cases,
        lambda e, g: value_problem(e, g, 1e-12, 1e-9),
    )
