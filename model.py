"""A hand-written Llama / Qwen2 / Qwen3 that loads Hugging Face checkpoints directly.

Read top to bottom:
    1. ModelArgs       the config dataclass, parsed from a checkpoint's config.json
    2. RMSNorm, rotary embedding, Attention (grouped-query), FeedForward (SwiGLU), Block, Transformer
    3. KV cache        a static, preallocated cache (gpt-fast style) that torch.compile likes
    4. load / save     safetensors in and out, no transformers at run time
    5. Tokenizer       tokenizers' tokenizer.json, special ids, the checkpoint's own chat template
    6. generate        batched, left-padded, greedy or temperature/top-p, stops per row on any eos id

The module tree and parameter names mirror Hugging Face's exactly (`model.layers.0.self_attn.q_proj`,
...), so a checkpoint loads with `strict=True` and no rename table. Every numerical detail that decides
whether our logits equal transformers' (RMSNorm order, RoPE layout, Llama-3 frequency scaling, Qwen2
biases, Qwen3 q/k norms, tied embeddings) is annotated where it happens; see ../shared/MODEL_NOTES.md.

Shapes: B batch, T new tokens, S cache length, d hidden size, H query heads, Hkv key/value heads,
hd head dim, I MLP width, V vocabulary.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
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
            raise ValueError(f"{source}: model_type={mt!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: hidden_act={act!r} is not supported; only 'silu' (SwiGLU) is")
        if cfg.get("use_sliding_window", False):
            raise ValueError(
                f"{source}: use_sliding_window=true (sliding_window={cfg.get('sliding_window')}) is not supported; "
                "released Qwen2.5/Qwen3 checkpoints have it false. Set it to false only if the model was trained without it."
            )
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
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
        """The config.json that transformers reads back as the same model (4.x key spelling, which 5.x also reads)."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[self.model_type]
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
# 2. The network
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
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))  # (hd/2,)
    s = args.rope_scaling
    if s is None:
        return inv_freq
    f, lo, hi, L = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
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


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        H, Hkv, hd, d = args.n_heads, args.n_kv_heads, args.head_dim, args.dim
        self.q_proj = nn.Linear(d, H * hd, bias=args.attention_bias)  # H*hd may differ from d (Qwen3)
        self.k_proj = nn.Linear(d, Hkv * hd, bias=args.attention_bias)
        self.v_proj = nn.Linear(d, Hkv * hd, bias=args.attention_bias)
        # Qwen2 has biases on q/k/v only; Llama's attention_bias also covers o_proj.
        self.o_proj = nn.Linear(H * hd, d, bias=args.attention_bias and args.model_type == "llama")
        if args.qk_norm:  # Qwen3: RMSNorm over each head's hd features of q and k, before RoPE
            self.q_norm = RMSNorm(hd, args.norm_eps)
            self.k_norm = RMSNorm(hd, args.norm_eps)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, cache_pos=None):
        """x (B, T, d); mask None (plain causal) or bool (B, 1, T, S); cache_pos (T,) cache slots to write."""
        B, T, _ = x.shape
        H, Hkv, hd = self.args.n_heads, self.args.n_kv_heads, self.args.head_dim
        q = self.q_proj(x).view(B, T, H, hd)  # (B, T, H, hd)
        k = self.k_proj(x).view(B, T, Hkv, hd)
        v = self.v_proj(x).view(B, T, Hkv, hd)
        if self.args.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|Hkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_pos is not None:  # decoding: write this step into the static cache, attend over all of it
            k, v = self.kv_cache.update(cache_pos, k, v)  # (B, Hkv, S, hd)
        # GQA: query head h reads kv head h // (H / Hkv) (enable_gqa; never materialise repeated k/v).
        # mask None (unpadded, no cache) is the same SDPA call HF makes, so logits match bit for bit.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=hd**-0.5,
                                           enable_gqa=H != Hkv)
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
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, cos, sin, mask, cache_pos=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_pos)  # pre-norm residual
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    """Holds what HF calls `model.*` so parameter names match the checkpoint."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)  # no sqrt(d) scaling for Llama/Qwen
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.key_valid: torch.Tensor | None = None  # (B, S) bool, which cache slots hold real tokens
        self.checkpointing = False  # activation checkpointing per block (training big models)

    def forward(self, idx, attention_mask=None, positions=None, cache_pos=None, logits_at=None):
        """Logits (B, T, V) in the model dtype (upcast yourself before log_softmax/KL).

        idx (B, T) token ids. attention_mask (B, T) 1 = real token, 0 = padding (left padding is the norm
        for generation; any padding works). positions (B, T) RoPE positions; default: count of real tokens
        before each one (cumsum(mask) - 1), as HF `generate` does for left padding.
        With a KV cache (`setup_cache`), cache_pos (T,) says which cache slots these tokens fill; the mask
        then covers the whole cache.
        logits_at: compute logits only at these positions and return them as (N, V): a (B, T) bool mask or a
        (rows, cols) pair of index tensors. Teacher-forced statistics and losses need the few response positions
        only; the head's matmul and the (B, T, V) tensor (2 GB in bf16 at V = 128k, B*T = 8k) are skipped.
        """
        B, T = idx.shape
        if attention_mask is not None and positions is None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        if positions is None:
            start = 0 if cache_pos is None else cache_pos[0]
            positions = (torch.arange(T, device=idx.device) + start).expand(B, T)
        mask = self._attention_mask(attention_mask, cache_pos, B, T, idx.device)
        x = self.model.embed_tokens(idx)  # (B, T, d)
        cos, sin = rope_cos_sin(rope_inv_freq(self.args, idx.device), positions, x.dtype)  # (B, T, hd)
        for layer in self.model.layers:
            if self.checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache_pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache_pos)
        if logits_at is not None:
            x = x[logits_at]  # (N, d): RMSNorm and the head act on each position alone
        return self.lm_head(self.model.norm(x))  # (B, T, V), or (N, V) with logits_at

    def _attention_mask(self, attention_mask, cache_pos, B, T, device):
        """None for the plain causal case (lets SDPA take its fastest path, as HF does); else bool (B, 1, T, S)."""
        if cache_pos is None:
            if attention_mask is None or bool(attention_mask.all()):
                return None
            key_valid, q_slot, S = attention_mask.bool(), torch.arange(T, device=device), T
        else:
            valid = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
            self.key_valid.index_copy_(1, cache_pos, valid)  # remember which slots are padding
            key_valid, q_slot, S = self.key_valid, cache_pos, self.key_valid.shape[1]
        k_slot = torch.arange(S, device=device)
        causal = k_slot[None, :] <= q_slot[:, None]  # (T, S)
        mask = causal[None] & key_valid[:, None, :]  # (B, T, S)
        # A padding query row would see no key at all (NaN in softmax); let it see itself. Its output is never used.
        mask = mask | (k_slot[None, :] == q_slot[:, None])[None]
        return mask[:, None]  # (B, 1, T, S)

    def setup_cache(self, batch_size: int, max_seq_len: int):
        """Preallocate a static KV cache in every layer (fixed shapes: no reallocation while decoding). A cache
        kept from an earlier call is reused when it has this batch size and at least max_seq_len slots (as
        gpt-fast does): compiled decoding then sees the same shapes and buffers again, so neither recompiles nor
        re-records its CUDA graphs. Slots past the current position are masked, so stale entries are never read."""
        p = self.lm_head.weight
        kept = self.model.layers[0].self_attn.kv_cache
        if kept is not None and kept.k.shape[0] == batch_size and kept.k.shape[2] >= max_seq_len \
                and kept.k.dtype == p.dtype and kept.k.device == p.device and self.key_valid.device == p.device:
            self.key_valid.zero_()
            return
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, self.args.n_kv_heads, max_seq_len, self.args.head_dim, p.dtype, p.device)
        self.key_valid = torch.zeros(batch_size, max_seq_len, dtype=torch.bool, device=p.device)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None
        self.key_valid = None


# ----------------------------------------------------------------------------------------------
# 3. Static KV cache
# ----------------------------------------------------------------------------------------------
class KVCache(nn.Module):
    def __init__(self, B, Hkv, S, hd, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(B, Hkv, S, hd, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(B, Hkv, S, hd, dtype=dtype, device=device), persistent=False)

    def update(self, cache_pos, k, v):
        """Write k, v (B, Hkv, T, hd) at slots cache_pos (T,); return the whole cache (B, Hkv, S, hd)."""
        self.k.index_copy_(2, cache_pos, k)
        self.v.index_copy_(2, cache_pos, v)
        return self.k, self.v


# ----------------------------------------------------------------------------------------------
# 4. Loading and saving Hugging Face folders
# ----------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def weight_files(folder: Path) -> dict[str, list[str]]:
    """{file name: [tensor names]}: from model.safetensors.index.json's weight_map when sharded, else model.safetensors."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object; expected {{'weight_map': {{tensor name: file}}}}")
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
    with safe_open(single, framework="pt") as f:
        return {"model.safetensors": list(f.keys())}


def load_model(folder, dtype: torch.dtype | str = torch.float32, device="cpu") -> Transformer:
    """Build a Transformer from a Hugging Face checkpoint folder.

    Built on the meta device, then filled shard by shard in the requested dtype with `assign=True`, so at
    most one shard is ever held twice. Every tensor name and shape is checked *before* any data is read;
    all problems are reported together.
    """
    from safetensors import safe_open

    folder = Path(folder)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: no config.json; pass a Hugging Face checkpoint folder")
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
        with safe_open(folder / file, framework="pt") as f:
            for name in names:
                if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and args.tie_word_embeddings):
                    ignored.append(name)  # old checkpoints store the RoPE table; tied heads may be stored too
                elif name not in expected:
                    unexpected.append(f"{name} (in {file})")
                elif tuple(f.get_slice(name).get_shape()) != expected[name]:
                    misshaped.append(f"{name} (in {file}): {tuple(f.get_slice(name).get_shape())}, expected {expected[name]}")
                else:
                    found.add(name)
    missing = sorted(set(expected) - found)
    if args.tie_word_embeddings is False and "lm_head.weight" in missing:
        missing[missing.index("lm_head.weight")] = "lm_head.weight (tie_word_embeddings=false, so the head must be stored)"
    if missing or unexpected or misshaped:
        lines = [f"{folder}: checkpoint does not match its config.json ({args.model_type})"]
        for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                lines.append(f"  {what} ({len(items)}): " + "; ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise ValueError("\n".join(lines))

    # Pass 2: the data, one shard at a time, cast to dtype on the target device.
    for file, names in files.items():
        shard = {}
        with safe_open(folder / file, framework="pt", device=str(device)) as f:
            for name in names:
                if name in found:
                    shard[name] = f.get_tensor(name).to(dtype)
        model.load_state_dict(shard, strict=False, assign=True)
        del shard
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True breaks the tie: restore it
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    assert not meta, f"{folder}: parameters left on the meta device: {meta}"
    return model.eval()


def save_model(model: Transformer, out_dir, tokenizer_from=None, max_shard_bytes: int = 2 * 1024**3, overwrite=False):
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
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json"):
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
# 5. Tokenizer and chat format
# ----------------------------------------------------------------------------------------------
PLAIN_FORMAT_DOC = """Plain chat format, used when a checkpoint has no chat template (base models):
    each message renders as "{Role}: {content}\\n\\n" (Role = System / User / Assistant),
    the generation prompt is "Assistant:\\n", and a forced response prefix follows it directly (after the
    newline, as in ChatML, so the response tokenizes the same way in both formats);
    the tokenizer's own special tokens (e.g. Llama's BOS) are added by its post-processor."""


def _token_text(value):
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """tokenizer.json (via `tokenizers`) + the special ids and chat template of a checkpoint folder."""

    def __init__(self, folder):
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        if not (folder / "tokenizer.json").exists():
            raise FileNotFoundError(f"{folder}: no tokenizer.json (deepalign reads fast-tokenizer files only)")
        self.folder = folder
        self.tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        tcfg = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").exists() else {}
        mcfg = read_json(folder / "config.json") if (folder / "config.json").exists() else {}
        gcfg = read_json(folder / "generation_config.json") if (folder / "generation_config.json").exists() else {}
        self.special_tokens = {
            k: _token_text(tcfg[k]) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if tcfg.get(k) is not None
        }
        self.bos_id = self._id(self.special_tokens.get("bos_token"), mcfg.get("bos_token_id"))
        # Stop on any of: generation_config's eos list, config.json's, and the tokenizer's eos token.
        eos: list[int] = []
        for value in (gcfg.get("eos_token_id"), mcfg.get("eos_token_id"), self._id(self.special_tokens.get("eos_token"))):
            for i in value if isinstance(value, list) else [value]:
                if i is not None and i not in eos:
                    eos.append(i)
        self.eos_ids = eos
        pad = self._id(self.special_tokens.get("pad_token"), mcfg.get("pad_token_id"), gcfg.get("pad_token_id"))
        self.pad_id = pad if pad is not None else (eos[0] if eos else 0)
        self.chat_template, self._compiled_template = None, None
        if (folder / "chat_template.jinja").exists():  # overrides tokenizer_config's key (newer saves)
            self.chat_template = (folder / "chat_template.jinja").read_text()
        elif isinstance(tcfg.get("chat_template"), str):
            self.chat_template = tcfg["chat_template"]
        elif isinstance(tcfg.get("chat_template"), list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in tcfg["chat_template"]}
            self.chat_template = named.get("default")

    @property
    def end_of_turn_id(self) -> int:
        """The token that closes an assistant turn in this checkpoint's chat format: the first special token the
        template renders after an assistant message (Llama 3: <|eot_id|>, ChatML: <|im_end|>), else the
        tokenizer's eos token. Not eos_ids[0]: Llama-3.1's generation_config lists <|end_of_text|> first."""
        if self.chat_template is not None:
            mark = "deepalign-end-of-turn-probe"
            text = self.format_chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": mark}],
                                    add_generation_prompt=False)
            specials = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
            after = self.encode(text[text.index(mark) + len(mark):]) if mark in text else []
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

    def format_chat(self, messages: list[dict], add_generation_prompt: bool = True, prefill: str = "",
                    plain: bool = False, **template_kwargs) -> str:
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
        variables = {"tools": None, "documents": None, **self.special_tokens, **template_kwargs}  # as transformers passes
        text = self._compiled_template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        return text + prefill

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, prefill: str = "",
                    plain: bool = False, **template_kwargs) -> list[int]:
        """Token ids of `format_chat(...)`, tokenized in one pass so BPE merges across the prefill boundary
        match what the model would see. A template renders its own BOS, so no special tokens are added;
        the plain format lets the tokenizer's post-processor add them."""
        text = self.format_chat(messages, add_generation_prompt, prefill, plain, **template_kwargs)
        return self.encode(text, add_special_tokens=self.chat_template is None or plain)

    def prompt_ids(self, prompt: str, prefill: str = "", system: str | None = None, plain: bool = False) -> list[int]:
        """A single user turn (optionally after a system message), the generation prompt, and `prefill`."""
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": prompt}]
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

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


# ----------------------------------------------------------------------------------------------
# 6. Generation
# ----------------------------------------------------------------------------------------------
def left_pad(seqs: list[list[int]], pad_id: int, device="cpu"):
    """Token lists -> ids (B, T) left-padded with pad_id, and attention mask (B, T) with 1 on real tokens."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s) :] = torch.tensor(s)
            mask[i, T - len(s) :] = 1
    return ids.to(device), mask.to(device)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator=None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy (argmax); else softmax(logits/T) truncated
    to the smallest set of tokens whose probability reaches top_p (nucleus sampling)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # tokens after the nucleus is already full
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decode_step(model: Transformer, token: torch.Tensor, cache_pos: torch.Tensor, positions: torch.Tensor):
    """One token per row through the cache: token (B, 1), cache_pos (1,), positions (B, 1) -> logits (B, V).
    This is the function `--compile` compiles (fixed shapes, no host syncs)."""
    return model(token, positions=positions, cache_pos=cache_pos)[:, -1]


_compiled_steps: dict = {}


def get_decode_step(compile: bool = False):
    """The decode step, compiled once per process if asked (fullgraph=True: a graph break is an error)."""
    if not compile:
        return decode_step
    if "step" not in _compiled_steps:
        mode = "reduce-overhead" if torch.cuda.is_available() else None  # CUDA graphs only pay off on a GPU
        _compiled_steps["step"] = torch.compile(decode_step, fullgraph=True, mode=mode)
    return _compiled_steps["step"]


@contextmanager
def kv_caches(models, batch_size: int, max_seq_len: int, keep: bool = False):
    """Static KV caches for one decoding loop over `models`: set up on entry, freed on exit unless `keep`
    (compiled decoding keeps them for its next call: same shapes and buffers, see Transformer.setup_cache)."""
    for m in models:
        m.setup_cache(batch_size, max_seq_len)
    try:
        yield
    finally:
        if not keep:
            for m in models:
                m.clear_cache()


def decoding_inputs(prompts: list[list[int]], pad_id: int, eos_ids, seed, device):
    """What every decoding loop starts from: left-padded ids and mask (B, T), RoPE positions that skip the
    padding (B, T), the sampling generator (None: unseeded), and the stop ids as a tensor."""
    ids, mask = left_pad(prompts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    eos = torch.tensor(list(eos_ids) or [-1], device=device)
    return ids, mask, positions, generator, eos


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
    eos_ids=(),
    pad_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """Batched generation with a static KV cache. Prompts are left-padded; each row stops at its first eos id
    (which is kept in its output). Returns the new token ids of each row."""
    ids, mask, positions, generator, eos = decoding_inputs(prompts, pad_id, eos_ids, seed, model.lm_head.weight.device)
    B, T = ids.shape
    device = ids.device
    step = get_decode_step(compile)

    with kv_caches([model], B, T + max_new_tokens, keep=compile):
        logits = model(ids, attention_mask=mask, positions=positions, cache_pos=torch.arange(T, device=device))[:, -1]
        pos = positions[:, -1:]  # (B, 1)
        out, done = [], torch.zeros(B, dtype=torch.bool, device=device)
        for i in range(max_new_tokens):
            token = sample_next(logits.float(), temperature, top_p, generator)  # (B,)
            token = torch.where(done, pad_id, token)
            out.append(token)
            done = done | torch.isin(token, eos)
            if i == max_new_tokens - 1 or bool(done.all()):
                break
            pos = pos + 1
            logits = step(model, token[:, None], torch.tensor([T + i], device=device), pos).clone()
    tokens = torch.stack(out, dim=1).tolist()  # (B, n)
    return [cut_at_eos(row, set(eos_ids)) for row in tokens]


def cut_at_eos(row: list[int], eos: set) -> list[int]:
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1]
    return row


def generate_text(model, tok: Tokenizer, prompts: list[str], prefill: str = "", **kw) -> list[str]:
    """Chat-format each prompt (optionally with a forced response prefix), generate, decode the completions."""
    ids = [tok.prompt_ids(p, prefill=prefill) for p in prompts]
    outs = generate(model, ids, eos_ids=tok.eos_ids, pad_id=tok.pad_id, **kw)
    return [tok.decode(o) for o in outs]


def log(*a):
    """Progress and diagnostics go to stderr so stdout stays machine-readable."""
    print(*a, file=sys.stderr, flush=True)
