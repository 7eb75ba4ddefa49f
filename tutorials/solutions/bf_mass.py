import torch


def bf_mass(lp, mask):
    """sum_{v in mask} p(v) per position. lp (..., V), mask (..., V) bool -> (...)."""
    return torch.where(mask, lp.exp(), 0.0).sum(-1)
