import torch


def kl_per_position(lp_P, lp_Q):
    """KL(P || Q) = sum_v p(v) (lp_P(v) - lp_Q(v)) per position; tokens with p(v) = 0 add 0.
    lp_P, lp_Q (..., V) log-probabilities -> (...)."""
    p = lp_P.exp()  # (..., V)
    terms = torch.where(p > 0, p * (lp_P - lp_Q), 0.0)  # (..., V): 0 * (-inf) would be nan
    return terms.sum(-1)  # (...)
