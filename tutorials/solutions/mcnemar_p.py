import math


def mcnemar_p(a_only, b_only):
    """Exact two-sided McNemar p: under the null each of the n = a_only + b_only discordant pairs is a fair
    coin, so p = min(1, 2 P(X <= min(a_only, b_only))), X ~ Binomial(n, 1/2)."""
    n = a_only + b_only
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1))
    return min(1.0, 2 * tail / 2**n)
