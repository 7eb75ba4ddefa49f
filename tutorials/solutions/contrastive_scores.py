import math


def contrastive_scores(lp_A, lp_B, alpha, beta):
    """s(v) = lp_A(v) + alpha (lp_A(v) - lp_B(v)) on V_head = { v : p_A(v) >= beta max p_A }, -inf elsewhere.
    lp_A, lp_B (..., V) -> (..., V)."""
    lp_B = lp_B.clamp(min=-1e4)  # (..., V): a token the base never says gets a large, finite bonus
    s = lp_A + alpha * (lp_A - lp_B)  # (..., V)
    if beta <= 0:
        return s
    head = lp_A >= lp_A.max(-1, keepdim=True).values + math.log(beta)  # (..., V) bool
    return s.masked_fill(~head, float("-inf"))
