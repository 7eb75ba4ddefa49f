"""The statistics behind every evaluation table (docs/method.md §7 Statistics): Wilson intervals for rates,
the exact (and stratified) McNemar test for two models judged on the same prompts, a paired bootstrap for
differences of means, ASR@n (the unbiased pass@k estimator), and the
plain-words verdict a table prints. Pure Python and numpy; no other module of the project is imported.

Run-level statistics (the training run as the unit): a hierarchical bootstrap over worlds, runs and prompts,
the count "A lower in r of R runs", the claim they make together, and the variance components (world, run,
prompt) of a figure with the standard error they imply. Their data are nested: {world: {run: per-prompt
values}} (or a list of worlds, each a list of runs, each an array of per-prompt values).

Rates are fractions in [0, 1] everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
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


# ---- run-level statistics: worlds > runs > prompts (docs/method.md §7 Statistics) -------------------------


def _nested(data, who: str) -> list[list[np.ndarray]]:
    """{world: {run: per-prompt values}} or [[values, ...], ...] as a list of worlds, each a list of runs,
    each a float64 array; at least one world, one run in each world and one prompt in each run."""
    out = [[np.asarray(x, dtype=np.float64).ravel() for x in _items(w)] for w in _items(data)]
    if not out or any(not runs for runs in out) or any(x.size == 0 for runs in out for x in runs):
        raise ValueError(f"{who}: need at least one world, one run in every world, one prompt in every run")
    return out


def _items(data) -> list:
    return list(data.values()) if isinstance(data, Mapping) else list(data)


def _resampled_means(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n means of x resampled with replacement (len(x) draws each), in blocks so that memory stays small."""
    out = np.empty(n)
    rows = max(1, 2_000_000 // x.size)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        out[start:stop] = x[rng.integers(0, x.size, size=(stop - start, x.size))].mean(axis=1)
    return out


def nested_mean(data) -> float:
    """The figure a run-level table shows (docs/method.md §7 Statistics): the mean over worlds of the mean
    over runs of the mean over prompts. Every world weighs the same, every run the same within its world."""
    return float(np.mean([np.mean([x.mean() for x in runs]) for runs in _nested(data, "nested_mean")]))


def hierarchical_resamples(diffs, n_resamples: int = 10_000, seed: int = 0) -> np.ndarray:
    """n_resamples draws of the hierarchical bootstrap of nested_mean (docs/method.md §7 Statistics). One
    draw: W worlds with replacement from the W; within each drawn world, as many runs as it has, with
    replacement; within each drawn run, as many prompts as it has, with replacement; then nested_mean of what
    was drawn. The W draws of one resample are independent, so all n_resamples x W of them are drawn at once
    and each world's (and each run's) share is resampled in one vectorised step. Deterministic for a seed."""
    worlds = _nested(diffs, "hierarchical_resamples")
    if n_resamples < 1:
        raise ValueError(f"hierarchical_resamples: n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    W = len(worlds)
    pick = rng.integers(0, W, size=n_resamples * W)  # (B*W,) the world in each slot, slot = resample*W + i
    total = np.zeros(n_resamples)
    for j, runs in enumerate(worlds):
        slots = np.flatnonzero(pick == j)  # (S,) the slots that drew world j
        R = len(runs)
        run_pick = rng.integers(0, R, size=len(slots) * R)  # (S*R,) the run in each of their R places
        run_sums = np.zeros(len(slots))
        for r, x in enumerate(runs):
            hits = np.flatnonzero(run_pick == r)  # (H,) the places that drew run r
            means = _resampled_means(x, hits.size, rng)  # (H,) each place's mean over resampled prompts
            run_sums += np.bincount(hits // R, weights=means, minlength=len(slots))
        total += np.bincount(slots // W, weights=run_sums / R, minlength=n_resamples)
    boot = total / W  # (B,)
    scale = max(np.abs(x).max() for runs in worlds for x in runs)
    boot[np.abs(boot) <= 1e-12 * scale] = 0.0  # a resample whose values cancel is 0, not 1e-17
    return boot


def hierarchical_bootstrap(diffs, n_resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> dict:
    """Hierarchical bootstrap interval of a nested figure, typically per-prompt paired differences A - B
    (e.g. A's harmful 1/0 minus B's on the same prompt) nested {world: {run: array}} (docs/method.md §7
    Statistics): resample worlds, then runs within each drawn world, then prompts within each drawn run
    (hierarchical_resamples). The estimate is nested_mean (worlds weigh equally, runs equally within a world,
    prompts equally within a run); the interval is the percentile interval of the resamples, their
    (1 - level)/2 and (1 + level)/2 quantiles. Prompts are resampled independently in each run, although the
    runs of a world share their prompts (the nested scheme; prompts are not treated as a crossed factor)."""
    if not 0 < level < 1:
        raise ValueError(f"hierarchical_bootstrap: level must be in (0, 1), got {level}")
    boot = hierarchical_resamples(diffs, n_resamples, seed)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    est, lo, hi = nested_mean(diffs), float(lo), float(hi)
    return {"estimate": est, "lo": lo, "hi": hi, "level": level, "test": "hierarchical bootstrap"}


def runs_lower(diffs) -> tuple[int, int]:
    """(r, R): in r of the R runs (all worlds) A's rate is lower than B's, i.e. the run's mean difference
    A - B over its prompts is below 0 (docs/method.md §7 Statistics). Ties count as not lower."""
    means = [x.mean() for runs in _nested(diffs, "runs_lower") for x in runs]
    return sum(1 for m in means if m < 0), len(means)


@dataclass(frozen=True)
class RunClaim:
    """A run-level claim "A below B" (docs/method.md §7 Statistics): the estimate of A - B (nested_mean),
    its hierarchical-bootstrap interval [lo, hi] at `level`, A lower in r of R runs, and the verdict."""

    estimate: float
    lo: float
    hi: float
    level: float
    r: int
    R: int
    verdict: str


def run_level_claim(
    diffs, n_resamples: int = 10_000, seed: int = 0, level: float = 0.95, names=("A", "B")
) -> RunClaim:
    """The run-level test of A against B from per-prompt differences A - B nested {world: {run: array}}
    (docs/method.md §7 Statistics): "A lower" when its hierarchical-bootstrap interval is < 0, "B lower"
    when above, otherwise "no measurable difference" (an interval touching 0 does not exclude it). With one
    run in all, the interval is over prompts alone: the verdict says it holds for these models, not the
    method."""
    b = hierarchical_bootstrap(diffs, n_resamples, seed, level)
    r, R = runs_lower(diffs)
    if b["hi"] < 0:
        verdict = f"{names[0]} lower"
    elif b["lo"] > 0:
        verdict = f"{names[1]} lower"
    else:
        verdict = "no measurable difference"
    if R < 2 and verdict != "no measurable difference":  # the interval is over prompts alone
        verdict += " (one run: these models, not the method)"
    return RunClaim(b["estimate"], b["lo"], b["hi"], level, r, R, verdict)


def _nested_anova(worlds: list[list[np.ndarray]]) -> dict:
    """Sums of squares, degrees of freedom and expected-mean-square coefficients of the nested one-way design
    y_wrp = mu + a_w + b_wr + e_wrp, unbalanced in general (as in Searle, Casella & McCulloch 1992, "Variance
    Components"): n_wr prompts in run r of world w, n_w = sum_r n_wr, N = sum_w n_w; a worlds, B runs."""
    n = [np.array([x.size for x in runs], dtype=np.float64) for runs in worlds]  # n_wr per world
    run_means = [np.array([x.mean() for x in runs]) for runs in worlds]  # ybar_wr
    n_w = np.array([nw.sum() for nw in n])  # (a,)
    world_means = np.array([(nw * m).sum() / nw.sum() for nw, m in zip(n, run_means)])  # ybar_w (by prompt)
    N, a, B = n_w.sum(), len(worlds), sum(len(runs) for runs in worlds)
    grand = (n_w * world_means).sum() / N
    ss_prompt = sum(((x - x.mean()) ** 2).sum() for runs in worlds for x in runs)
    ss_run = sum((nw * (m - wm) ** 2).sum() for nw, m, wm in zip(n, run_means, world_means))
    ss_world = (n_w * (world_means - grand) ** 2).sum()
    within = sum((nw**2).sum() / nw.sum() for nw in n)  # sum_w sum_r n_wr^2 / n_w
    return {
        "ss": {"world": ss_world, "run": ss_run, "prompt": ss_prompt},
        "df": {"world": a - 1, "run": B - a, "prompt": int(N) - B},
        "k_run": (N - within) / (B - a) if B > a else None,  # E[MS_run] = s2_p + k_run s2_r
        "k_world_run": (within - sum((nw**2).sum() for nw in n) / N) / (a - 1) if a > 1 else None,
        "k_world": (N - (n_w**2).sum() / N) / (a - 1) if a > 1 else None,  # E[MS_world] = .. + k_world s2_w
    }


@dataclass(frozen=True)
class VarianceComponents:
    """Variance components of a nested figure (docs/method.md §7 Statistics). variance: the estimates by
    level ("world", "run", "prompt"), clipped at 0, None where not identifiable; share: each as a fraction of
    their sum; raw: the unclipped (unbiased) estimates; mean_squares: (MS, df) by level; notes: what was
    clipped, what could not be separated."""

    variance: dict
    share: dict
    raw: dict
    mean_squares: dict
    notes: tuple


def _raw_components(t: dict, ms: dict) -> tuple[dict, list]:
    """Method-of-moments estimates from the expected mean squares (see variance_components)."""
    raw, notes = {"world": None, "run": None, "prompt": ms["prompt"]}, []
    if t["k_run"] is not None:
        raw["run"] = (ms["run"] - ms["prompt"]) / t["k_run"]
    else:
        held = "; the world component holds it" if t["k_world"] is not None else ""
        notes.append(f"one run per world: the run component is not identifiable{held}")
    if t["k_world"] is not None:
        run_part = t["k_world_run"] * raw["run"] if raw["run"] is not None else 0.0
        raw["world"] = (ms["world"] - ms["prompt"] - run_part) / t["k_world"]
    else:
        notes.append("one world: the world component is not identifiable (every figure is within that world)")
    return raw, notes


def variance_components(values) -> VarianceComponents:
    """Variance components of a figure from per-prompt values (0/1 outcomes, or paired differences) nested
    {world: {run: array}}, by the ANOVA method of moments for the nested random-effects model
    y_wrp = mu + a_w + b_wr + e_wrp, balanced or not (docs/method.md §7 Statistics). Mean squares
    MS = SS / df with SS_prompt = sum (y_wrp - ybar_wr)^2 on N - B df, SS_run = sum n_wr (ybar_wr - ybar_w)^2
    on B - a df, SS_world = sum n_w (ybar_w - ybar)^2 on a - 1 df (means weighted by prompts). Their
    expectations: E[MS_prompt] = s2_p; E[MS_run] = s2_p + k_run s2_r, k_run = (N - sum_w sum_r n_wr^2/n_w) /
    (B - a); E[MS_world] = s2_p + k_wr s2_r + k_w s2_w, k_wr = (sum_w sum_r n_wr^2/n_w - sum n_wr^2/N) /
    (a - 1), k_w = (N - sum n_w^2/N) / (a - 1). Balanced (R runs of P prompts): k_run = k_wr = P, k_w = R P.
    Solving gives the raw (unbiased) estimates; a negative one is clipped at 0 and said so in notes. One
    run per world: s2_r is not identifiable (None) and the world estimate is s2_w + s2_r; one world: s2_w is
    None."""
    worlds = _nested(values, "variance_components")
    t = _nested_anova(worlds)
    if t["df"]["prompt"] == 0:
        raise ValueError("variance_components: every run has one prompt; the prompt level needs two in a run")
    ms = {k: t["ss"][k] / t["df"][k] if t["df"][k] else None for k in ("world", "run", "prompt")}
    raw, notes = _raw_components(t, ms)
    variance = {k: None if v is None else max(0.0, float(v)) for k, v in raw.items()}
    notes += [f"the {k} estimate {v:.3g} is negative, clipped at 0" for k, v in raw.items() if v and v < 0]
    total = sum(v for v in variance.values() if v is not None)
    share = {k: None if v is None else (v / total if total > 0 else 0.0) for k, v in variance.items()}
    mean_squares = {k: (None if ms[k] is None else float(ms[k]), t["df"][k]) for k in ms}
    raw = {k: None if v is None else float(v) for k, v in raw.items()}
    return VarianceComponents(variance, share, raw, mean_squares, tuple(notes))


def standard_error(components: VarianceComponents, worlds: int, runs: int, prompts: int) -> float:
    """Standard error of a figure's nested_mean over `worlds` worlds x `runs` runs each x `prompts` prompts
    each (docs/method.md §7 Statistics): sqrt(s2_w / W + s2_r / (W R) + s2_p / (W R P)). A component that is
    None counts as 0 (with one world measured, the error is that of a figure within that world; with one
    run per world, s2_r sits inside s2_w and is divided by W only, which overstates the error)."""
    if min(worlds, runs, prompts) < 1:
        raise ValueError(f"standard_error: need >= 1 world, run, prompt, got {worlds}, {runs}, {prompts}")
    v = {k: x or 0.0 for k, x in components.variance.items()}
    W, R, P = worlds, runs, prompts
    return math.sqrt(v["world"] / W + v["run"] / (W * R) + v["prompt"] / (W * R * P))


def runs_needed(
    components: VarianceComponents, effect: float, worlds: int, prompts: int, z: float = Z95
) -> int | None:
    """The fewest runs per world for which z times the standard error of a difference is at most |effect|,
    with the components of the per-prompt differences A - B (docs/method.md §7 Statistics): the interval's
    half-width then equals the effect, detection at about even odds (z = Z95 + 0.8416 for 80% power). None
    when no number of runs suffices (the world term alone, s2_w / W, is too large)."""
    v = {k: x or 0.0 for k, x in components.variance.items()}
    room = (effect / z) ** 2 - v["world"] / worlds  # what the run and prompt terms may use
    if room <= 0:
        return None
    need = (v["run"] + v["prompt"] / prompts) / (worlds * room)
    return max(1, math.ceil(need - 1e-12))
