"""Shared fixtures: tiny random checkpoints written by `transformers` as real (sharded) safetensors folders.

transformers is the *reference* here; deepalign never imports it at run time.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("llama", "llama3_rope", "qwen2_tied_bias", "qwen3")


def hf_config(variant: str):
    import transformers

    common = dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if variant == "llama":
        return transformers.LlamaConfig(**common, rope_theta=10000.0, rms_norm_eps=1e-5)
    if variant == "llama3_rope":
        # Llama 3.2-style frequency scaling (factor 32), small original context so that all three bands occur.
        scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64}
        return transformers.LlamaConfig(**common, rope_theta=500000.0, rms_norm_eps=1e-5, rope_scaling=scaling)
    if variant == "qwen2_tied_bias":
        return transformers.Qwen2Config(**common, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    if variant == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=32, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)
    raise KeyError(variant)


def make_hf_checkpoint(variant: str, folder: Path, seed: int = 0) -> Path:
    """Random HF model with sharp logits (std 0.3 weights) and noisy norms/biases, saved in shards."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(variant), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))  # norms and biases matter
            else:
                p.normal_(0.0, 0.3 if "embed" in name else 0.15)
    model.save_pretrained(folder, max_shard_size="100KB")
    return folder


@pytest.fixture(scope="session", params=VARIANTS)
def hf_checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, make_hf_checkpoint(request.param, folder)
