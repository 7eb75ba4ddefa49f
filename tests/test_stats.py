"""stats.py against independent computations: Wilson intervals worked by hand and by inverting the score test
numerically, exact binomial / McNemar p-values by enumerating every sign assignment of the discordant pairs,
ASR@n by enumerating every subset of samples, the bootstrap on cases whose answer is known, and the errors."""

from __future__ import annotations

import itertools
import math

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
