"""A training run's folder: created (or kept, to resume) by prepare_out; checkpoints written with
torch.distributed.checkpoint (each process its own shards; a resume may use any number of processes), holding
the float32 master weights, AdamW's state, the step and the run's configurations, which a resume must match;
the final model saved as a Hugging Face folder (a LoRA run's merged in float32, and its adapter), and the
model part-way through a run (OUT/step-N)."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from infra.cli import log
from infra.distributed import barrier, world_info
from infra.files import write_json_atomic
from infra.hf import load_model, save_model
from infra.lora import add_lora, merge_lora, save_adapter
from infra.optim import masters_to_params
from model import DTYPES

CHECKPOINT = "checkpoint"  # a folder inside the run folder


def as_json(configs: dict) -> dict:
    """{name: a config dataclass} as JSON values (tuples become lists)."""
    return json.loads(json.dumps({name: asdict(c) for name, c in configs.items()}))


def checkpoint_state(step, student, masters, opt, configs: dict) -> dict:
    """What a resumed run needs: the float32 masters by parameter name (under FSDP, each process's shards),
    AdamW's state, the step, and the configurations {name: config dataclass} (as JSON, compared on resume)."""
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    config = json.dumps({name: asdict(c) for name, c in configs.items()}, sort_keys=True)
    return {
        "step": step,
        "trainable": dict(zip(names, masters)),
        "optimizer": opt.state_dict(),
        "config": config,
    }


def save_checkpoint(path: Path, step, student, masters, opt, configs: dict):
    """Every process writes its own shards; written to a temporary folder that replaces `path` only when
    complete, so a kill mid-write leaves the previous checkpoint intact."""
    import torch.distributed.checkpoint as dcp

    rank, _ = world_info()
    tmp, old = path.with_name(f"{path.name}.tmp"), path.with_name(f"{path.name}.old")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    with warnings.catch_warnings():  # one process: dcp warns that it assumes so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(
            checkpoint_state(step, student, masters, opt, configs),
            checkpoint_id=tmp,
            no_dist=not dist.is_initialized(),
        )
    barrier()
    if rank == 0:
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def init_optimizer_state(opt):
    """Give AdamW its state tensors (zeros) by a step of lr 0 on zero gradients, which moves nothing:
    torch.distributed.checkpoint loads into existing tensors."""
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)


def load_checkpoint(path: Path, student, masters, opt, configs: dict, resumable=()) -> int:
    """Load the masters (into the weights too) and AdamW's state of the checkpoint at `path`, in place, and
    return its step. The run's configurations {name: config dataclass} must equal the checkpoint's in every
    field but those named in `resumable` (a field newer than the checkpoint: its default)."""
    import torch.distributed.checkpoint as dcp

    init_optimizer_state(opt)
    state = checkpoint_state(0, student, masters, opt, configs)
    state["config"] = ""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())  # masters and AdamW, in place
    saved = json.loads(state["config"])
    now, defaults = as_json(configs), as_json({name: type(c)() for name, c in configs.items()})
    for part in configs:
        for key, value in now[part].items():
            was = saved[part].get(key, defaults[part][key])
            if key not in resumable and was != value:
                raise ValueError(
                    f"{path}: the checkpoint has {key}={was!r} but this run "
                    f"has {value!r}; resume with the original settings or start over with "
                    "--overwrite"
                )
    masters_to_params([p for p in student.parameters() if p.requires_grad], masters)
    opt.load_state_dict(state["optimizer"])
    return state["step"]


def start_run(out: Path, resume: bool, model, masters, opt, configs: dict, resumable=()) -> int:
    """The step a run starts from: under --resume its checkpoint's (load_checkpoint; the log cut back to it),
    else 0. Process 0 writes the configurations {name: config dataclass} to out/train_config.json."""
    start, (rank, world) = 0, world_info()
    if resume and (out / CHECKPOINT).exists():
        start = load_checkpoint(out / CHECKPOINT, model, masters, opt, configs, resumable)
        if rank == 0:
            log(f"resumed from {out / CHECKPOINT} at step {start}")
    if rank == 0:
        keep_log_until(out / "train_log.jsonl", start)
        settings = {name: asdict(c) for name, c in configs.items()}
        write_json_atomic(out / "train_config.json", {**settings, "world_size": world})
    return start


def keep_log_until(log_file: Path, step: int):
    """Drop the log lines of steps after `step` (logged after the checkpoint a run resumes from)."""
    kept = []
    if step and log_file.exists():
        kept = [line for line in log_file.read_text().splitlines() if json.loads(line)["step"] <= step]
    log_file.write_text("".join(line + "\n" for line in kept))


def prepare_out(out: Path, resume: bool, overwrite: bool) -> Path:
    if out.exists() and any(out.iterdir()):
        if resume and (out / CHECKPOINT).exists():
            return out
        if resume:
            raise FileNotFoundError(
                f"{out} has no {CHECKPOINT}/ to resume (a finished run, or another "
                "folder); pass --overwrite to start it again"
            )
        if not overwrite:
            raise FileExistsError(
                f"{out} exists and is not empty; pass --overwrite to replace it, or "
                "--resume to continue its checkpoint"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_final(student, run, out: Path, rank: int, world: int):
    """Write the run folder as a Hugging Face folder (and, with LoRA, the adapter in PEFT's layout); `run` is
    train.RunConfig (aligned, dtype, lora_rank, lora_alpha, save_dtype). With FSDP, every process gathers the
    full weights (a collective) and process 0 writes them from an unsharded copy."""
    if world > 1:
        full = {n: p.full_tensor().cpu() for n, p in student.named_parameters()}
        if rank != 0:
            return
        student = load_model(run.aligned, DTYPES[run.dtype], "cpu")
        if run.lora_rank:
            add_lora(student, run.lora_rank, run.lora_alpha or 2 * run.lora_rank)
        params = dict(student.named_parameters())
        with torch.no_grad():
            for name, value in full.items():
                params[name].copy_(value)
    save_dtype = DTYPES[run.save_dtype or ("float32" if run.lora_rank else run.dtype)]
    if run.lora_rank:
        save_adapter(
            student, out / "adapter", run.lora_rank, run.lora_alpha or 2 * run.lora_rank, run.aligned
        )
        merge_lora(student, save_dtype)
    else:
        student.to(save_dtype)
    tmp = save_model(student, out / f"model.tmp-{os.getpid()}", tokenizer_from=run.aligned, overwrite=True)
    for f in tmp.iterdir():  # the run folder itself becomes the Hugging Face folder
        os.replace(f, out / f.name)
    tmp.rmdir()
    shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
    log(f"wrote {out}")


def save_snapshot(student, run, folder: Path, rank: int, world: int):
    """The model as it is after an intermediate step (--save-at), as a Hugging Face folder; full fine-tuning
    on one process only (a LoRA or FSDP student would need save_final's merge or gather)."""
    if run.lora_rank or world > 1:
        raise ValueError(
            "--save-at saves full fine-tuning runs on one process; leave out --lora-rank/torchrun"
        )
    if rank == 0:
        save_model(student, folder, tokenizer_from=run.aligned, overwrite=True)
