def penalty_weights(bf_mass_A, w_max):
    """w_t = clip(bf_mass_A_t / mean(bf_mass_A), 0, w_max), no gradient. (N,) -> (N,)."""
    mean = bf_mass_A.mean().clamp(min=1e-8)  # (): all-zero masses give weights 0, not nan
    return (bf_mass_A / mean).clamp(0, w_max).detach()  # (N,)
