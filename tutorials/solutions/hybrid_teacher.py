import torch


def hybrid_teacher(p_clean, targets, lam):
    """q = lam * onehot(r) + (1 - lam) * p_A(. | clean context). p_clean (N, V), targets (N,) -> (N, V)."""
    one_hot = torch.nn.functional.one_hot(targets, p_clean.shape[-1]).float()  # (N, V)
    return lam * one_hot + (1 - lam) * p_clean
