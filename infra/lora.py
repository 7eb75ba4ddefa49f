"""LoRA (Hu et al. 2021): a low-rank update on the attention and MLP projections, W x + (alpha / r) B A x,
in float32 whatever the weights' dtype. Switched off, the adapters give back the model they started from
(train.py's frozen aligned teacher under LoRA); the merge into the weights is done in float32; the adapter is
saved in PEFT's layout (adapter_config.json + adapter_model.safetensors: peft.PeftModel.from_pretrained)."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from infra.files import write_json_atomic

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))  # float32
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))  # 0: W
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.enabled = True

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:  # the frozen aligned teacher is the student with its adapters off
            return y
        return y + ((x.to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T) * self.scale).to(y.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A in float32 (a bf16 merge would round away most of a small update)."""
        return self.base.weight.float() + (self.lora_B @ self.lora_A) * self.scale  # (out, in)


def add_lora(model, rank: int, alpha: float):
    """Wrap every target projection; freeze everything but the adapters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for module in list(model.modules()):
        for name in LORA_TARGETS:
            child = getattr(module, name, None)
            if isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha))


def set_lora(model, enabled: bool):
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.enabled = enabled


def merge_lora(model, dtype: torch.dtype = torch.float32):
    """Fold each adapter into its weight, in float32, and put plain nn.Linear layers of `dtype` back (the same
    names as the checkpoint). The whole model is cast to `dtype` (float32 unless --save-dtype says
    otherwise)."""
    for module in list(model.modules()):
        for name in LORA_TARGETS:
            child = getattr(module, name, None)
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    weight = child.merged_weight()
                linear = child.base.to(dtype)
                linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
                setattr(module, name, linear)
    return model.to(dtype)


def lora_state(model) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's names: base_model.model.<module path>.lora_A.weight / .lora_B.weight."""
    state = {}
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            state[f"base_model.model.{path}.lora_A.weight"] = module.lora_A.detach().float().contiguous()
            state[f"base_model.model.{path}.lora_B.weight"] = module.lora_B.detach().float().contiguous()
    return state


def save_adapter(model, folder: Path, rank: int, alpha: float, base_model: str):
    """The adapter in PEFT's layout (adapter_config.json + adapter_model.safetensors), loadable with
    peft.PeftModel.from_pretrained on the aligned model."""
    from safetensors.torch import save_file

    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(lora_state(model), tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(LORA_TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "modules_to_save": None,
    }
    write_json_atomic(tmp / "adapter_config.json", config, indent=2)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


class FrozenAligned:
    """The aligned model A, frozen: its own copy, or under LoRA the student with its adapters switched off,
    which is exactly A (so only two weight copies are held: the student and the base). Called as a model,
    without gradients."""

    def __init__(self, model, adapters_off: bool):
        self.model, self.adapters_off = model, adapters_off

    @torch.no_grad()
    def __call__(self, *args, **kwargs) -> torch.Tensor:
        if not self.adapters_off:
            return self.model(*args, **kwargs)
        set_lora(self.model, False)
        try:
            return self.model(*args, **kwargs)
        finally:
            set_lora(self.model, True)
