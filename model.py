"""A hand-written Llama / Qwen2 / Qwen3 that loads Hugging Face checkpoints directly.

Read top to bottom:
    1. ModelArgs       the config dataclass, parsed from a checkpoint's config.json
    2. RMSNorm, rotary embedding (RoPE)
    3. KVCache         everything a model remembers while decoding, in one object; the attention masks
    4. Attention (grouped-query), FeedForward (SwiGLU), Block, Transformer
    5. load / save     safetensors in and out, no transformers at run time
    6. Tokenizer       tokenizers' tokenizer.json, special ids, the checkpoint's own chat template
Generation (left padding, sampling, the decoding loops) lives in decode.py.

The module tree and parameter names mirror Hugging Face's exactly (`model.layers.0.self_attn.q_proj`,
...), so a checkpoint loads with `strict=True` and no rename table. Every numerical detail that decides
whether our logits equal transformers' (RMSNorm order, RoPE layout, Llama-3 frequency scaling, Qwen2
biases, Qwen3 q/k norms, tied embeddings) is annotated where it happens; see docs/model_notes.md.

Shapes: B batch, T new tokens, S cache length, L layers, d hidden size, H query heads, Hkv key/value heads,
hd head dim, I MLP width, V vocabulary.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------
# 1. Config
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelArgs:
    model_type: str = "llama"
    dim: int = 256  # hidden_size
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 8
    head_dim: int = 32  # may differ from dim // n_heads (Qwen3)
    intermediate_size: int = 688
    vocab_size: int = 1024
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3.1/3.2: {"rope_type": "llama3", "factor", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v (and o for Llama) biases; Qwen2: q/k/v only, always on
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "ModelArgs":
        """Parse a Hugging Face config.json dict. Refuses what we do not implement, naming the key."""
        mt = cfg.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            supported = ", ".join(SUPPORTED_MODEL_TYPES)
            raise ValueError(f"{source}: model_type={mt!r} is not supported; supported: {supported}")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: hidden_act={act!r} is not supported; only 'silu' (SwiGLU) is")
        if cfg.get("use_sliding_window", False):
            raise ValueError(
                f"{source}: use_sliding_window=true (sliding_window={cfg.get('sliding_window')}) is not "
                "supported; released Qwen2.5/Qwen3 checkpoints have it false. Set it to false only if the "
                "model was trained without it."
            )
        for key in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        ):
            if key not in cfg:
                raise ValueError(f"{source}: required key {key!r} is missing")
        n_heads = cfg["num_attention_heads"]
        theta, scaling = _parse_rope(cfg, source)
        return cls(
            model_type=mt,
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,  # missing means plain multi-head attention
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,  # an explicit head_dim overrides
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=True if mt == "qwen2" else cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
            qk_norm=(mt == "qwen3"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )

    def to_hf_config(self, dtype: torch.dtype = torch.float32) -> dict:
        """The config.json that transformers reads back as the same model (4.x key spelling, which 5.x also
        reads)."""
        archs = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        arch = archs[self.model_type]
        cfg = {
            "architectures": [arch],
            "model_type": self.model_type,
            "hidden_size": self.dim,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias and self.model_type != "qwen2",
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": str(dtype).removeprefix("torch."),
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
        }
        if self.model_type in ("qwen2", "qwen3"):
            cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.n_layers)
            cfg.pop("mlp_bias")
        return cfg


def _parse_rope(cfg: dict, source: str) -> tuple[float, dict | None]:
    """rope_theta and the scaling dict, from either spelling real checkpoints use:
    transformers 4.x: top-level `rope_theta` + `rope_scaling = {"rope_type"|"type": ...}`;
    transformers 5.x: `rope_parameters = {"rope_type", "rope_theta", ...}`."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    theta = cfg.get("rope_theta") or params.get("rope_theta") or 10000.0
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{source}: rope_type={rope_type!r} (in rope_scaling/rope_parameters) is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return float(theta), None
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in scaling]
    if missing:
        raise ValueError(f"{source}: rope_type='llama3' needs {missing} in rope_scaling/rope_parameters")
    return float(theta), {"rope_type": "llama3", **{k: scaling[k] for k in keys}}


# ----------------------------------------------------------------------------------------------
# 2. Normalisation and rotary embedding
# ----------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # HF's exact order: statistics in fp32, eps inside the rsqrt, cast back, *then* scale in model dtype.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(args: ModelArgs, device=None) -> torch.Tensor:
    """inv_freq[i] = 1 / theta^(2i/hd), in fp32 always (never rounded by a .to(bf16) of the model).
    Llama 3.1/3.2 (`rope_type: llama3`): low frequencies divided by `factor`, a smooth band in between."""
    hd = args.head_dim
    even = torch.arange(0, hd, 2, dtype=torch.float32, device=device)  # (hd/2,): 2i
    inv_freq = 1.0 / (args.rope_theta ** (even / hd))  # (hd/2,)
    s = args.rope_scaling
    if s is None:
        return inv_freq
    f, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    L = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > L / lo, inv_freq / f, inv_freq)  # long wavelengths: divide by the factor
    smooth = (L / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / f + smooth * scaled
    in_band = ~(wavelen < L / hi) & ~(wavelen > L / lo)  # boundaries inclusive, as HF
    return torch.where(in_band, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables for rotate_half RoPE. positions (B, T) -> cos, sin (B, T, hd) in the activation dtype.
    Angles and cos/sin are computed in fp32, then cast down (as HF does)."""
    angles = positions[..., None].float() * inv_freq  # (B, T, hd/2) fp32
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, hd): dim i pairs with i + hd/2
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd); cos/sin (B, T, hd). HF checkpoints use the rotate_half layout (no permutation)."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # rotate_half
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------------------------
# 3. The KV cache and the attention masks
# ----------------------------------------------------------------------------------------------
def padded_causal_mask(key_valid: torch.Tensor, q_slot: torch.Tensor) -> torch.Tensor:
    """Which keys each query sees: key_valid (B, S) bool, the slots that hold real (not padding) tokens;
    q_slot (T,) the slot of each query. A query sees every real key at or before its own slot.
    -> bool (B, 1, T, S). A padding query would see no key at all (NaN in softmax), so it sees its own slot;
    its output is never used."""
    k_slot = torch.arange(key_valid.shape[1], device=key_valid.device)  # (S,)
    causal = k_slot[None, :] <= q_slot[:, None]  # (T, S)
    mask = causal[None] & key_valid[:, None, :]  # (B, T, S)
    mask = mask | (k_slot[None, :] == q_slot[:, None])[None]  # (B, T, S): a query always sees itself
    return mask[:, None]  # (B, 1, T, S)


class KVCache:
    """Everything a model remembers while decoding, in one object (docs/model_notes.md §6 F2):

        k[i], v[i]  (B, Hkv, S, hd)  the keys and values of layer i, written slot by slot
        valid       (B, S) bool      which slots hold real tokens (left padding does not)

    Preallocated for S slots (gpt-fast's static cache), so every decoding step has the same shapes. While
    a model decodes, it holds its cache as `model.cache` (decode.attach_cache puts it there):
    Transformer.forward calls `record` and `attention_mask`, and each layer's attention calls `update`.

    For torch.compile (§6 F3), two choices:
    - One tensor per layer, not one (L, B, Hkv, S, hd) tensor: inductor compiles a write into one layer of
      a stacked tensor into a copy of the whole cache at every step; into a tensor of its own, it writes
      just the new slot.
    - With compile=True the tensors are marked with torch._dynamo.mark_static_address. The compiled step
      writes them in place, and CUDA graphs (mode="reduce-overhead") can only do that for inputs at fixed
      addresses: buffers of an nn.Module (gpt-fast's caches) or tensors marked so. guard=False: the aligned
      and the base model's caches, of the same shapes, share one compiled graph. Eager decoding skips the
      marking, which would import torch._dynamo (seconds)."""

    def __init__(
        self,
        args: ModelArgs,
        batch_size: int,
        max_seq_len: int,
        dtype=torch.float32,
        device=None,
        compile: bool = False,
    ):
        shape = (batch_size, args.n_kv_heads, max_seq_len, args.head_dim)  # (B, Hkv, S, hd)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.valid = torch.zeros(batch_size, max_seq_len, dtype=torch.bool, device=device)  # (B, S)
        if compile:
            for t in (*self.k, *self.v, self.valid):
                torch._dynamo.mark_static_address(t, guard=False)

    def fits(self, batch_size: int, max_seq_len: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether this cache can serve a decoding call of this size, in this dtype on this device."""
        B, S = self.valid.shape
        same_place = self.k[0].dtype == dtype and self.k[0].device == device
        return B == batch_size and S >= max_seq_len and same_place

    def reset(self):
        """Forget every token; the tensors stay where they are."""
        self.valid.zero_()

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write one layer's new keys and values k, v (B, Hkv, T, hd) at slots (T,); return the layer's whole
        cache k, v (B, Hkv, S, hd). Slots not written yet hold stale numbers, which the attention mask
        hides."""
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        return self.k[layer], self.v[layer]  # (B, Hkv, S, hd)

    def record(self, slots: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Note which of the tokens written at slots (T,) are real: attention_mask (B, T), 1 = real,
        0 = padding; None = all real (a decoding step)."""
        if attention_mask is None:
            real = torch.ones(self.valid.shape[0], len(slots), dtype=torch.bool, device=self.valid.device)
        else:
            real = attention_mask.bool()  # (B, T)
        self.valid.index_copy_(1, slots, real)

    def attention_mask(self, slots: torch.Tensor) -> torch.Tensor:
        """bool (B, 1, T, S) for queries at slots (T,): each sees the real tokens at or before its slot."""
        return padded_causal_mask(self.valid, slots)


# ----------------------------------------------------------------------------------------------
# 4. The network
# ----------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.args = args
        self.layer_idx = layer_idx  # which layer of a KVCache is this one's (HF's layer_idx)
        H, Hkv, hd, d = args.n_heads, args.n_kv_heads, args.head_dim, args.dim
        self.q_proj = nn.Linear(d, H * hd, bias=args.attention_bias)  # H*hd may differ from d (Qwen3)
        self.k_proj = nn.Linear(d, Hkv * hd, bias=args.attention_bias)
        self.v_proj = nn.Linear(d, Hkv * hd, bias=args.attention_bias)
        # Qwen2 has biases on q/k/v only; Llama's attention_bias also covers o_proj.
        self.o_proj = nn.Linear(H * hd, d, bias=args.attention_bias and args.model_type == "llama")
        if args.qk_norm:  # Qwen3: RMSNorm over each head's hd features of q and k, before RoPE
            self.q_norm = RMSNorm(hd, args.norm_eps)
            self.k_norm = RMSNorm(hd, args.norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, cache_pos=None):
        """x (B, T, d); mask None (plain causal) or bool (B, 1, T, S); with a cache, cache_pos (T,) are the
        slots to write this step's keys and values at."""
        B, T, _ = x.shape
        H, Hkv, hd = self.args.n_heads, self.args.n_kv_heads, self.args.head_dim
        q = self.q_proj(x).view(B, T, H, hd)  # (B, T, H, hd)
        k = self.k_proj(x).view(B, T, Hkv, hd)  # (B, T, Hkv, hd)
        v = self.v_proj(x).view(B, T, Hkv, hd)  # (B, T, Hkv, hd)
        if self.args.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|Hkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # decoding: write this step into the cache, attend over all of it
            k, v = cache.update(self.layer_idx, cache_pos, k, v)  # (B, Hkv, S, hd)
        # GQA: query head h reads kv head h // (H / Hkv) (enable_gqa; never materialise repeated k/v).
        # mask None (unpadded, no cache) is the same SDPA call HF makes, so logits match bit for bit.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=hd**-0.5, enable_gqa=H != Hkv
        )  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, H * hd)  # (B, T, H*hd)
        return self.o_proj(y)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, I, b = args.dim, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(d, I, bias=b)  # Meta's w1
        self.up_proj = nn.Linear(d, I, bias=b)  # w3
        self.down_proj = nn.Linear(I, d, bias=b)  # w2

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, cos, sin, mask, cache=None, cache_pos=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_pos)  # pre-norm residual
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    """Holds what HF calls `model.*` so parameter names match the checkpoint."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)  # no sqrt(d) scaling for Llama/Qwen
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.cache: KVCache | None = None  # set while decoding (decode.py); the model's only decoding state
        self.checkpointing = False  # activation checkpointing per block (training big models)
        self.source = "the model"  # where it was loaded from (load_model): named in errors

    def forward(self, idx, attention_mask=None, positions=None, logits_at=None, cache_pos=None, embeds=None):
        """Logits (B, T, V) in the model dtype (upcast yourself before log_softmax/KL).

        idx (B, T) token ids. embeds (B, T, d): input embeddings used instead of embed_tokens(idx) (idx still
        gives the shape and device); gradient attacks (attacks.py, GCG) differentiate through them.
        attention_mask (B, T) 1 = real token, 0 = padding (left padding is the norm for generation; any
        padding works). positions (B, T) RoPE positions; default: count of real tokens
        before each one (cumsum(mask) - 1), as HF `generate` does for left padding (docs/model_notes.md
        §6 F1). logits_at: compute logits only at these positions and return them as (N, V): a (B, T) bool
        mask or a (rows, cols) pair of index tensors. Teacher-forced statistics and losses need the few
        response positions only; the head's matmul and the (B, T, V) tensor (2 GB in bf16 at V = 128k, B*T =
        8k) are skipped.
        cache_pos (T,): decode through `self.cache` (a KVCache, set up by decode.py): these tokens fill those
        cache slots and attend to every real token the cache holds at or before their own slot.
        """
        B, T = idx.shape
        if attention_mask is not None and positions is None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        if positions is None:
            start = 0 if cache_pos is None else cache_pos[0]
            positions = (torch.arange(T, device=idx.device) + start).expand(B, T)  # (B, T)
        cache = None if cache_pos is None else self.cache
        if cache_pos is not None:  # decoding: read and write the KV cache
            if cache is None:
                raise ValueError("cache_pos needs a KVCache in model.cache (decode.attach_cache sets one up)")
            cache.record(cache_pos, attention_mask)  # which of the new tokens are real
            mask = cache.attention_mask(cache_pos)  # (B, 1, T, S): over every slot of the cache
        elif attention_mask is None or bool(attention_mask.all()):
            mask = None  # plain causal: SDPA's fastest path, the call HF makes
        else:
            slots = torch.arange(T, device=idx.device)  # (T,)
            mask = padded_causal_mask(attention_mask.bool(), slots)  # (B, 1, T, T)
        x = self.model.embed_tokens(idx) if embeds is None else embeds  # (B, T, d)
        cos, sin = rope_cos_sin(rope_inv_freq(self.args, idx.device), positions, x.dtype)  # (B, T, hd)
        for layer in self.model.layers:
            if self.checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, cos, sin, mask, cache, cache_pos, use_reentrant=False
                )
            else:
                x = layer(x, cos, sin, mask, cache, cache_pos)  # (B, T, d)
        if logits_at is not None:
            x = x[logits_at]  # (N, d): RMSNorm and the head act on each position alone
        return self.lm_head(self.model.norm(x))  # (B, T, V), or (N, V) with logits_at


# ----------------------------------------------------------------------------------------------
# 5. Loading and saving Hugging Face folders
# ----------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def weight_files(folder: Path) -> dict[str, list[str]]:
    """{file name: [tensor names]}: from model.safetensors.index.json's weight_map when sharded, else
    model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(
                f"{index}: no 'weight_map' object; expected {{'weight_map': {{tensor name: file}}}}"
            )
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)
        for file in files:
            if not (folder / file).exists():
                raise FileNotFoundError(f"{index} names {file}, which is not in {folder}")
        return files
    single = folder / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(
            f"{folder}: no model.safetensors or model.safetensors.index.json. deepalign reads Hugging Face "
            "safetensors folders (convert .bin/.pth checkpoints with transformers' save_pretrained first)."
        )
    with open_safetensors(single) as f:
        return {"model.safetensors": list(f.keys())}


@contextmanager
def open_safetensors(path: Path, device="cpu"):
    """safetensors' safe_open(path), for reading tensors onto `device`. A truncated or corrupt file (a header
    that does not parse, data shorter than the header says, a read that fails), whether found on opening or
    on reading a tensor, is one ValueError naming the file instead of a SafetensorError traceback."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            yield f
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(
            f"{path}: truncated or corrupt safetensors file ({reason}); re-download or re-save the checkpoint"
        ) from e


def _non_finite_counts(tensors: dict) -> dict[str, int]:
    """{name: count of NaN/inf entries} of the tensors that have any: one isfinite reduction per tensor,
    counting only where it fails."""
    bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
    return {name: int((~torch.isfinite(tensors[name])).sum()) for name in bad}


def _check_finite_shard(shard: dict, path: Path, f) -> None:
    """One line when a loaded shard holds NaN/inf weights, naming the file, the tensors and the count: stored
    NaN/inf is a corrupt file; finite stored values that became inf overflowed the cast to a narrower dtype.
    `f` is the shard's open file, read again only on this error path."""
    counts = _non_finite_counts(shard)
    if not counts:
        return
    stored = _non_finite_counts({name: f.get_tensor(name) for name in counts})
    if stored:
        raise ValueError(
            f"{path}: NaN/inf weights: {_listed(stored)}; the file is corrupt: re-download or re-save the "
            "checkpoint"
        )
    dtype = str(next(iter(shard.values())).dtype).removeprefix("torch.")
    raise ValueError(
        f"{path}: weights overflow to inf in {dtype}: {_listed(counts)}; load the checkpoint in bfloat16 or "
        "float32 (--dtype)"
    )


def _entries(n: int) -> str:
    return f"{n} {'entry' if n == 1 else 'entries'}"


def _listed(counts: dict[str, int], most: int = 5) -> str:
    """'name (n entries), ...' for the first `most` of {name: count}, then how many more."""
    text = ", ".join(f"{name} ({_entries(n)})" for name, n in list(counts.items())[:most])
    if len(counts) > most:
        text += f" and {len(counts) - most} more tensors ({_entries(sum(counts.values()))} in all)"
    return text


def check_finite_logits(logits: torch.Tensor, where: str) -> None:
    """Raise one line naming `where` (e.g. the checkpoint folder) when logits hold NaN/inf. One reduction and
    one sync; meant for a model's first forward: corrupt weights, or activations that overflow float16."""
    if bool(torch.isfinite(logits).all()):
        return
    n, dtype = int((~torch.isfinite(logits)).sum()), str(logits.dtype).removeprefix("torch.")
    overflow = f" or {dtype} overflows (use --dtype bfloat16 or float32)" if dtype == "float16" else ""
    raise ValueError(
        f"{where}: {n} of {logits.numel()} logits are NaN/inf ({dtype}); the weights are corrupt "
        f"(re-download or re-save the checkpoint){overflow}"
    )


def check_folder(folder, needs=("config.json", "*.safetensors", "tokenizer.json")) -> Path:
    """`folder` as a Path if it is a checkpoint folder holding every file pattern of `needs`; else one error
    that says what was passed and what a checkpoint folder holds (a missing path, a single file such as a
    .gguf or a bare model.safetensors, a folder without one of the files)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such folder; pass a Hugging Face checkpoint folder")
    missing = list(needs)
    if folder.is_dir():
        missing = [pattern for pattern in needs if not list(folder.glob(pattern))]
    if missing:
        what = "a file" if folder.is_file() else f"a folder without {', '.join(missing)}"
        raise ValueError(
            f"{folder}: not a checkpoint folder ({what}): it needs config.json, *.safetensors "
            "and tokenizer.json, as a Hugging Face model folder has them (.bin, .pth and .gguf "
            "weights: convert them with transformers' save_pretrained first)"
        )
    return folder


def load_model(folder, dtype: torch.dtype | str = torch.float32, device="cpu") -> Transformer:
    """Build a Transformer from a Hugging Face checkpoint folder.

    Built on the meta device, then filled shard by shard in the requested dtype with `assign=True`, so at
    most one shard is ever held twice. Every tensor name and shape is checked *before* any data is read;
    all problems are reported together. A truncated or corrupt safetensors file, and a weight that is NaN or
    inf, are one-line errors naming the file.
    """
    folder = check_folder(folder, needs=("config.json", "*.safetensors"))
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    args = ModelArgs.from_hf_config(read_json(folder / "config.json"), source=str(folder / "config.json"))
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if args.tie_word_embeddings:
        expected.pop("lm_head.weight")  # logits use model.embed_tokens.weight
    files = weight_files(folder)

    # Pass 1: names and shapes, from the safetensors headers only.
    found, unexpected, misshaped, ignored = set(), [], [], []
    for file, names in files.items():
        with open_safetensors(folder / file) as f:
            for name in names:
                tied_head = name == "lm_head.weight" and args.tie_word_embeddings
                if name.endswith("rotary_emb.inv_freq") or tied_head:
                    ignored.append(name)  # old checkpoints store the RoPE table; tied heads may be stored too
                elif name not in expected:
                    unexpected.append(f"{name} (in {file})")
                elif tuple(f.get_slice(name).get_shape()) != expected[name]:
                    shape = tuple(f.get_slice(name).get_shape())
                    misshaped.append(f"{name} (in {file}): {shape}, expected {expected[name]}")
                else:
                    found.add(name)
    missing = sorted(set(expected) - found)
    if args.tie_word_embeddings is False and "lm_head.weight" in missing:
        why = "lm_head.weight (tie_word_embeddings=false, so the head must be stored)"
        missing[missing.index("lm_head.weight")] = why
    if missing or unexpected or misshaped:
        lines = [f"{folder}: checkpoint does not match its config.json ({args.model_type})"]
        for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                more = " ..." if len(items) > 20 else ""
                lines.append(f"  {what} ({len(items)}): " + "; ".join(items[:20]) + more)
        raise ValueError("\n".join(lines))

    # Pass 2: the data, one shard at a time, cast to dtype on the target device.
    for file, names in files.items():
        shard = {}
        with open_safetensors(folder / file, device) as f:
            for name in names:
                if name in found:
                    shard[name] = f.get_tensor(name).to(dtype)
            _check_finite_shard(shard, folder / file, f)
        model.load_state_dict(shard, strict=False, assign=True)
        del shard
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True breaks the tie: restore it
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    assert not meta, f"{folder}: parameters left on the meta device: {meta}"
    model.source = str(folder)
    return model.eval()


def save_model(
    model: Transformer, out_dir, tokenizer_from=None, max_shard_bytes: int = 2 * 1024**3, overwrite=False
):
    """Write a Hugging Face folder that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    config.json, generation_config.json, safetensors (sharded with an index above `max_shard_bytes`), and the
    tokenizer files copied from `tokenizer_from`. Written to a temporary folder and renamed when complete.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.args.tie_word_embeddings:
        state.pop("lm_head.weight")  # stored once, as the embedding (HF convention)
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, tmp / fname, metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        with open(tmp / "model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

    dtype = model.lm_head.weight.dtype
    with open(tmp / "config.json", "w") as f:
        json.dump(model.args.to_hf_config(dtype), f, indent=2)
    src = Path(tokenizer_from) if tokenizer_from else None
    tokenizer_files = (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "generation_config.json",
    )
    for name in tokenizer_files:
        if src is not None and (src / name).exists():
            shutil.copy(src / name, tmp / name)
    if not (tmp / "generation_config.json").exists():
        gen = {"bos_token_id": model.args.bos_token_id, "eos_token_id": model.args.eos_token_id}
        with open(tmp / "generation_config.json", "w") as f:
            json.dump(gen, f, indent=2)

    if out_dir.exists():  # overwrite: move the old folder aside only once the new one is complete
        old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------
# 6. Tokenizer and chat format
# ----------------------------------------------------------------------------------------------
PLAIN_FORMAT_DOC = """Plain chat format, used when a checkpoint has no chat template (base models):
    each message renders as "{Role}: {content}\\n\\n" (Role = System / User / Assistant),
    the generation prompt is "Assistant:\\n", and a forced response prefix follows it directly (after the
    newline, as in ChatML, so the response tokenizes the same way in both formats);
    the tokenizer's own special tokens (e.g. Llama's BOS) are added by its post-processor."""


def _read_json_if_exists(path: Path) -> dict:
    return read_json(path) if path.exists() else {}


def _token_text(value):
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """tokenizer.json (via `tokenizers`) + the special ids and chat template of a checkpoint folder."""

    def __init__(self, folder):
        from tokenizers import Tokenizer as HFTokenizer

        folder = check_folder(folder, needs=("tokenizer.json",))
        self.folder = folder
        self.tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        tcfg = _read_json_if_exists(folder / "tokenizer_config.json")
        mcfg = _read_json_if_exists(folder / "config.json")
        gcfg = _read_json_if_exists(folder / "generation_config.json")
        self.special_tokens = {
            k: _token_text(tcfg[k])
            for k in ("bos_token", "eos_token", "unk_token", "pad_token")
            if tcfg.get(k) is not None
        }
        self.bos_id = self._id(self.special_tokens.get("bos_token"), mcfg.get("bos_token_id"))
        # Stop on any of: generation_config's eos list, config.json's, and the tokenizer's eos token.
        eos: list[int] = []
        tokenizer_eos = self._id(self.special_tokens.get("eos_token"))
        for value in (gcfg.get("eos_token_id"), mcfg.get("eos_token_id"), tokenizer_eos):
            for i in value if isinstance(value, list) else [value]:
                if i is not None and i not in eos:
                    eos.append(i)
        self.eos_ids = eos
        pad = self._id(
            self.special_tokens.get("pad_token"), mcfg.get("pad_token_id"), gcfg.get("pad_token_id")
        )
        self.pad_id = pad if pad is not None else (eos[0] if eos else 0)
        self.chat_template, self._compiled_template = None, None
        if (folder / "chat_template.jinja").exists():  # overrides tokenizer_config's key (newer saves)
            self.chat_template = (folder / "chat_template.jinja").read_text()
        elif isinstance(tcfg.get("chat_template"), str):
            self.chat_template = tcfg["chat_template"]
        elif isinstance(tcfg.get("chat_template"), list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in tcfg["chat_template"]}
            self.chat_template = named.get("default")

    @functools.cached_property
    def end_of_turn_id(self) -> int:
        """The token that closes an assistant turn in this checkpoint's chat format: the first special token
        the template renders after an assistant message (Llama 3: <|eot_id|>, ChatML: <|im_end|>), else the
        tokenizer's eos token. Not eos_ids[0]: Llama-3.1's generation_config lists <|end_of_text|> first.
        Rendered once per tokenizer (training asks for it for every example)."""
        if self.chat_template is not None:
            mark = "deepalign-end-of-turn-probe"
            turn = [{"role": "user", "content": "x"}, {"role": "assistant", "content": mark}]
            text = self.format_chat(turn, add_generation_prompt=False)
            specials = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
            after = self.encode(text[text.index(mark) + len(mark) :]) if mark in text else []
            for i in after:
                if i in specials:
                    return i
        eos = self._id(self.special_tokens.get("eos_token"))
        return eos if eos is not None else self.eos_ids[0]

    def _id(self, token, *fallbacks):
        if token is not None:
            i = self.tok.token_to_id(token)
            if i is not None:
                return i
        return next((f for f in fallbacks if f is not None and not isinstance(f, list)), None)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def format_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        prefill: str = "",
        plain: bool = False,
        **template_kwargs,
    ) -> str:
        """Render messages with the checkpoint's own chat template (or the plain format when it has none, or
        when `plain=True`), then append `prefill`, a forced start of the assistant's answer (the prefilling
        attack), right after the generation prompt."""
        if self.chat_template is None or plain:
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages)
            if add_generation_prompt:
                text += "Assistant:\n" + prefill
            return text
        if self._compiled_template is None:  # compile once per tokenizer
            self._compiled_template = _jinja_env().from_string(self.chat_template)
        # the variables transformers passes
        variables = {"tools": None, "documents": None, **self.special_tokens, **template_kwargs}
        text = self._compiled_template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )
        return text + prefill

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        prefill: str = "",
        plain: bool = False,
        **template_kwargs,
    ) -> list[int]:
        """Token ids of `format_chat(...)`, tokenized in one pass so BPE merges across the prefill boundary
        match what the model would see. A template renders its own BOS, so no special tokens are added;
        the plain format lets the tokenizer's post-processor add them."""
        text = self.format_chat(messages, add_generation_prompt, prefill, plain, **template_kwargs)
        return self.encode(text, add_special_tokens=self.chat_template is None or plain)

    def prompt_ids(
        self, prompt: str, prefill: str = "", system: str | None = None, plain: bool = False
    ) -> list[int]:
        """A single user turn (optionally after a system message), the generation prompt, and `prefill`."""
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": prompt})
        return self.encode_chat(messages, add_generation_prompt=True, prefill=prefill, plain=plain)

    def real_token_mask(self, vocab_size: int) -> torch.Tensor:
        """(V,) bool: ids that are real tokens. False for rows past the tokenizer (Qwen pads its embedding to
        151936/152064) and for special tokens (Llama 3's 250 reserved ones are untrained). Vocabulary-wide
        statistics such as base-favored tokens are restricted to these."""
        valid = torch.zeros(vocab_size, dtype=torch.bool)
        valid[: min(self.vocab_size, vocab_size)] = True
        for i, added in self.tok.get_added_tokens_decoder().items():
            if added.special and i < vocab_size:
                valid[i] = False
        return valid

    def same_vocabulary(self, other: "Tokenizer") -> bool:
        return self.tok.get_vocab(with_added_tokens=True) == other.tok.get_vocab(with_added_tokens=True)


def _jinja_env():
    """A sandboxed jinja2 environment with the helpers real chat templates call (as transformers provides)."""
    from datetime import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


# ----------------------------------------------------------------------------------------------
# 7. Logging, for the scripts
# ----------------------------------------------------------------------------------------------
def log(*a):
    """Progress and diagnostics go to stderr so stdout stays machine-readable."""
    print(*a, file=sys.stderr, flush=True)
