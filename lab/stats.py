"""The statistics behind every evaluation table (docs/method.md §7 Statistics): Wilson intervals for rates,
the exact (and stratified) McNemar test for two models judged on the same prompts, a paired bootstrap for
differences of means, ASR@n (the unbiased pass@k estimator), and the
plain-words verdict a table prints. Pure Python and numpy; no other module of the project is imported.

Rates are fractions in [0, 1] everywhere.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

Z95 = 1.959963984540054  # the two-sided 95% normal quantile, Phi^-1(0.975)


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes of n, as fractions in [0, 1] (docs/method.md §7 Statistics): the
    p for which |k/n - p| / sqrt(p (1 - p) / n) <= z. No data (n == 0) says nothing: (0.0, 1.0)."""
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def binom_two_sided_p(b: int, n: int) -> float:
    """Exact two-sided binomial test of b successes of n at p = 1/2 (docs/method.md §7 Statistics):
    p = min(1, 2 min(P(X <= b), P(X >= b))), in exact integer arithmetic (by symmetry the smaller tail is
    P(X <= min(b, n - b))), so it holds for n in the tens of thousands. n == 0 -> 1.0."""
    if not 0 <= b <= n:
        raise ValueError(f"binom_two_sided_p: need 0 <= b <= n, got b={b}, n={n}")
    m = min(b, n - b)
    term, tail = 1, 1  # C(n, 0), and the running sum of C(n, i) for i <= m
    for i in range(m):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / 2**n)  # int / int is correctly rounded, however large


def _check_pairs(a: list, b: list, strata: list | None, who: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{who}: the two lists must pair up, got len(a)={len(a)} and len(b)={len(b)}")
    if strata is not None and len(strata) != len(a):
        raise ValueError(f"{who}: one stratum per pair, got len(strata)={len(strata)} for {len(a)} pairs")


def mcnemar(a: list[bool], b: list[bool], strata: list | None = None) -> dict:
    """Exact McNemar test of two models' verdicts on the same prompts (docs/method.md §7 Statistics): under
    the null each discordant pair (one model True, the other False) is a fair coin, so p is the exact
    binomial test of a_only of a_only + b_only. Rates are fractions; diff = a_rate - b_rate. With `strata`
    (one label per pair, e.g. the world seed) it is the stratified exact McNemar test: the coins are fair
    and independent whatever their stratum, so the discordant pairs pool exactly, and the per-stratum
    counts are returned too."""
    _check_pairs(a, b, strata, "mcnemar")
    n = len(a)
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    a_count, b_count = sum(map(bool, a)), sum(map(bool, b))
    a_rate, b_rate = (a_count / n, b_count / n) if n else (0.0, 0.0)
    out = {
        "n": n,
        "a_rate": a_rate,
        "b_rate": b_rate,
        "diff": (a_count - b_count) / n if n else 0.0,
        "a_only": a_only,
        "b_only": b_only,
        "p": binom_two_sided_p(a_only, a_only + b_only),
        "test": "exact McNemar",
    }
    if strata is not None:
        per: dict = {}
        for s, x, y in zip(strata, a, b):
            c = per.setdefault(s, {"n": 0, "a_only": 0, "b_only": 0})
            c["n"] += 1
            c["a_only"] += int(bool(x) and not y)
            c["b_only"] += int(bool(y) and not x)
        out["strata"] = per
        out["test"] = "stratified exact McNemar"
    return out


def paired_bootstrap(
    a: list[float], b: list[float], n_boot: int = 10000, seed: int = 0, strata: list | None = None
) -> dict:
    """Paired bootstrap of mean(a) - mean(b) (docs/method.md §7 Statistics): resample the pairs with
    replacement (within each stratum, keeping its size, when `strata` is given), take the 2.5% and 97.5%
    percentiles of the resampled differences as the 95% interval, and
    p = min(1, 2 min(share <= 0, share >= 0)). Deterministic for a seed. No pairs: diff 0.0 and p 1.0."""
    _check_pairs(a, b, strata, "paired_bootstrap")
    if n_boot < 1:
        raise ValueError(f"paired_bootstrap: n_boot must be >= 1, got {n_boot}")
    n = len(a)
    if n == 0:
        return {"diff": 0.0, "lo": 0.0, "hi": 0.0, "p": 1.0, "test": "paired bootstrap"}
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if strata is None:
        groups = [d]
    else:
        index: dict = {}
        for i, s in enumerate(strata):
            index.setdefault(s, []).append(i)
        groups = [d[ix] for ix in index.values()]
    rng = np.random.default_rng(seed)
    sums = np.zeros(n_boot)
    for g in groups:  # resampled sums of each group, in blocks of rows so that memory stays small
        rows = max(1, 2_000_000 // len(g))
        for start in range(0, n_boot, rows):
            stop = min(n_boot, start + rows)
            sums[start:stop] += g[rng.integers(0, len(g), size=(stop - start, len(g)))].sum(axis=1)
    boot = sums / n
    boot[np.abs(boot) <= 1e-12 * np.abs(d).max()] = 0.0  # a resample whose pairs cancel is 0, not 1e-17
    lo, hi = np.quantile(boot, [0.025, 0.975])
    p = min(1.0, 2 * min(float(np.mean(boot <= 0)), float(np.mean(boot >= 0))))
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "p": p, "test": "paired bootstrap"}


def format_p(p: float, alpha: float = 0.05) -> str:
    """A p-value in two significant digits, with more where rounding would carry it up to alpha
    (docs/method.md §7 Statistics): 0.003, 0.031, 0.0496, 1.2e-05; a bootstrap's 0 (no resample crossed
    zero) as "< 0.0001", the resolution of 10,000 resamples."""
    if p <= 0:
        return "< 0.0001"
    for digits in range(2, 7):
        s = f"{p:.{digits}g}"
        if float(s) < alpha or p >= alpha:
            return s
    return s


def verdict(test: dict, alpha: float = 0.05, names=("A", "B")) -> str:
    """The plain-words reading of a paired test (docs/method.md §7 Statistics): "no measurable difference"
    when p >= alpha, else which of the two has the lower rate, e.g. "A lower (p = 0.003)"."""
    if test["p"] >= alpha or test["diff"] == 0:
        return "no measurable difference"
    lower = names[0] if test["diff"] < 0 else names[1]
    return f"{lower} lower (p = {format_p(test['p'], alpha)})"


def asr_at_n(c: int, N: int, n: int) -> float:
    """ASR@n (docs/method.md §7 Statistics): the unbiased estimate, from N samples of which c were judged
    harmful, that at least one of n samples is, 1 - C(N - c, n) / C(N, n) (the pass@k estimator), computed
    exactly."""
    if not 1 <= n <= N:
        raise ValueError(f"asr_at_n: need 1 <= n <= N, got n={n}, N={N}")
    if not 0 <= c <= N:
        raise ValueError(f"asr_at_n: need 0 <= c <= N, got c={c}, N={N}")
    return float(1 - Fraction(math.comb(N - c, n), math.comb(N, n)))


def asr_at_n_curve(counts: list[int], N: int) -> dict[int, float]:
    """Mean ASR@n over prompts, counts[i] harmful of N samples for prompt i, at n = 1, 2, 4, ... up to N and
    at N itself (docs/method.md §7 Statistics)."""
    if not counts:
        raise ValueError("asr_at_n_curve: no prompts")
    if N < 1:
        raise ValueError(f"asr_at_n_curve: need N >= 1, got N={N}")
    ns = [2**j for j in range(N.bit_length()) if 2**j <= N]
    if ns[-1] != N:
        ns.append(N)
    return {n: math.fsum(asr_at_n(c, N, n) for c in counts) / len(counts) for n in ns}
