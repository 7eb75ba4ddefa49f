"""Hugging Face checkpoint folders in and out, with no transformers at run time (docs/model_notes.md says what
a folder holds):

    load_model(folder, dtype, device) -> model.Transformer   safetensors read shard by shard; every name and
                                                             shape checked before any data is read
    save_model(model, out_dir, tokenizer_from)               the same layout back: config.json, safetensors
                                                             (sharded above a size), the tokenizer's files

Everything that can be wrong with a folder (a missing file, a .gguf passed for a folder, a truncated or
corrupt safetensors file, a missing or misshaped tensor, NaN/inf weights or logits) is one error naming the
file and the fix; the commands call check_folder and check_finite_logits for the same.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from model import DTYPES, ModelArgs, Transformer


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
    found = check_weight_names(folder, files, expected, args)  # pass 1: the headers only
    for file, names in files.items():  # pass 2: the data, one shard at a time
        shard = read_shard(folder / file, [name for name in names if name in found], dtype, device)
        model.load_state_dict(shard, strict=False, assign=True)
        del shard
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True breaks the tie: restore it
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    assert not meta, f"{folder}: parameters left on the meta device: {meta}"
    model.source = str(folder)
    return model.eval()


def check_weight_names(folder: Path, files: dict, expected: dict, args: ModelArgs) -> set[str]:
    """The tensor names of `files` ({file: [names]}) that the model loads, checked against `expected`
    ({name: shape}) from the safetensors headers only; one error listing every missing, unexpected and
    misshaped tensor. Old checkpoints' RoPE tables and tied heads are ignored."""
    found, unexpected, misshaped = set(), [], []
    for file, names in files.items():
        with open_safetensors(folder / file) as f:
            for name in names:
                tied_head = name == "lm_head.weight" and args.tie_word_embeddings
                if name.endswith("rotary_emb.inv_freq") or tied_head:
                    continue  # old checkpoints store the RoPE table; tied heads may be stored too
                shape = tuple(f.get_slice(name).get_shape()) if name in expected else None
                if name not in expected:
                    unexpected.append(f"{name} (in {file})")
                elif shape != expected[name]:
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
    return found


def read_shard(path: Path, names: list[str], dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """{name: tensor} of one safetensors file's `names`, cast to dtype on `device`; NaN/inf is an error."""
    shard = {}
    with open_safetensors(path, device) as f:
        for name in names:
            shard[name] = f.get_tensor(name).to(dtype)
        _check_finite_shard(shard, path, f)
    return shard


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def save_model(
    model: Transformer, out_dir, tokenizer_from=None, max_shard_bytes: int = 2 * 1024**3, overwrite=False
):
    """Write a Hugging Face folder that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    config.json, generation_config.json, safetensors (sharded with an index above `max_shard_bytes`), and the
    tokenizer files copied from `tokenizer_from`. Written to a temporary folder and renamed when complete.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.args.tie_word_embeddings:
        state.pop("lm_head.weight")  # stored once, as the embedding (HF convention)
    write_weights(tmp, state, max_shard_bytes)
    write_json(tmp / "config.json", model.args.to_hf_config(model.lm_head.weight.dtype))
    src = Path(tokenizer_from) if tokenizer_from else None
    for name in TOKENIZER_FILES:
        if src is not None and (src / name).exists():
            shutil.copy(src / name, tmp / name)
    if not (tmp / "generation_config.json").exists():
        gen = {"bos_token_id": model.args.bos_token_id, "eos_token_id": model.args.eos_token_id}
        write_json(tmp / "generation_config.json", gen)
    if out_dir.exists():  # overwrite: move the old folder aside only once the new one is complete
        old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)
    return out_dir


def write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def write_weights(folder: Path, state: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """`state` as model.safetensors, or, above max_shard_bytes, as numbered shards in state order with a
    model.safetensors.index.json mapping each tensor to its file."""
    from safetensors.torch import save_file

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
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / fname, metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_json(
        folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )
