"""A hand-written Llama / Qwen2 / Qwen3 that loads Hugging Face checkpoints directly.

Read top to bottom:
    1. ModelArgs       the config dataclass, parsed from a checkpoint's config.json
    2. RMSNorm, rotary embedding (RoPE)
    3. KVCache         everything a model remembers while decoding, in one object; the attention masks
    4. Attention (grouped-query), FeedForward (SwiGLU), Block, Transformer
Loading and saving Hugging Face folders lives in infra/hf.py, the tokenizer and chat format in
infra/tokenizer.py, generation (left padding, sampling, the decoding loops) in decode.py.

The module tree and parameter names mirror Hugging Face's exactly (`model.layers.0.self_attn.q_proj`,
...), so a checkpoint loads with `strict=True` and no rename table. Every numerical detail that decides
whether our logits equal transformers' (RMSNorm order, RoPE layout, Llama-3 frequency scaling, Qwen2
biases, Qwen3 q/k norms, tied embeddings) is annotated where it happens; see docs/model_notes.md.

Shapes: B batch, T new tokens, S cache length, L layers, d hidden size, H query heads, Hkv key/value heads,
hd head dim, I MLP width, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
        x = x.float()  # (..., d) fp32
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., d)
        return self.weight * x.to(dtype)  # (..., d) in the model dtype


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
    wavelen = 2 * math.pi / inv_freq  # (hd/2,)
    scaled = torch.where(wavelen > L / lo, inv_freq / f, inv_freq)  # long wavelengths: divide by the factor
    smooth = (L / wavelen - lo) / (hi - lo)  # (hd/2,): 0 at the low edge of the band, 1 at the high
    smoothed = (1 - smooth) * scaled / f + smooth * scaled  # (hd/2,)
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
    return x * cos + rotated * sin  # (B, H, T, hd)


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
        return self.o_proj(y)  # (B, T, d)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, I, b = args.dim, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(d, I, bias=b)  # Meta's w1
        self.up_proj = nn.Linear(d, I, bias=b)  # w3
        self.down_proj = nn.Linear(I, d, bias=b)  # w2

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, d): SwiGLU


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, cos, sin, mask, cache=None, cache_pos=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_pos)  # pre-norm residual
        return h + self.mlp(self.post_attention_layernorm(h))  # (B, T, d)


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
        self.source = "the model"  # where it was loaded from (infra.hf.load_model): named in errors

    def forward(self, idx, attention_mask=None, positions=None, logits_at=None, cache_pos=None, embeds=None):
        """Logits (B, T, V) in the model dtype (upcast yourself before log_softmax/KL).

        idx (B, T) token ids. embeds (B, T, d): input embeddings used instead of embed_tokens(idx) (idx still
        gives the shape and device); gradient attacks (lab/attacks.py, GCG) differentiate through them.
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
