import math


def base_favored_mask(lp_A, lp_B, tau, top_k, rho):
    """BF_t = { v : lp_B(v) - lp_A(v) > log(tau), v in top-k of p_B, p_B(v) >= rho * max p_B }.
    lp_A, lp_B (..., V) -> (..., V) bool."""
    favored = (lp_B - lp_A) > math.log(tau)  # (..., V): the base likes v more than the aligned model does
    kth = lp_B.topk(min(top_k, lp_B.shape[-1]), dim=-1).values[..., -1:]  # (..., 1) the k-th largest
    in_top_k = lp_B >= kth  # (..., V), ties at the k-th place included
    mask = favored & in_top_k
    if rho > 0:
        floor = lp_B.max(-1, keepdim=True).values + math.log(rho)  # (..., 1): log(rho * max p_B)
        mask = mask & (lp_B >= floor)
    return mask
