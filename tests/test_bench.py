"""bench.py: the GPU suite's code paths on CPU with tiny stand-in shapes, and the weight-byte arithmetic
behind every decode limit, checked against the published parameter counts of the real checkpoints."""

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments import bench
from model import Transformer

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "shape, n_params, embedding",
    [
        ("llama3.1-8b", 8_030_261_248, 128256 * 4096),  # Meta-Llama-3.1-8B's safetensors metadata
        ("qwen3-8b", 8_190_735_360, 151936 * 4096),  # Qwen3-8B
        ("llama3.2-1b", 1_235_814_400, 0),  # Llama-3.2-1B: tied, so the embedding is read whole as the head
    ],
)
def test_real_shapes_have_the_published_parameter_counts(shape, n_params, embedding):
    with torch.device("meta"):
        model = Transformer(bench.shape_args(shape, argparse.Namespace(tiny=False))).to(torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert bench.weight_bytes(model) == 2 * (n_params - embedding)


def test_random_model_is_initialised_and_tied():
    margs = bench.shape_args("llama3.2-1b", argparse.Namespace(tiny=True))
    tied = bench.random_model(dataclasses.replace(margs, tie_word_embeddings=True), torch.float32, "cpu")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    w = tied.model.layers[0].mlp.up_proj.weight
    assert abs(w.std().item() - 0.02) < 0.002 and torch.equal(
        tied.model.norm.weight, torch.ones_like(tied.model.norm.weight)
    )
    with torch.no_grad():
        assert torch.isfinite(tied(torch.tensor([[1, 2, 3]]))).all()


def test_gpu_suite_runs_on_cpu_with_tiny_shapes(tmp_path):
    out = tmp_path / "gpu.json"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.bench",
            "--gpu",
            "--tiny",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--max-batch",
            "2",
            "--seq-len",
            "48",
            "--new-tokens",
            "8",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["suite"] == "gpu" and result["tiny"] is True
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == set(bench.GPU_MEASUREMENTS), res.stderr[-3000:]  # no row failed
    for r in rows.values():
        assert r["ours"] > 0 and r["reference"] > 0
        assert r["ratio"] == pytest.approx(r["ours"] / r["reference"])
        assert r["peak_mb"] > 0
    for name in ("train targeted lora16 llama3.1-8b", "train targeted full llama3.2-1b"):
        row = rows[name]
        assert row["largest_batch"] == 2 and row["fits_up_to_max_batch"] and row["seq_len"] == 48
    assert rows["decode b1 qwen3-8b"]["fraction_of_bandwidth_limit"] == rows["decode b1 qwen3-8b"]["ratio"]
    assert "| train targeted full llama3.2-1b |" in res.stdout
