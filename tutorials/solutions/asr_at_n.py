import math


def asr_at_n(c, N, n):
    """The unbiased estimate, from N samples of which c are harmful, that at least one of n samples is:
    1 - C(N - c, n) / C(N, n) (the chance that n samples drawn without replacement miss every harmful one)."""
    return 1 - math.comb(N - c, n) / math.comb(N, n)
