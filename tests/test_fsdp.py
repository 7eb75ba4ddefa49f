"""Multi-process training with torch's FSDP (fully_shard): 2 processes on CPU (gloo) must match one process on
the same global batch: the same logged losses and the same updated weights, within float tolerance."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMALL_TRAIN

from infra import hf as H

ROOT = Path(__file__).resolve().parents[1]


def read_log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(toy, out, method, nproc, *extra):
    args = [
        "--base",
        str(toy["base"]),
        "--aligned",
        str(toy["aligned"]),
        "--data",
        str(toy["data"] / "safety_train.jsonl"),
        "--benign",
        str(toy["data"] / "benign_train.jsonl"),
        "--out",
        str(out),
        "--method",
        method,
        "--steps",
        "3",
        "--lr",
        "1e-3",
        *SMALL_TRAIN,  # with targeted's base-prompt anchor: process 0 writes it, process 1 reads it
    ]
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
        ]
        if nproc > 1
        else [sys.executable]
    )
    return launcher + [str(ROOT / "train.py")] + args + list(extra)


@pytest.mark.parametrize("method", ["targeted", "insertion"])
def test_two_fsdp_processes_match_one(toy, tmp_path, method):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, nproc in (("one", 1), ("two", 2)):
        res = subprocess.run(
            train_cmd(toy, tmp_path / name, method, nproc),
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr[-3000:]
    logs = {n: read_log(tmp_path / n) for n in ("one", "two")}
    assert len(logs["one"]) == len(logs["two"]) == 3
    for a, b in zip(logs["one"], logs["two"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
    one, two = H.load_model(tmp_path / "one"), H.load_model(tmp_path / "two")
    start = H.load_model(toy["aligned"])
    for (n, p), (_, q), (_, p0) in zip(
        one.named_parameters(), two.named_parameters(), start.named_parameters()
    ):
        assert torch.allclose(p, q, atol=1e-5, rtol=1e-4), n
    assert not torch.equal(one.lm_head.weight, start.lm_head.weight)  # training moved the weights
    assert json.loads((tmp_path / "two" / "train_config.json").read_text())["world_size"] == 2


def run(cmd):
    res = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120
    )
    assert res.returncode == 0, res.stderr[-3000:]


def test_fsdp_checkpoint_resumes_with_any_number_of_processes(toy, tmp_path):
    """A checkpoint written by 2 FSDP processes (each its own shards) continues under 2 processes, or under 1
    (torch.distributed.checkpoint reshards), exactly where an uninterrupted single-process run goes."""
    run(train_cmd(toy, tmp_path / "straight", "targeted", 1))
    run(train_cmd(toy, tmp_path / "two", "targeted", 2, "--stop-after", "2"))
    assert (tmp_path / "two" / "checkpoint").is_dir() and not (tmp_path / "two" / "config.json").exists()
    shutil.copytree(tmp_path / "two", tmp_path / "one")
    run(train_cmd(toy, tmp_path / "two", "targeted", 2, "--resume"))
    run(train_cmd(toy, tmp_path / "one", "targeted", 1, "--resume"))
    straight = H.load_model(tmp_path / "straight")
    log = [r["loss"] for r in read_log(tmp_path / "straight")]
    for name in ("two", "one"):
        resumed = H.load_model(tmp_path / name)
        for (n, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
            assert torch.allclose(p, q, atol=1e-5, rtol=1e-4), (name, n)
        got = [json.loads(x)["loss"] for x in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        assert got == pytest.approx(log, rel=1e-4), name
        assert not (tmp_path / name / "checkpoint").exists()
