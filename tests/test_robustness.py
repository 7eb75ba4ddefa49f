"""Bad checkpoints on disk: truncated or garbled safetensors files and NaN/inf weights, written for real (a
transformers checkpoint, then cut or edited), each refused as one line that names the file and the fix, by
model.load_model and by a command through cli.run (`error: ...`, no traceback)."""

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_hf_checkpoint, write_tokenizer
from safetensors.torch import load_file, save_file

import decode
from infra import cli
from infra import hf as H

ROOT = Path(__file__).resolve().parents[1]
NAN_WEIGHT = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A random Llama saved by transformers in 100 KB shards, with a ChatML tokenizer (ids < vocab)."""
    folder = make_hf_checkpoint("llama", tmp_path_factory.mktemp("robust") / "sharded")
    return write_tokenizer(folder, "chatml")


@pytest.fixture(scope="module")
def single(sharded, tmp_path_factory):
    """The same model as one model.safetensors (our save_model), with the tokenizer."""
    out = tmp_path_factory.mktemp("robust_single") / "single"
    return H.save_model(H.load_model(sharded), out, tokenizer_from=sharded)


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "broken"))


def header_size(path: Path) -> int:
    """The length of a safetensors file's JSON header (its first 8 bytes, little-endian)."""
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def one_line_error(load, path: Path, *phrases: str) -> str:
    """The ValueError `load()` raises: one line, starting with `path`, holding every phrase."""
    with pytest.raises(ValueError) as e:
        load()
    message = str(e.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    for phrase in phrases:
        assert phrase in message, message
    return message


CUTS = {  # where a download stopped: byte offsets from the header's size n and the file's size
    "inside the length prefix": lambda n, size: 4,
    "inside the header": lambda n, size: 8 + n // 2,
    "right after the header": lambda n, size: 8 + n,
    "inside the data": lambda n, size: (8 + n + size) // 2,
    "one byte short": lambda n, size: size - 1,
}


@pytest.mark.parametrize("cut", CUTS)
def test_truncated_single_file_is_one_line_naming_it(single, tmp_path, cut):
    folder = copy_of(single, tmp_path)
    path = folder / "model.safetensors"
    truncate(path, CUTS[cut](header_size(path), path.stat().st_size))
    message = one_line_error(lambda: H.load_model(folder), path, "truncated or corrupt safetensors file")
    assert message.endswith("; re-download or re-save the checkpoint")


@pytest.mark.parametrize("cut", ["inside the header", "inside the data"])
def test_truncated_shard_is_named(sharded, tmp_path, cut):
    """A sharded checkpoint: the shard that is cut is the one named (the index and the other shards are
    fine)."""
    folder = copy_of(sharded, tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    path = folder / index["weight_map"][NAN_WEIGHT]
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    truncate(path, CUTS[cut](header_size(path), path.stat().st_size))
    one_line_error(lambda: H.load_model(folder), path, "truncated or corrupt", "re-download or re-save")


def test_garbled_header_is_one_line(single, tmp_path):
    """Bytes of the JSON header overwritten (not UTF-8, then not JSON): corrupt, the same one line."""
    folder = copy_of(single, tmp_path)
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    for garbage in (b"\xff\xfe", b"}}"):
        data[12 : 12 + len(garbage)] = garbage
        path.write_bytes(bytes(data))
        one_line_error(lambda: H.load_model(folder), path, "truncated or corrupt", "re-download or re-save")


def edit_weights(path: Path, edit) -> None:
    """Rewrite one safetensors file with `edit(state_dict)` applied (safetensors' own save_file)."""
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def set_values(name: str, value: float, count: int = 1):
    def edit(tensors):
        tensors[name].view(-1)[:count] = value

    return edit


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_nan_weight_is_named_with_its_count(single, tmp_path, dtype):
    folder = copy_of(single, tmp_path)
    path = folder / "model.safetensors"
    edit_weights(path, set_values(NAN_WEIGHT, float("nan")))
    message = one_line_error(lambda: H.load_model(folder, dtype=dtype), path, f"{NAN_WEIGHT} (1 entry)")
    assert message == (
        f"{path}: NaN/inf weights: {NAN_WEIGHT} (1 entry); the file is corrupt: re-download or re-save the "
        "checkpoint"
    )


def test_nan_and_inf_in_a_shard_name_every_tensor(sharded, tmp_path):
    folder = copy_of(sharded, tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    path = folder / index["weight_map"][NAN_WEIGHT]
    other = next(n for n, f in index["weight_map"].items() if f == path.name and n != NAN_WEIGHT)
    edit_weights(path, set_values(NAN_WEIGHT, float("nan"), count=3))
    edit_weights(path, set_values(other, float("-inf")))
    one_line_error(
        lambda: H.load_model(folder), path, f"{NAN_WEIGHT} (3 entries)", f"{other} (1 entry)", "re-download"
    )


def test_float16_overflow_is_told_apart_from_a_corrupt_file(single, tmp_path):
    """A finite weight too large for float16 loads in float32, and in float16 is an overflow, not a corrupt
    file: the fix is another dtype."""
    folder = copy_of(single, tmp_path)
    path = folder / "model.safetensors"
    edit_weights(path, set_values(NAN_WEIGHT, 1e6, count=2))
    H.load_model(folder)  # finite in float32
    one_line_error(
        lambda: H.load_model(folder, dtype="float16"),
        path,
        f"weights overflow to inf in float16: {NAN_WEIGHT} (2 entries)",
        "load the checkpoint in bfloat16 or float32 (--dtype)",
    )


def test_check_finite_logits():
    logits = torch.randn(2, 3, 7)
    H.check_finite_logits(logits, "ckpt")  # finite: nothing
    logits[1, 2, 4], logits[0, 0, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError) as e:
        H.check_finite_logits(logits, "some/ckpt")
    assert str(e.value) == (
        "some/ckpt: 2 of 42 logits are NaN/inf (float32); the weights are corrupt (re-download or re-save "
        "the checkpoint)"
    )
    with pytest.raises(ValueError, match=r"^x: 2 of 42 .* or float16 overflows \(use --dtype bfloat16"):
        H.check_finite_logits(logits.half(), "x")


def test_decode_command_prints_one_error_line_for_a_truncated_checkpoint(single, tmp_path):
    folder = copy_of(single, tmp_path)
    path = folder / "model.safetensors"
    truncate(path, (8 + header_size(path) + path.stat().st_size) // 2)
    command = [sys.executable, str(ROOT / "decode.py"), "--model", str(folder), "--prompt", "hi"]
    res = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 2 and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith(f"error: {path}: truncated or corrupt safetensors file (")


def test_cli_run_prints_one_error_line_for_a_nan_weight(single, tmp_path, capsys):
    folder = copy_of(single, tmp_path)
    edit_weights(folder / "model.safetensors", set_values(NAN_WEIGHT, float("nan")))
    with pytest.raises(SystemExit) as e:
        cli.run(decode.main, ["--model", str(folder), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {folder / 'model.safetensors'}: NaN/inf weights: {NAN_WEIGHT} (1 entry)")
