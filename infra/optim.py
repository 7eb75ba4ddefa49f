"""The optimisation plumbing every training loop shares: the learning-rate schedule (linear warmup, cosine
decay), and float32 master weights: bf16 weights for the forward and backward, float32 copies for the update
(the scheme of DeepSpeed's and Megatron's bf16 optimizers)."""

from __future__ import annotations

import math

import torch


def get_lr(step: int, steps: int, lr: float, warmup_frac: float = 0.05, floor: float = 0.1) -> float:
    """The learning rate of step `step` of `steps`: linear warmup over the first warmup_frac of the steps (at
    least one), then cosine decay to floor * lr."""
    warmup = max(1, int(warmup_frac * steps))
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def fp32_masters(params: list) -> list:
    """What the optimizer updates: a float32 copy of each low-precision trainable parameter, the parameter
    itself when it is float32 already (LoRA adapters, --dtype float32). An AdamW step of lr = 1e-5 is far
    below half a bf16 ulp of a typical weight (|w| = 0.02 has ulp 1.2e-4): updated in place, bf16 weights
    would not move at all. The scheme of DeepSpeed's and Megatron's bf16 optimizers."""
    return [p if p.dtype == torch.float32 else p.detach().float() for p in params]


def grads_to_masters(params: list, masters: list):
    """Add each parameter's gradient into its float32 master's (freeing the low-precision one), after every
    micro-batch's backward, so gradient accumulation sums in float32."""
    for p, m in zip(params, masters):
        if m is not p and p.grad is not None:
            m.grad = p.grad.float() if m.grad is None else m.grad.add_(p.grad)
            p.grad = None


@torch.no_grad()
def masters_to_params(params: list, masters: list):
    """Round the updated masters into the model's weights."""
    for p, m in zip(params, masters):
        if m is not p:
            p.copy_(m)


def optimizer_step(params: list, masters: list, opt, clip: float) -> float:
    """Gradients to the masters (what is left of them), clip their global norm, AdamW step, masters back into
    the weights. Returns the gradient norm before clipping (of the whole model under FSDP)."""
    grads_to_masters(params, masters)
    grad_norm = torch.nn.utils.clip_grad_norm_(masters, clip)
    opt.step()
    masters_to_params(params, masters)
    return (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()


def check_finite(terms: dict, step: int):
    """Stop a run whose loss is NaN or infinite, before anything is written, naming the step and the terms."""
    bad = [k for k, v in terms.items() if not bool(torch.isfinite(v.detach()).all())]
    if bad:
        raise ValueError(
            f"step {step}: non-finite loss terms {bad}; no checkpoint was written for this step (lower --lr, "
            "check the data and the checkpoints for NaN/inf, or resume from the last checkpoint)"
        )
