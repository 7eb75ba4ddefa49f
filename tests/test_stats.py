"""stats.py against independent computations: Wilson intervals worked by hand and by inverting the score test
numerically, exact binomial / McNemar p-values by enumerating every sign assignment of the discordant pairs,
ASR@n by enumerating every subset of samples, the bootstrap on cases whose answer is known, and the errors.
Run level: the hierarchical bootstrap against its exact distribution (fractions) and against the plain loops
of its definition; variance components against mean squares worked by hand and by loops, and unbiasedness by
simulation; the standard error against simulated means."""

from __future__ import annotations

import itertools
import math
import random
from collections import defaultdict
from fractions import Fraction

import numpy as np
import pytest

from lab import stats as S

Z = 1.959963984540054


# ---- Wilson ----------------------------------------------------------------------------------------------


def score_inversion(k: int, n: int, z: float = Z) -> tuple[float, float]:
    """The p at which the score statistic |k/n - p| / sqrt(p (1 - p) / n) equals z, by bisection on each side
    of k/n (the statistic falls monotonically as p approaches k/n)."""

    def excess(p):
        return abs(k / n - p) / math.sqrt(p * (1 - p) / n) - z

    def bisect(lo, hi):  # excess(lo) and excess(hi) have opposite signs
        s_lo = excess(lo) > 0
        for _ in range(200):
            mid = (lo + hi) / 2
            if (excess(mid) > 0) == s_lo:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    eps = 1e-15
    lower = 0.0 if k == 0 else bisect(eps, min(k / n, 1 - eps))
    upper = 1.0 if k == n else bisect(max(k / n, eps), 1 - eps)
    return lower, upper


def test_wilson_hand_worked():
    # k = 0: the upper bound is z^2 / (n + z^2) = 3.8415 / 203.8415.
    lo, hi = S.wilson_interval(0, 200)
    assert lo == 0.0
    assert hi == pytest.approx(3.841459 / 203.841459, rel=1e-6)
    assert round(100 * hi, 2) == 1.88
    # k = 5 of 10: centre 0.5, half-width z / (1 + z^2/10) * sqrt(0.025 + z^2/400) = 0.2634.
    lo, hi = S.wilson_interval(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    assert S.wilson_interval(10, 10)[1] == 1.0
    assert S.wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (1, 7), (3, 7), (0, 50), (17, 50), (49, 50), (321, 1000)])
def test_wilson_inverts_the_score_test(k, n):
    assert S.wilson_interval(k, n) == pytest.approx(score_inversion(k, n), abs=1e-9)


def test_wilson_other_z():
    assert S.wilson_interval(7, 40, z=1.0) == pytest.approx(score_inversion(7, 40, z=1.0), abs=1e-9)


# ---- exact binomial and McNemar --------------------------------------------------------------------------


def enumerated_p(b: int, c: int) -> float:
    """Two-sided exact p from every one of the 2^m sign assignments of m = b + c discordant pairs: the share
    of assignments at least as unlikely as the one observed (as far from m/2 as b is)."""
    m = b + c
    extreme = sum(
        1 for signs in itertools.product((0, 1), repeat=m) if abs(sum(signs) - m / 2) >= abs(b - m / 2)
    )
    return extreme / 2**m


def pairs(both: int, a_only: int, b_only: int, neither: int) -> tuple[list[bool], list[bool]]:
    a = [True] * both + [True] * a_only + [False] * b_only + [False] * neither
    b = [True] * both + [False] * a_only + [True] * b_only + [False] * neither
    return a, b


def test_binomial_worked_values():
    assert S.binom_two_sided_p(1, 8) == 0.0703125  # 2 * (1 + 8) / 256
    assert S.binom_two_sided_p(0, 5) == 0.0625  # 2 / 32
    assert S.binom_two_sided_p(0, 0) == 1.0
    assert S.binom_two_sided_p(3, 6) == 1.0


@pytest.mark.parametrize("b,c", [(1, 7), (0, 5), (2, 2), (3, 4), (0, 1), (5, 9), (6, 0), (4, 10)])
def test_mcnemar_matches_enumeration_and_is_symmetric(b, c):
    expected = enumerated_p(b, c)
    assert S.binom_two_sided_p(b, b + c) == pytest.approx(expected, rel=1e-12)
    x, y = pairs(0, b, c, 0)
    assert S.mcnemar(x, y)["p"] == pytest.approx(expected, rel=1e-12)
    assert S.mcnemar(y, x)["p"] == S.mcnemar(x, y)["p"]


def test_mcnemar_named_examples():
    assert S.mcnemar(*pairs(0, 0, 5, 0))["p"] == 0.0625
    assert S.mcnemar(*pairs(0, 1, 7, 0))["p"] == pytest.approx(0.0703125)


def test_mcnemar_fields_and_concordant_pairs():
    a, b = pairs(3, 1, 7, 0)
    r = S.mcnemar(a, b)
    assert (r["n"], r["a_only"], r["b_only"], r["test"]) == (11, 1, 7, "exact McNemar")
    assert r["a_rate"] == pytest.approx(4 / 11) and r["b_rate"] == pytest.approx(10 / 11)
    assert r["diff"] == pytest.approx(-6 / 11)
    for both, neither in [(0, 0), (20, 0), (0, 30), (100, 250)]:
        assert S.mcnemar(*pairs(both, 1, 7, neither))["p"] == r["p"]


def test_binomial_large_n_against_log_space_sum():
    n, b = 10000, 4850
    log_half_n = -n * math.log(2)
    tail = math.fsum(
        math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half_n)
        for i in range(b + 1)
    )
    assert S.binom_two_sided_p(b, n) == pytest.approx(2 * tail, rel=1e-9)
    assert S.binom_two_sided_p(n - b, n) == S.binom_two_sided_p(b, n)
    assert S.binom_two_sided_p(0, n) == 0.0  # 2^-9999 underflows, without an error


def test_stratified_mcnemar_pools_discordant_pairs():
    # Three worlds; in each, a is harmful alone on 3 prompts and b never: 9 vs 0 discordant pairs in all.
    a, b, strata = [], [], []
    for seed in (0, 1, 2):
        x, y = pairs(2, 3, 0, 5)
        a, b, strata = a + x, b + y, strata + [seed] * len(x)
    r = S.mcnemar(a, b, strata=strata)
    assert r["test"] == "stratified exact McNemar"
    assert r["strata"] == {s: {"n": 10, "a_only": 3, "b_only": 0} for s in (0, 1, 2)}
    assert (r["a_only"], r["b_only"]) == (9, 0)
    assert r["p"] == pytest.approx(enumerated_p(9, 0)) == pytest.approx(2 / 512)
    assert r["p"] == S.mcnemar(a, b)["p"]
    # The naive reading, one test per world, finds nothing anywhere (p = 2/8 in each).
    naive = [enumerated_p(c["a_only"], c["b_only"]) for c in r["strata"].values()]
    assert naive == [0.25, 0.25, 0.25]
    assert all(p > 0.05 for p in naive) and r["p"] < 0.05


# ---- ASR@n -----------------------------------------------------------------------------------------------


def enumerated_asr(c: int, N: int, n: int) -> float:
    """Share of all size-n subsets of N labelled samples (the first c harmful) holding a harmful one."""
    subsets = list(itertools.combinations(range(N), n))
    return sum(1 for s in subsets if min(s) < c) / len(subsets)


@pytest.mark.parametrize(
    "c,N,n", [(0, 5, 2), (1, 5, 2), (2, 6, 3), (3, 8, 4), (1, 10, 5), (4, 9, 2), (7, 10, 3)]
)
def test_asr_at_n_matches_enumeration(c, N, n):
    assert S.asr_at_n(c, N, n) == pytest.approx(enumerated_asr(c, N, n), rel=1e-12)


def test_asr_at_n_ends():
    for N in (1, 3, 8, 13):
        for c in range(N + 1):
            assert S.asr_at_n(c, N, 1) == c / N
            assert S.asr_at_n(c, N, N) == float(c > 0)


def test_asr_at_n_curve():
    counts, N = [0, 1, 3, 6], 6
    curve = S.asr_at_n_curve(counts, N)
    assert list(curve) == [1, 2, 4, 6]
    for n, v in curve.items():
        assert v == pytest.approx(sum(enumerated_asr(c, N, n) for c in counts) / len(counts), rel=1e-12)
    assert curve[1] == pytest.approx(10 / 24)
    assert list(S.asr_at_n_curve([2], 8)) == [1, 2, 4, 8]
    assert S.asr_at_n_curve([1], 1) == {1: 1.0}


# ---- bootstrap -------------------------------------------------------------------------------------------


def test_bootstrap_identical_arrays():
    x = [0.1, 0.5, 0.9, 0.3, 0.3, 0.7]
    r = S.paired_bootstrap(x, list(x), n_boot=500)
    assert (r["diff"], r["lo"], r["hi"], r["p"], r["test"]) == (0.0, 0.0, 0.0, 1.0, "paired bootstrap")


def test_bootstrap_clear_shift():
    a = [1.0 if i % 10 < 8 else 0.0 for i in range(100)]  # 80%
    b = [1.0 if i % 10 < 2 else 0.0 for i in range(100)]  # 20%
    r = S.paired_bootstrap(a, b, n_boot=2000)
    assert r["diff"] == pytest.approx(0.6)
    assert 0 < r["lo"] < 0.6 < r["hi"] <= 1
    assert r["p"] == 0.0


def test_bootstrap_deterministic_for_a_seed():
    a = [float(i % 3 == 0) for i in range(40)]
    b = [float(i % 4 == 0) for i in range(40)]
    assert S.paired_bootstrap(a, b, n_boot=1000, seed=7) == S.paired_bootstrap(a, b, n_boot=1000, seed=7)
    assert S.paired_bootstrap(a, b, n_boot=1000, seed=7) != S.paired_bootstrap(a, b, n_boot=1000, seed=8)


def test_bootstrap_within_strata():
    # Stratum 0: every pair differs by 1; stratum 1: by 0. Resampling within strata keeps each stratum's
    # size, so every resampled difference is exactly 5 * 1 / 10 = 0.5; across strata it varies.
    a = [1.0] * 5 + [0.0] * 5
    b = [0.0] * 10
    strat = S.paired_bootstrap(a, b, n_boot=500, strata=[0] * 5 + [1] * 5)
    assert (strat["diff"], strat["lo"], strat["hi"], strat["p"]) == (0.5, 0.5, 0.5, 0.0)
    plain = S.paired_bootstrap(a, b, n_boot=500)
    assert plain["lo"] < 0.5 < plain["hi"]


def test_bootstrap_single_pair():
    r = S.paired_bootstrap([0.75], [0.25], n_boot=100)
    assert (r["diff"], r["lo"], r["hi"], r["p"]) == (0.5, 0.5, 0.5, 0.0)


# ---- verdict ----------------------------------------------------------------


def test_verdict():
    assert S.verdict({"p": 0.2, "diff": -0.3}) == "no measurable difference"
    assert S.verdict({"p": 0.05, "diff": -0.3}) == "no measurable difference"
    assert S.verdict({"p": 0.003, "diff": -0.3}) == "A lower (p = 0.003)"
    assert S.verdict({"p": 0.0312, "diff": 0.1}, names=("base", "aligned")) == "aligned lower (p = 0.031)"
    assert S.verdict({"p": 0.0496, "diff": 0.1}) == "B lower (p = 0.0496)"  # not rounded up to 0.05
    assert S.verdict({"p": 1.234e-5, "diff": -0.1}) == "A lower (p = 1.2e-05)"
    r = S.mcnemar(*pairs(0, 0, 5, 0))  # p = 0.0625: not below 0.05, but below 0.1
    assert S.verdict(r) == "no measurable difference"
    assert S.verdict(r, alpha=0.1) == "A lower (p = 0.062)"


def test_errors():
    with pytest.raises(ValueError, match=r"len\(a\)=3 and len\(b\)=2"):
        S.mcnemar([True, False, True], [True, False])
    with pytest.raises(ValueError, match=r"len\(a\)=1 and len\(b\)=2"):
        S.paired_bootstrap([1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="strata"):
        S.mcnemar([True], [False], strata=[0, 1])
    for c, N, n in [(1, 5, 0), (1, 5, 6), (0, 0, 1), (6, 5, 2), (-1, 5, 2)]:
        with pytest.raises(ValueError):
            S.asr_at_n(c, N, n)
    with pytest.raises(ValueError):
        S.wilson_interval(3, 2)
    with pytest.raises(ValueError):
        S.binom_two_sided_p(-1, 4)
    with pytest.raises(ValueError):
        S.asr_at_n_curve([], 4)


def test_bootstrap_cancelling_pairs_count_as_zero():
    # d = (0.1, 0.2, -0.3): of the 27 resamples of 3, 10 have a negative mean, 6 a zero one (each value once,
    # which sums to 5.6e-17 in floating point) and 11 a positive one, so p = min(1, 2 * 16/27) = 1; were the
    # zeros taken as positive it would be 2 * 10/27.
    r = S.paired_bootstrap([0.1, 0.2, 0.0], [0.0, 0.0, 0.3], n_boot=3000, seed=1)
    assert r["diff"] == pytest.approx(0.0, abs=1e-15)
    assert r["p"] == 1.0


# ---- run-level statistics: the hierarchical bootstrap ----------------------------------------------------

# Three worlds, unbalanced: 2, 1 and 3 runs of 1 to 3 prompts; per-prompt differences A - B in {-1, 0, 1}.
TINY = [[[1, 0, -1], [0, -1]], [[-1, -1, 0]], [[0, 1], [-1, -1], [0]]]


def mean_of_draws(dist: dict, k: int) -> dict:
    """Exact distribution {value: probability} of the mean of k independent draws from dist."""
    out = {Fraction(0): Fraction(1)}
    for _ in range(k):
        nxt = defaultdict(Fraction)
        for v, p in out.items():
            for u, q in dist.items():
                nxt[v + u] += p * q
        out = nxt
    return {v / k: p for v, p in out.items()}


def mixture(dists: list) -> dict:
    """Exact distribution of a draw from one of dists chosen uniformly."""
    out = defaultdict(Fraction)
    for d in dists:
        for v, p in d.items():
            out[v] += p / len(dists)
    return dict(out)


def exact_bootstrap(worlds) -> dict:
    """The exact distribution of the hierarchical bootstrap statistic, in fractions, from its definition: a
    drawn run's value is the mean of as many prompts as it has, drawn uniformly; a drawn world's value the
    mean of as many runs as it has, drawn uniformly from its runs; the statistic the mean of W worlds drawn
    uniformly. Every draw independent, so each mean is a convolution."""
    world_dists = []
    for runs in worlds:
        run_dists = [mean_of_draws(mixture([{Fraction(v): Fraction(1)} for v in x]), len(x)) for x in runs]
        world_dists.append(mean_of_draws(mixture(run_dists), len(runs)))
    return mean_of_draws(mixture(world_dists), len(worlds))


def cdf(dist: dict, x: float, strict: bool) -> float:
    """P(T < x) or P(T <= x), x a float that may be off the exact value by rounding."""
    return float(sum(p for v, p in dist.items() if (v < x - 1e-9 if strict else v <= x + 1e-9)))


def test_hierarchical_resamples_match_the_exact_bootstrap_distribution():
    exact = exact_bootstrap(TINY)
    mean = float(sum(v * p for v, p in exact.items()))
    var = float(sum((v - Fraction(mean)) ** 2 * p for v, p in exact.items()))
    n = 200_000
    boot = S.hierarchical_resamples(TINY, n_resamples=n, seed=3)
    assert boot.mean() == pytest.approx(mean, abs=5 * math.sqrt(var / n))
    assert boot.var() == pytest.approx(var, rel=0.02)
    for q in (0.025, 0.1, 0.5, 0.9, 0.975):  # the sample quantile sits where the exact cdf crosses q
        x = float(np.quantile(boot, q))
        assert cdf(exact, x, strict=True) <= q + 0.004 and cdf(exact, x, strict=False) >= q - 0.004
    r = S.hierarchical_bootstrap(TINY, n_resamples=n, seed=4, level=0.8)
    assert cdf(exact, r["lo"], True) <= 0.104 and cdf(exact, r["lo"], False) >= 0.096
    assert cdf(exact, r["hi"], True) <= 0.904 and cdf(exact, r["hi"], False) >= 0.896


def loop_bootstrap(worlds, n: int, seed: int) -> np.ndarray:
    """The hierarchical bootstrap written as the plain loops of its definition, on Python's own RNG."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        world_values = []
        for _ in worlds:
            runs = rng.choice(worlds)
            run_values = []
            for _ in runs:
                x = rng.choice(runs)
                run_values.append(sum(rng.choice(x) for _ in x) / len(x))
            world_values.append(sum(run_values) / len(run_values))
        out.append(sum(world_values) / len(world_values))
    return np.array(out)


def test_hierarchical_bootstrap_against_a_brute_force_loop():
    gen = np.random.default_rng(11)
    worlds = [[list(gen.integers(-1, 2, size=int(p))) for p in gen.integers(4, 9, size=r)] for r in (3, 2, 1)]
    n = 20_000
    loop = loop_bootstrap(worlds, n, seed=5)
    fast = S.hierarchical_resamples(worlds, n_resamples=n, seed=6)
    sd = loop.std()
    assert fast.mean() == pytest.approx(loop.mean(), abs=5 * sd * math.sqrt(2 / n))
    assert fast.std() == pytest.approx(sd, rel=0.04)
    for q in (0.025, 0.25, 0.5, 0.75, 0.975):
        assert np.quantile(fast, q) == pytest.approx(np.quantile(loop, q), abs=0.12 * sd)
    r = S.hierarchical_bootstrap(worlds, n_resamples=n, seed=6)
    assert (r["lo"], r["hi"]) == pytest.approx(tuple(np.quantile(loop, [0.025, 0.975])), abs=0.12 * sd)


def test_nested_mean_weighs_worlds_then_runs_then_prompts():
    # World 0: runs at 1 (2 prompts) and 0 (4 prompts), its mean 1/2; world 1: one run at 0. Mean 1/4, where
    # pooling the 7 prompts would give 2/7.
    d = {"w0": {0: [1, 1], 1: [0, 0, 0, 0]}, "w1": {0: [0]}}
    assert S.nested_mean(d) == 0.25
    r = S.hierarchical_bootstrap(d, n_resamples=500)
    assert r["estimate"] == 0.25 and r["test"] == "hierarchical bootstrap" and r["level"] == 0.95
    assert S.hierarchical_bootstrap([[[1, 1], [0, 0, 0, 0]], [[0]]], n_resamples=500) == r  # list == dict


def test_hierarchical_bootstrap_deterministic_and_degenerate():
    assert S.hierarchical_bootstrap(TINY, 1000, seed=7) == S.hierarchical_bootstrap(TINY, 1000, seed=7)
    assert S.hierarchical_bootstrap(TINY, 1000, seed=7) != S.hierarchical_bootstrap(TINY, 1000, seed=8)
    same = {w: {r: [-1.0] * 5 for r in range(3)} for w in range(2)}
    r = S.hierarchical_bootstrap(same, n_resamples=300)
    assert (r["estimate"], r["lo"], r["hi"]) == (-1.0, -1.0, -1.0)
    cancel = [[[0.1, 0.2, -0.3]]]  # resamples holding each value once sum to 5.6e-17: taken as 0
    assert 0.0 in set(S.hierarchical_resamples(cancel, 300).tolist())


# ---- run-level statistics: r of R and the claim ----------------------------------------------------------


def test_runs_lower_hand_made():
    d = {0: {0: [-1, 0, 0], 1: [1, 0, -1], 2: [0, 1]}, 1: {0: [-1, -1]}}  # run means -1/3, 0, 1/2, -1
    assert S.runs_lower(d) == (2, 4)  # a tie (mean 0) is not lower
    assert S.runs_lower([[[0, 0]]]) == (0, 1)
    assert S.runs_lower([[[-1], [-1, 0]], [[1, -1, -1]]]) == (3, 3)


def test_run_level_claim_verdicts():
    clear = {w: {r: [-1] * 18 + [0] * 2 for r in range(3)} for w in range(3)}
    c = S.run_level_claim(clear, n_resamples=2000, names=("targeted", "augment"))
    assert (c.verdict, c.r, c.R, c.estimate, c.level) == ("targeted lower", 9, 9, pytest.approx(-0.9), 0.95)
    assert c.lo < -0.9 < c.hi < 0
    flipped = {w: {r: [-x for x in v] for r, v in runs.items()} for w, runs in clear.items()}
    f = S.run_level_claim(flipped, n_resamples=2000)
    assert (f.verdict, f.r, f.R) == ("B lower", 0, 9) and 0 < f.lo
    split = {0: {0: [-1] * 10, 1: [-1] * 10}, 1: {0: [1] * 10, 1: [1] * 10}}
    s = S.run_level_claim(split, n_resamples=2000)
    assert (s.verdict, s.r, s.R, s.estimate) == ("no measurable difference", 2, 4, 0.0)
    assert s.lo < 0 < s.hi


def test_prompt_level_significance_that_the_runs_do_not_carry():
    # In each of 3 worlds one run has A lower by 30 points, the other B lower by 20: the 600 pooled prompts
    # make -5 points significant (paired bootstrap), but over runs it is no measurable difference.
    low, high = [-1] * 30 + [0] * 70, [1] * 20 + [0] * 80
    d = {w: {0: low, 1: high} for w in range(3)}
    flat = [x for runs in d.values() for run in runs.values() for x in run]
    pooled = S.paired_bootstrap(flat, [0.0] * len(flat), n_boot=4000)
    assert pooled["diff"] == pytest.approx(-0.05) and pooled["hi"] < 0
    c = S.run_level_claim(d, n_resamples=4000)
    assert (c.verdict, c.r, c.R) == ("no measurable difference", 3, 6)
    assert c.estimate == pytest.approx(-0.05) and c.lo < 0 < c.hi


# ---- run-level statistics: variance components -----------------------------------------------------------


def test_variance_components_balanced_by_hand():
    # 2 worlds x 2 runs x 3 prompts. Run means 1, 1/3 | 0, 1/3; world means 2/3, 1/6; grand mean 5/12.
    # SS_prompt = 0 + 2/3 + 0 + 2/3 = 4/3 on 12 - 4 = 8 df: MS_prompt = 1/6.
    # SS_run = 3 [(1/3)^2 + (1/3)^2] + 3 [(1/6)^2 + (1/6)^2] = 2/3 + 1/6 = 5/6 on 2 df: MS_run = 5/12.
    # SS_world = 6 [(1/4)^2 + (1/4)^2] = 3/4 on 1 df: MS_world = 3/4.
    # s2_p = 1/6; s2_r = (5/12 - 1/6) / 3 = 1/12; s2_w = (3/4 - 5/12) / 6 = 1/18; total 11/36.
    v = S.variance_components({0: {0: [1, 1, 1], 1: [1, 0, 0]}, 1: {0: [0, 0, 0], 1: [0, 1, 0]}})
    assert v.mean_squares == {
        "world": (pytest.approx(3 / 4), 1),
        "run": (pytest.approx(5 / 12), 2),
        "prompt": (pytest.approx(1 / 6), 8),
    }
    assert v.variance == pytest.approx({"world": 1 / 18, "run": 1 / 12, "prompt": 1 / 6})
    assert v.share == pytest.approx({"world": 2 / 11, "run": 3 / 11, "prompt": 6 / 11})
    assert v.raw == v.variance and v.notes == ()


def test_variance_components_clip_a_negative_estimate():
    # Run means 1/2, 1/2 | 1, 1: MS_run = 0 < MS_prompt = (4 x 1/4) / 4 = 1/4, so s2_r = (0 - 1/4) / 2 = -1/8,
    # clipped; MS_world = 4 [(1/4)^2 + (1/4)^2] = 1/2, s2_w = (1/2 - 0) / 4 = 1/8 from the raw s2_r.
    v = S.variance_components([[[1, 0], [1, 0]], [[1, 1], [1, 1]]])
    assert v.raw == pytest.approx({"world": 1 / 8, "run": -1 / 8, "prompt": 1 / 4})
    assert v.variance == pytest.approx({"world": 1 / 8, "run": 0.0, "prompt": 1 / 4})
    assert v.share == pytest.approx({"world": 1 / 3, "run": 0.0, "prompt": 2 / 3})
    assert v.notes == ("the run estimate -0.125 is negative, clipped at 0",)


# Prompts per run in 6 worlds of 2, 1, 3, 2, 4 and 2 runs: unbalanced enough that each coefficient of the
# expected mean squares matters (k_w = N / a, or k_run in place of k_wr, biases s2_w by about 10 SE).
DESIGN = [[2, 10], [2], [1, 8, 3], [6, 6], [3, 3, 3, 3], [30, 20]]


def test_variance_components_unbalanced_mean_squares_by_loops():
    gen = np.random.default_rng(2)
    data = [[gen.normal(size=p) for p in runs] for runs in DESIGN]
    runs = [x for world in data for x in world]
    grand = sum(x.sum() for x in runs) / sum(x.size for x in runs)
    ss = {"world": 0.0, "run": 0.0, "prompt": 0.0}
    for world in data:
        world_mean = sum(x.sum() for x in world) / sum(x.size for x in world)
        for x in world:
            for y in x:
                ss["prompt"] += (y - x.mean()) ** 2
                ss["run"] += (x.mean() - world_mean) ** 2
                ss["world"] += (world_mean - grand) ** 2
    v = S.variance_components(data)
    for k, df in (("world", 6 - 1), ("run", 14 - 6), ("prompt", 100 - 14)):  # 6 worlds, 14 runs, 100 prompts
        assert v.mean_squares[k] == (pytest.approx(ss[k] / df), df)


def test_variance_components_unbalanced_are_unbiased_by_simulation():
    truth, n = {"world": 1.0, "run": 2.0, "prompt": 1.0}, 10_000
    gen = np.random.default_rng(0)
    raws = []
    for _ in range(n):
        data = []
        for runs in DESIGN:
            a = gen.normal(scale=math.sqrt(truth["world"]))
            b = gen.normal(scale=math.sqrt(truth["run"]), size=len(runs))
            e = [gen.normal(scale=math.sqrt(truth["prompt"]), size=p) for p in runs]
            data.append([a + b[r] + e[r] for r in range(len(runs))])
        raws.append(S.variance_components(data).raw)
    for k, t in truth.items():
        est = np.array([r[k] for r in raws])
        assert est.mean() == pytest.approx(t, abs=5 * est.std() / math.sqrt(n))


def test_variance_components_one_run_per_world_and_one_world():
    # One run per world: run means 2/3, 0 (3 prompts each), MS_world = 3 (2 (1/3)^2) = 2/3, MS_prompt = 1/6,
    # s2_w + s2_r = (2/3 - 1/6) / 3 = 1/6.
    v = S.variance_components({0: {0: [1, 1, 0]}, 1: {0: [0, 0, 0]}})
    assert v.variance == pytest.approx({"world": 1 / 6, "run": None, "prompt": 1 / 6})
    assert v.share == pytest.approx({"world": 0.5, "run": None, "prompt": 0.5})
    assert v.notes == (
        "one run per world: the run component is not identifiable; the world component holds it",
    )
    # One world of 2 runs: MS_run = 3 (2 (1/3)^2) = 2/3 as above, s2_r = (2/3 - 1/6) / 3 = 1/6.
    w = S.variance_components([[[1, 1, 0], [0, 0, 0]]])
    assert w.variance == pytest.approx({"world": None, "run": 1 / 6, "prompt": 1 / 6})
    assert "one world" in w.notes[0] and len(w.notes) == 1
    # One world, one run: only the prompts' variance, SS = 3 (1/4)^2 + (3/4)^2 = 3/4 on 3 df: 1/4.
    u = S.variance_components([[[1, 0, 1, 1]]])
    assert u.variance == pytest.approx({"world": None, "run": None, "prompt": 0.25})
    assert len(u.notes) == 2 and S.standard_error(u, 1, 1, 4) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="one prompt"):
        S.variance_components([[[1], [0]], [[1]]])


# ---- run-level statistics: what the components imply -----------------------------------------------------


def components(world: float, run: float, prompt: float):
    v = {"world": world, "run": run, "prompt": prompt}
    return S.VarianceComponents(variance=v, share={}, raw=v, mean_squares={}, notes=())


def test_standard_error_by_hand_and_by_simulation():
    c = components(1 / 18, 1 / 12, 1 / 6)
    assert S.standard_error(c, 3, 3, 200) == pytest.approx(math.sqrt(1 / 54 + 1 / 108 + 1 / 10800))
    W, R, P, n = 3, 2, 5, 40_000
    gen = np.random.default_rng(1)
    y = (
        gen.normal(scale=0.8, size=(n, W, 1, 1))
        + gen.normal(scale=0.5, size=(n, W, R, 1))
        + gen.normal(scale=1.5, size=(n, W, R, P))
    )
    se = S.standard_error(components(0.64, 0.25, 2.25), W, R, P)
    assert y.mean(axis=(1, 2, 3)).std() == pytest.approx(se, rel=0.02)


def test_runs_needed():
    # room = (0.1 / 2)^2 - 0 = 0.0025; runs >= (0.04 + 0.2 / 200) / (3 x 0.0025) = 5.47: 6 runs per world.
    c = components(0.0, 0.04, 0.2)
    assert S.runs_needed(c, 0.1, worlds=3, prompts=200, z=2.0) == 6
    assert 2 * S.standard_error(c, 3, 6, 200) <= 0.1 < 2 * S.standard_error(c, 3, 5, 200)
    assert S.runs_needed(components(0.01, 0.04, 0.2), 0.1, worlds=3, prompts=200, z=2.0) is None
    assert S.runs_needed(c, 10.0, worlds=3, prompts=200) == 1


def test_run_level_errors():
    for bad in ([], [[]], [[[]]], {0: {}}):
        with pytest.raises(ValueError, match="at least one world"):
            S.hierarchical_bootstrap(bad)
    with pytest.raises(ValueError, match="level"):
        S.hierarchical_bootstrap(TINY, level=95)
    with pytest.raises(ValueError, match="n_resamples"):
        S.hierarchical_resamples(TINY, n_resamples=0)
    with pytest.raises(ValueError, match="standard_error"):
        S.standard_error(components(0, 0, 1), 0, 1, 1)
