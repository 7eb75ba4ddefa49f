"""Targeted completion: fine-tune an aligned model so that safety holds at every response position.

    python train.py                                   # targeted completion on the seed-0 toy world
    python train.py --world data/worlds/seed-1 --method augment --out runs/seed-1/augment
    python train.py --base DIR --aligned DIR --data harmful.csv --benign benign.jsonl --out runs/x \\
                    --dtype bfloat16 --lora-rank 16 --checkpointing
    torchrun --nproc_per_node 4 train.py ...          # FSDP: every model sharded over 4 GPUs (or CPU
    processes)

The student S starts from the aligned model A; A and the base model B stay frozen and read exactly the
student's contexts. Methods (docs/method.md §5-§6), on the same data and in the same loop:
    targeted     dense harmful contexts and recovery contexts, the hybrid clean-context teacher, the adaptive
                 penalty on base-favored tokens, the utility anchor (deepalign.targeted_loss)
    sft          cross-entropy on a refusal to the bare harmful prompt (the shallow recipe)
    augment      Qi et al.'s augmentation: cross-entropy on (prompt, harmful prefix, recovery) + benign CE
    rto          DeRTa's transition optimisation: at every dense harmful context, the first recovery token
    constrained  Qi et al.'s token-wise constrained objective on harmful fine-tuning data (+ benign)
    insertion    worst-insertion training: a harmful span spliced into the model's own refusal, then recovery
    finetune     the attacker's fine-tuning (docs/method.md §7): plain cross-entropy on --data's answers
                 (harmful_response, or response), no anchor; eval.py --finetune-attack runs it

Data: harmful rows {"prompt", "harmful_response", "recovery"?} (--data, any layout of docs/method.md §9 with
harmful responses) and benign rows {"prompt", "response"?} (--benign). A row without a recovery gets the
aligned model's own refusal to its bare prompt (targeted's clean teacher always uses A's own refusal: §5
version 3), a benign row without a response the aligned model's own answer (as Qi et al. make their
anchors; --anchor own: every benign row's); both are generated once, cached in the run folder and reused on
--resume.
Each step draws its batches seeded by (seed, step), so a resumed run sees the batches an uninterrupted one
does.

Output (--out): a Hugging Face folder (with LoRA: the merge, done in float32) that eval.py, decode.py and
transformers load, and beside it train_log.jsonl (every loss term of every step), train_config.json, and with
LoRA the adapter in PEFT's layout (adapter/). checkpoint/ every --save-every steps; --resume continues it.

Read top to bottom:
    1. configuration              RunConfig (the run); deepalign.LossConfig (the objective)
    2. the training loop          train()
    3. one step's losses          step_losses(): each method's forwards, then deepalign's losses
    4. examples and batches       dense, recovery, clean and utility examples; Batch; make_batches
    5. data made by the aligned model
    -- plumbing --
    6. LoRA   7. float32 master weights   8. several processes (FSDP)   9. checkpoints   10. saving   11. CLI
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import deepalign as D
from data import toyworld as TW
from decode import generate
from infra import cli, formats
from infra.cli import log
from infra.files import read_jsonl, write_json_atomic, write_jsonl
from infra.hf import load_model, save_model
from infra.tokenizer import Tokenizer
from lab import judges
from model import DTYPES

METHODS = ("targeted", "sft", "augment", "rto", "constrained", "insertion", "finetune")


# ----------------------------------------------------------------------------------------------
# 1. Configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunConfig:
    """One training run: the method, the data, the optimisation and the hardware. The objective's own settings
    are deepalign.LossConfig. A resumed run must match its checkpoint in both (except the fields of
    RESUMABLE)."""

    method: str = "targeted"
    base: str = ""
    aligned: str = ""
    data: str = ""
    benign: str = ""
    # the utility anchor: "base-prompts" (the benign file plus prompts the base model writes, answered by A:
    # targeted's default, docs/development.md §6-7), "data" (the file's answers: the baselines' default, as
    # their authors anchor) or "own" (A's own answers to the file's prompts)
    anchor: str = "base-prompts"
    anchor_prompts: int = 2000  # --anchor base-prompts: prompts the base model writes, before filtering
    anchor_writer: str = "base"  # who writes them: "base", or "aligned" (Magpie's choice; real chat models)
    # a written prompt is dropped if A refuses it in its sampled or its greedy answer ("greedy too": A would
    # refuse it, though it answered by chance), or ("sampled") only in its sampled one
    anchor_check: str = "greedy too"
    anchor_exclude: tuple = ()  # prompt files whose prompts never enter the anchor (decontamination)
    out: str = "runs/targeted"
    steps: int = 150
    batch_size: int = 16  # harmful examples per step
    utility_batch_size: int = 16  # benign examples per step
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of the steps
    clip: float = 1.0
    seed: int = 0
    save_every: int = 50
    save_at: tuple = ()  # also save the model as out/step-N after each of these steps (budget curves)
    stop_after: int = 0  # stop (with a checkpoint) after this step; 0: run to the end
    insert_candidates: int = 4
    dtype: str = "float32"
    device: str = "cpu"
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 0.0  # 0: 2 * rank
    checkpointing: bool = False
    compile: bool = False
    save_dtype: str = ""  # dtype of the saved weights; "" keeps float32 for LoRA merges, else --dtype


# may differ between a run and its resume
RESUMABLE = ("out", "save_every", "save_at", "stop_after", "device", "compile")


# ----------------------------------------------------------------------------------------------
# 2. The training loop
# ----------------------------------------------------------------------------------------------
def train(run: RunConfig, loss_cfg: D.LossConfig, resume: bool = False, overwrite: bool = False) -> Path:
    rank, world = init_distributed(run)
    torch.manual_seed(run.seed)
    out = prepare_out(Path(run.out), resume, overwrite) if rank == 0 else Path(run.out)
    barrier()
    tok = Tokenizer(run.aligned)
    D.check_same_tokenizer(tok, Tokenizer(run.base))
    device = torch.device(run.device)
    student = load_model(run.aligned, DTYPES[run.dtype], device)
    own = run.method == "targeted" and loss_cfg.teacher == "clean"  # §5 v3: A's own refusals as recoveries
    base_writes = run.anchor == "base-prompts" and run.anchor_writer == "base" and run.method != "finetune"
    needs_base = run.method == "targeted" or base_writes
    base = load_model(run.base, DTYPES[run.dtype], device) if needs_base else None
    safety_rows, benign_rows = load_data(run, tok, student, out, rank, own_recoveries=own, base=base)
    base = base if run.method == "targeted" else None  # otherwise only the writer of the anchor's prompts
    if base is not None and base.args.vocab_size != student.args.vocab_size:
        raise ValueError(
            f"{run.base} has vocab_size {base.args.vocab_size} but {run.aligned} has "
            f"{student.args.vocab_size}; base and aligned must share one vocabulary"
        )
    if run.lora_rank:
        add_lora(student, run.lora_rank, run.lora_alpha or 2 * run.lora_rank)
    needs_aligned = run.method in ("targeted", "constrained")
    aligned = (
        FrozenAligned(
            student if run.lora_rank else load_model(run.aligned, DTYPES[run.dtype], device),
            adapters_off=bool(run.lora_rank),
        )
        if needs_aligned
        else None
    )
    for frozen in (base, aligned.model if aligned and not run.lora_rank else None):
        if frozen is not None:
            frozen.requires_grad_(False).eval()
    student.checkpointing = run.checkpointing
    valid = tok.real_token_mask(student.args.vocab_size).to(device)
    clean = run.method == "targeted" and D.uses_clean_teacher(loss_cfg)  # word_start: for its soft part only
    word_start = word_start_ids(tok, student.args.vocab_size).to(device) if clean else None
    own_answers = own_refusals(student, tok, safety_rows, rank) if run.method == "insertion" else {}
    if world > 1:  # FSDP: shard the student and the frozen models alike
        for m in (student, base, aligned.model if aligned and not run.lora_rank else None):
            if m is not None:
                shard(m)

    params = [p for p in student.parameters() if p.requires_grad]
    masters = fp32_masters(params)  # what AdamW updates: float32 copies of bf16 weights (else the params)
    opt = torch.optim.AdamW(masters, lr=run.lr, betas=(0.9, 0.95), weight_decay=run.weight_decay)
    start = 0
    if resume and (out / CHECKPOINT).exists():
        start = load_checkpoint(out / CHECKPOINT, student, masters, opt, run, loss_cfg)
        if rank == 0:
            log(f"resumed from {out / CHECKPOINT} at step {start}")
    if rank == 0:
        keep_log_until(out / "train_log.jsonl", start)
        write_json_atomic(
            out / "train_config.json", {"run": asdict(run), "loss": asdict(loss_cfg), "world_size": world}
        )
    model_fn = torch.compile(student, dynamic=True) if run.compile else student
    frozen = Frozen(base=base, aligned=aligned, valid=valid, word_start=word_start)

    student.train()
    bar = tqdm(
        range(start, run.steps),
        desc=f"train {run.method}",
        file=sys.stderr,
        initial=start,
        total=run.steps,
        mininterval=2.0,
        disable=rank > 0,
    )
    for step in bar:
        t0 = time.perf_counter()
        lr = get_lr(step, run)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        logged = {}
        for micro in range(run.grad_accum):
            batches = make_batches(
                step * run.grad_accum + micro,
                tok,
                safety_rows,
                benign_rows,
                own_answers,
                model_fn,
                run,
                loss_cfg,
                device,
                rank,
                world,
            )
            terms = step_losses(run.method, model_fn, frozen, batches, loss_cfg)
            check_finite(terms, step + 1)
            (terms["loss"] / run.grad_accum).backward()
            grads_to_masters(params, masters)
            names = list(terms)  # the global batch's value of each term (shares undone), in one all-reduce
            local = torch.stack([terms[k].detach().float() * batches.shares.get(k, 1.0) for k in names])
            for k, v in zip(names, all_reduce(local).tolist()):
                logged[k] = logged.get(k, 0.0) + v / world / run.grad_accum
        grad_norm = optimizer_step(params, masters, opt, run.clip)
        record = {
            "step": step + 1,
            **{k: round(v, 6) for k, v in logged.items()},
            "grad_norm": round(grad_norm, 4),
            "lr": lr,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if rank == 0:
            with open(out / "train_log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        bar.set_postfix(
            {k: f"{logged[k]:.3f}" for k in ("loss", "kd", "pen", "util", "ce") if k in logged}, refresh=False
        )
        if step + 1 in run.save_at and step + 1 < run.steps:
            save_snapshot(student, run, out / f"step-{step + 1}", rank, world)
        stopping = run.stop_after and step + 1 == run.stop_after
        if stopping or ((step + 1) % run.save_every == 0 and step + 1 < run.steps):
            save_checkpoint(out / CHECKPOINT, step + 1, student, masters, opt, run, loss_cfg)
        if stopping:
            if rank == 0:
                log(f"stopped after step {step + 1} (--stop-after); continue with --resume")
            finish_distributed()
            return out

    student.eval()
    save_final(student, run, out, rank, world)
    finish_distributed()
    return out


def check_finite(terms: dict, step: int):
    """Stop a run whose loss is NaN or infinite, before anything is written, naming the step and the terms."""
    bad = [k for k, v in terms.items() if not bool(torch.isfinite(v.detach()).all())]
    if bad:
        raise ValueError(
            f"step {step}: non-finite loss terms {bad}; no checkpoint was written for this step (lower --lr, "
            "check the data and the checkpoints for NaN/inf, or resume from the last checkpoint)"
        )


def get_lr(step: int, run: RunConfig) -> float:
    """The learning rate of step `step`: linear warmup over run.warmup of the steps, then cosine decay to
    0."""
    return TW.get_lr(step, run.steps, run.lr, warmup_frac=run.warmup, floor=0.0)


# ----------------------------------------------------------------------------------------------
# 3. One step's losses: each method's forwards, then deepalign's losses
# ----------------------------------------------------------------------------------------------
class Batch(NamedTuple):
    """Right-padded sequences and their loss positions. Position i (of N) is predicted by the logit at
    (rows[i], cols[i]) and is `targets[i]`, the context's response position is positions[i]; dense[i] marks a
    dense harmful context (§5), where the target is the first recovery token rather than the next token."""

    ids: torch.Tensor  # (B, T)
    rows: torch.Tensor  # (N,)
    cols: torch.Tensor  # (N,)
    targets: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,)
    dense: torch.Tensor  # (N,) bool


class TeacherIndex(NamedTuple):
    """Where each harmful loss position finds its clean-context teacher (§5 --teacher clean): the aligned
    model's distribution at row index[i] of the clean batch's loss positions; word_start[i]: rewrite it as a
    word that starts mid-text (a dense or recovery context after a harmful prefix); soft[i]: False where the
    recovery does not tokenize the same in both contexts (that position keeps the hard label only)."""

    clean: Batch
    index: torch.Tensor  # (N,)
    word_start: torch.Tensor  # (N,) bool
    soft: torch.Tensor  # (N,) bool


class Batches(NamedTuple):
    safety: Batch
    utility: Batch
    teacher: TeacherIndex | None
    shares: dict  # {loss term: this process's token share} (1.0 in a single process)


class FrozenAligned:
    """The aligned model A, frozen: its own copy, or under LoRA the student with its adapters switched off,
    which is exactly A (so only two weight copies are held: the student and the base)."""

    def __init__(self, model, adapters_off: bool):
        self.model, self.adapters_off = model, adapters_off

    @torch.no_grad()
    def log_probs(self, batch: Batch) -> torch.Tensor:
        if not self.adapters_off:
            return loss_log_probs(self.model, batch)
        set_lora(self.model, False)
        try:
            return loss_log_probs(self.model, batch)
        finally:
            set_lora(self.model, True)


class Frozen(NamedTuple):
    base: nn.Module | None
    aligned: FrozenAligned | None
    valid: torch.Tensor  # (V,) bool: real token ids
    word_start: torch.Tensor | None  # (V,) long: see word_start_ids


def loss_log_probs(model, batch: Batch) -> torch.Tensor:
    """Float32 log-probs (N, V) at the loss positions only (the head never computes the whole (B, T, V))."""
    return D.log_probs(model(batch.ids, logits_at=(batch.rows, batch.cols)))


def step_losses(method: str, student, frozen: Frozen, batches: Batches, cfg: D.LossConfig) -> dict:
    """Every loss term of one step (per-token means over this process's tokens) and "loss", what is minimised
    (each mean weighted by this process's token share of the global batch: see token_share)."""
    safety, utility, shares = batches.safety, batches.utility, batches.shares
    if method == "targeted":
        lp_S = loss_log_probs(student, safety)  # (N, V)
        with torch.no_grad():
            lp_A, lp_B = frozen.aligned.log_probs(safety), loss_log_probs(frozen.base, safety)  # (N, V)
            q = teacher_distribution(lp_A, lp_B, safety.targets, batches.teacher, frozen, cfg)  # (N, V)
            bf = D.base_favored_mask(lp_A, lp_B, cfg.tau, cfg.top_k, cfg.rho, frozen.valid)  # (N, V)
            mass_A = D.bf_mass(lp_A, bf)  # (N,)
            bf_mean = all_reduce(mass_A.sum()) / all_reduce(
                torch.tensor(float(len(mass_A)), device=lp_A.device)
            )
            # the global batch's last position
            T = all_reduce(safety.positions.max().float(), dist.ReduceOp.MAX)
            lp_A_util = frozen.aligned.log_probs(utility)  # (M, V)
        return D.targeted_loss(
            lp_S,
            lp_A,
            lp_B,
            q,
            safety.dense,
            safety.positions,
            loss_log_probs(student, utility),
            lp_A_util,
            cfg,
            frozen.valid,
            (shares["kd"], shares["util"]),
            bf_mean,
            T,
            bf,
            safety.targets,
        )
    terms = {}
    if method == "constrained":  # Qi et al.'s objective, on the safety and the utility batch alike
        for name, batch in (("safety", safety), ("util", utility)):
            beta_t = D.qi_beta_schedule(batch.positions)
            terms[name] = D.constrained_loss(
                loss_log_probs(student, batch), frozen.aligned.log_probs(batch), batch.targets, beta_t
            )
        terms["loss"] = shares["safety"] * terms["safety"] + shares["util"] * terms["util"]
        return terms
    # sft, augment, rto, insertion, finetune
    terms["ce"] = D.ce_loss(loss_log_probs(student, safety), safety.targets)
    terms["loss"] = shares["ce"] * terms["ce"]
    if method not in ("sft", "finetune"):  # the attacker's fine-tuning anchors nothing
        terms["util"] = D.ce_loss(loss_log_probs(student, utility), utility.targets)
        terms["loss"] = terms["loss"] + cfg.lambda_util * shares["util"] * terms["util"]
    return terms


@torch.no_grad()
def teacher_distribution(lp_A, lp_B, targets, index: TeacherIndex, frozen: Frozen, cfg: D.LossConfig):
    """The hybrid teacher q (N, V) of every harmful loss position (§5): clean (version 3), contrast (version
    1); None for the hard teacher (lam = 1, or --teacher hard): one-hot on the targets, which
    D.targeted_loss reads as -log p_S(y) without building it."""
    if cfg.teacher == "hard" or (cfg.teacher == "clean" and not D.uses_clean_teacher(cfg)):
        return None
    if cfg.teacher == "contrast":
        return D.contrast_teacher(lp_A, lp_B, targets, cfg.lam, cfg.alpha_t, cfg.beta)
    if cfg.teacher != "clean":
        raise ValueError(f"--teacher {cfg.teacher!r} is not supported; use clean, contrast or hard")
    p_clean = frozen.aligned.log_probs(index.clean).exp()[index.index]  # (N, V): A in the clean contexts
    mapped = D.word_start_distribution(p_clean, frozen.word_start)  # (N, V)
    p_clean = torch.where(index.word_start[:, None], mapped, p_clean)
    q = D.clean_teacher(p_clean, targets, cfg.lam)  # (N, V)
    return torch.where(index.soft[:, None], q, D.hard_labels(targets, q.shape[-1]))


# ----------------------------------------------------------------------------------------------
# 4. Examples and batches (seeded by the step, so a resumed run replays the same data)
# ----------------------------------------------------------------------------------------------
class Example(NamedTuple):
    """One sequence and its loss positions: cols (the logits that predict), targets, response positions."""

    ids: list
    cols: list
    targets: list
    positions: list
    dense: bool


def split_ids(tok, prompt: str, response: str) -> tuple[list, list]:
    """D.response_split, memoised: a run draws the same rows step after step, and tokenizing them anew was
    about 40% of a toy `targeted` step. Returns fresh lists (callers may extend them)."""
    head, resp = _split_ids(tok, prompt, response)
    return list(head), list(resp)


@functools.lru_cache(maxsize=1 << 16)
def _split_ids(tok, prompt: str, response: str) -> tuple[tuple, tuple]:
    head, resp = D.response_split(tok, prompt, response)
    return tuple(head), tuple(resp)


def recovery_ids(tok, prefix_ids: list, recovery: str) -> list[int]:
    """The recovery's tokens as they follow `prefix_ids` in an answer (after one space unless the prefix is
    empty or ends in whitespace), then the end of the turn. Token-level concatenation, as generation sees
    it."""
    return list(_recovery_ids(tok, tuple(prefix_ids), recovery))


@functools.lru_cache(maxsize=1 << 18)
def _recovery_ids(tok, prefix_ids: tuple, recovery: str) -> tuple:
    sep = " " if prefix_ids and not tok.decode(list(prefix_ids)).endswith((" ", "\n")) else ""
    return (*tok.encode(sep + recovery), tok.end_of_turn_id)


def recovery_example(tok, row: dict, k: int, answer_ids=None) -> Example:
    """prompt + the first k harmful tokens (or `answer_ids`) + recovery + end of turn; loss on the recovery
    and the end of the turn (Qi et al.'s augmentation, §5 recovery contexts)."""
    head, harm = split_ids(tok, row["prompt"], row["harmful_response"])
    prefix = list(answer_ids) if answer_ids is not None else harm[:k]
    target = recovery_ids(tok, prefix, row["recovery"])
    start = len(head) + len(prefix)
    cols = list(range(start - 1, start - 1 + len(target)))
    positions = list(range(len(prefix), len(prefix) + len(target)))
    return Example(head + prefix + target, cols, target, positions, False)


def dense_example(tok, row: dict, K: int) -> Example:
    """The dense harmful contexts c_t = (x, h_<t), t = 0..min(len(h), K), from one teacher-forced sequence;
    the target at each is the first token of the recovery as it would follow h_<t (§5, DeRTa)."""
    head, harm = split_ids(tok, row["prompt"], row["harmful_response"])
    n = min(len(harm), K)
    targets = [recovery_ids(tok, harm[:t], row["recovery"])[0] for t in range(n + 1)]
    return Example(
        head + harm[:n], list(range(len(head) - 1, len(head) + n)), targets, list(range(n + 1)), True
    )


def answer_example(tok, prompt: str, response: str) -> Example:
    """prompt + response + end of turn, loss on the response and the end of the turn."""
    head, resp = split_ids(tok, prompt, response)
    target = resp + [tok.end_of_turn_id]
    return Example(
        head + target,
        list(range(len(head) - 1, len(head) - 1 + len(target))),
        target,
        list(range(len(target))),
        False,
    )


def collate(examples: list[Example], pad_id: int, device) -> Batch:
    """Right-padded ids (B, T) and the loss positions of every example, concatenated."""
    ids = D.right_pad([e.ids for e in examples], pad_id, device)  # (B, T)
    rows, cols, targets, positions, dense = [], [], [], [], []
    for b, e in enumerate(examples):
        rows += [b] * len(e.cols)
        cols += e.cols
        targets += e.targets
        positions += e.positions
        dense += [e.dense] * len(e.cols)
    as_long = [torch.tensor(x, dtype=torch.long, device=device) for x in (rows, cols, targets, positions)]
    return Batch(ids, *as_long, torch.tensor(dense, dtype=torch.bool, device=device))


def targeted_examples(tok, row: dict, k: int, K: int) -> tuple[list[Example], Example, list, list, list]:
    """One harmful row's examples for `targeted`: its dense and recovery examples, the clean example (the
    prompt with the recovery as the whole answer: the contexts where A's alignment is complete), and, for each
    loss position of the first two, (the clean loss position it reads, word_start, soft)."""
    dense, recovery = dense_example(tok, row, K), recovery_example(tok, row, k)
    clean = answer_example(tok, row["prompt"], row["recovery"])
    index, word_start, soft = [], [], []
    for t in dense.positions:  # every dense context reads A's first answer token to the bare prompt
        index.append(0)
        word_start.append(t > 0)
        soft.append(True)
    same = recovery.targets[1:] == clean.targets[1:]  # the recovery after the prefix and alone, past token 0
    for j in range(len(recovery.targets)):
        index.append(j if j == 0 or same else 0)  # (unread where soft is False)
        word_start.append(k > 0 and j == 0)
        soft.append(j == 0 or same)
    return [dense, recovery], clean, index, word_start, soft


def targeted_batch(tok, draws: list, K: int, device) -> tuple[Batch, TeacherIndex]:
    """The harmful batch of `targeted` for draws [(row, k)]: every row's dense and recovery examples, and
    where each of their loss positions reads its clean-context teacher (targeted_examples)."""
    examples, cleans, index, word_start, soft = [], [], [], [], []
    for row, k in draws:
        pair, clean, idx, ws, sf = targeted_examples(tok, row, k, K)
        offset = sum(len(c.cols) for c in cleans)
        examples += pair
        cleans.append(clean)
        index += [offset + i for i in idx]
        word_start += ws
        soft += sf
    teacher = TeacherIndex(
        collate(cleans, tok.pad_id, device),
        torch.tensor(index, device=device),
        torch.tensor(word_start, device=device),
        torch.tensor(soft, device=device),
    )
    return collate(examples, tok.pad_id, device), teacher


def prefix_length(rng: random.Random, method: str, K: int) -> int:
    """k for a recovery example: 0 for sft; Qi et al.'s augmentation takes k = 0 half the time, else U[1, K];
    targeted and constrained draw k ~ U{0..K} (§5, §6)."""
    if method == "sft":
        return 0
    if method == "augment":
        return 0 if K < 1 or rng.random() < 0.5 else rng.randint(1, K)
    return rng.randint(0, K)


def make_batches(
    step: int,
    tok,
    safety_rows,
    benign_rows,
    own_answers,
    student,
    run: RunConfig,
    cfg: D.LossConfig,
    device,
    rank: int = 0,
    world: int = 1,
) -> Batches:
    """The step's harmful and utility batches. Every random draw is made for the whole global batch (seeded by
    the step); process r keeps examples r, r + world, ..., so any number of processes sees the same data."""
    rng = random.Random(run.seed * 1_000_003 + step)
    draws = []
    for _ in range(run.batch_size):
        row = safety_rows[rng.randrange(len(safety_rows))]
        if run.method == "insertion":
            draws.append(
                (row, insertion_candidates(tok, row, own_answers[row["prompt"]], rng, run.insert_candidates))
            )
        else:
            draws.append((row, prefix_length(rng, run.method, cfg.max_prefix)))
    n_benign = run.utility_batch_size if benign_rows else 0  # finetune: the attacker anchors nothing
    benign = [benign_rows[rng.randrange(len(benign_rows))] for _ in range(n_benign)]
    teacher = None
    if run.method == "targeted":
        safety_batch, teacher = targeted_batch(tok, draws[rank::world], cfg.max_prefix, device)
    else:
        examples = [
            baseline_example(tok, row, draw, student, run, cfg, device) for row, draw in draws[rank::world]
        ]
        safety_batch = collate(examples, tok.pad_id, device)
    utility = [answer_example(tok, r["prompt"], r["response"]) for r in benign[rank::world]]
    utility_batch = collate(utility, tok.pad_id, device) if utility else None
    s_share = token_share(safety_batch)
    u_share = token_share(utility_batch) if utility else 1.0
    shares = {name: s_share for name in ("kd", "kd_dense", "kd_recovery", "pen", "bf_mass_S", "ce", "safety")}
    shares["util"] = u_share
    return Batches(safety_batch, utility_batch, teacher, shares)


def baseline_example(tok, row: dict, draw, student, run: RunConfig, cfg: D.LossConfig, device) -> Example:
    """One harmful row's example for a baseline (§6); `draw` is its prefix length k, or (insertion) its
    candidate splices."""
    if run.method in ("constrained", "finetune"):  # fine-tuning data: the answer given is the target
        return answer_example(tok, row["prompt"], row["harmful_response"])
    if run.method == "insertion":
        return recovery_example(tok, row, 0, worst_insertion(student, tok, row, draw, device))
    if run.method == "rto":
        return dense_example(tok, row, cfg.max_prefix)
    return recovery_example(tok, row, draw)


def insertion_candidates(tok, row, own: list[int], rng: random.Random, n: int):
    """n random splices: the model's own answer cut after j tokens, then m harmful tokens from offset a.
    Returns [(answer prefix ids, the next harmful tokens)]."""
    _, harm = split_ids(tok, row["prompt"], row["harmful_response"])
    own = [t for t in own if t not in tok.eos_ids] or own[:1]
    candidates = []
    for _ in range(n):
        j = rng.randint(1, max(1, len(own) - 1))
        m = rng.randint(3, 10)
        a = rng.randint(0, max(0, len(harm) - m - 5))
        candidates.append((own[:j] + harm[a : a + m], harm[a + m : a + m + 5]))
    return candidates


@torch.no_grad()
def worst_insertion(student, tok, row, candidates, device):
    """The candidate splice whose next harmful tokens the student finds most likely: every candidate scored in
    one right-padded forward (causal attention: the padding on the right changes no scored position)."""
    head = tok.prompt_ids(row["prompt"])
    seqs = [head + prefix + (cont or [tok.pad_id]) for prefix, cont in candidates]
    lp = D.log_probs(student(D.right_pad(seqs, tok.pad_id, device)))  # (n, T, V)
    scores = []
    for i, (prefix, cont) in enumerate(candidates):
        start = len(head) + len(prefix) - 1  # the logits that predict cont[0]
        ids = torch.tensor(cont, device=device)[:, None]  # (len(cont), 1)
        scores.append(lp[i, start : start + len(cont)].gather(-1, ids).sum().item() if cont else -math.inf)
    return candidates[max(range(len(candidates)), key=scores.__getitem__)][0]


def word_start_ids(tok, vocab_size: int) -> torch.Tensor:
    """(V,) long: for each token, the token that starts the same word in the middle of a text: the first token
    of " " + its text, for a real token that does not already start with a space; every other id maps to
    itself. Used to move the clean teacher's answer-initial distribution to a context after a harmful
    prefix."""
    ids = torch.arange(vocab_size)
    valid = tok.real_token_mask(vocab_size)
    for i in valid.nonzero().squeeze(-1).tolist():
        text = tok.decode([i])
        if text and not text[0].isspace():
            spaced = tok.encode(" " + text)
            if spaced and spaced[0] < vocab_size:
                ids[i] = spaced[0]
    return ids


# ----------------------------------------------------------------------------------------------
# 5. Data, and the data the aligned model makes itself
# ----------------------------------------------------------------------------------------------
def load_data(
    run: RunConfig, tok, aligned, out: Path, rank: int, own_recoveries: bool = False, base=None
) -> tuple[list, list]:
    """The harmful rows (with harmful responses) and the benign rows; recoveries and benign responses the
    files lack are the aligned model's own (generated on process 0, cached in the run folder). With
    own_recoveries (targeted completion's clean teacher, docs/method.md §5 version 3) every recovery is the
    aligned model's own greedy answer to the bare prompt, whatever the file holds. For `finetune` (the
    attacker's fine-tuning, §7) a row's "response" is its target where it has no harmful response. With
    run.anchor "own" every benign answer is the aligned model's own, whatever the file holds; with
    "base-prompts" the benign rows are joined by prompts the base model writes, answered by the aligned model
    (written_anchors)."""
    rows = formats.read_prompts(run.data, "harmful")
    if run.method == "finetune":
        rows = [{**r, "harmful_response": r.get("harmful_response") or r.get("response")} for r in rows]
    needs = "harmful_response"
    safety = [r for r in rows if r.get(needs)]
    if own_recoveries:
        safety = [{k: v for k, v in r.items() if k != "recovery"} for r in safety]
    if not safety:
        raise ValueError(
            f"{run.data}: no row has a harmful response; training needs (prompt, harmful "
            "response) pairs (e.g. our JSONL, AdvBench's goal,target, HEx-PHI with responses)"
        )
    benign = formats.read_prompts(run.benign, "benign")
    if run.method == "finetune":  # the attacker's pairs: no recoveries, no anchors
        return safety, []
    if run.anchor == "own":  # the anchor follows the aligned model's own answers (docs/development.md §5)
        benign = [{k: v for k, v in r.items() if k != "response"} for r in benign]
    written = []
    if rank == 0:
        fill_missing(safety, "recovery", tok, aligned, out / "generated_recoveries.jsonl")
        fill_missing(benign, "response", tok, aligned, out / "generated_responses.jsonl")
        if run.anchor == "base-prompts":
            writer = base if run.anchor_writer == "base" else aligned
            written = written_anchors(run, tok, writer, aligned, out / WRITTEN)
    barrier()
    if rank > 0:  # the other processes read what process 0 generated
        fill_missing(safety, "recovery", tok, None, out / "generated_recoveries.jsonl")
        fill_missing(benign, "response", tok, None, out / "generated_responses.jsonl")
        if run.anchor == "base-prompts":
            written = written_anchors(run, tok, None, None, out / WRITTEN)
    return safety, benign + written


def fill_missing(rows: list[dict], key: str, tok, model, cache: Path, batch_size: int = 32):
    """Give every row without `key` the aligned model's own greedy answer to its bare prompt (its own refusal,
    as a recovery; its own answer, as a utility anchor), cut at the end of its turn. Answers are generated
    once and cached as JSONL {"prompt", key} beside the run; a resumed run reuses them."""
    missing = sorted({r["prompt"] for r in rows if not r.get(key)})
    if not missing:
        return
    cached = {r["prompt"]: r[key] for r in read_jsonl(cache, ["prompt", key])} if cache.exists() else {}
    todo = [p for p in missing if p not in cached]
    if todo and model is None:
        raise FileNotFoundError(f"{cache}: the generated {key}s are missing (process 0 writes them)")
    for i in tqdm(
        range(0, len(todo), batch_size), desc=f"generate {key}s", file=sys.stderr, disable=not todo
    ):
        prompts = todo[i : i + batch_size]
        outs = generate(
            model,
            [tok.prompt_ids(p) for p in prompts],
            max_new_tokens=64,
            eos_ids=tok.eos_ids,
            pad_id=tok.pad_id,
        )
        cached.update(
            {p: tok.decode([t for t in o if t not in tok.eos_ids]).strip() for p, o in zip(prompts, outs)}
        )
    if todo:
        write_jsonl(cache, [{"prompt": p, key: cached[p]} for p in sorted(cached)])
        log(f"{cache}: {len(todo)} {key}s generated by the aligned model")
    for r in rows:
        if not r.get(key):
            r[key] = cached[r["prompt"]]


WRITTEN = "generated_anchors.jsonl"


def user_turn_opening(tok) -> list[int]:
    """Token ids of the chat format up to where a user's message begins (ChatML: "<|im_start|>user\\n"):
    what a model continues with a user's request (Magpie's pre-query template, Xu et al. 2024)."""
    mark = "deepalign-user-turn-probe"
    text = tok.format_chat([{"role": "user", "content": mark}], add_generation_prompt=False)
    return tok.encode(text[: text.index(mark)], add_special_tokens=tok.chat_template is None)


@torch.no_grad()
def written_anchors(run: RunConfig, tok, writer, aligned, cache: Path, batch_size: int = 64) -> list[dict]:
    """Benign anchor rows beyond the data (docs/development.md §6): run.anchor_prompts user turns sampled
    from the writer (the base model, which read every task in pretraining), each answered by the aligned
    model (sampled, T = 1); kept iff the answer is not a refusal (judges.refusal_phrase_judge: no oracle;
    with anchor_check "greedy too" neither is A's greedy answer), the prompt is new and in no file of
    run.anchor_exclude.
    Generated once (writer given: process 0), cached, and reused."""
    if cache.exists():
        return read_jsonl(cache, ["prompt", "response"])
    if writer is None:
        raise FileNotFoundError(f"{cache}: the written anchors are missing (process 0 writes them)")
    excluded = {r["prompt"] for f in run.anchor_exclude for r in formats.read_prompts(f, "benign")}
    opening = user_turn_opening(tok)
    stops = [tok.end_of_turn_id, *tok.eos_ids]
    rows, seen = [], set(excluded)
    for i in tqdm(range(0, run.anchor_prompts, batch_size), desc="write anchors", file=sys.stderr):
        n = min(batch_size, run.anchor_prompts - i)
        seed = run.seed * 1_000_003 + i
        written = generate(writer, [opening] * n, 64, stops, tok.pad_id, temperature=1.0, seed=seed)
        prompts = [tok.decode([t for t in w if t not in stops]).split("\n\n")[0].strip() for w in written]
        prompts = [p for p in dict.fromkeys(prompts) if p and p not in seen]
        seen.update(prompts)
        if not prompts:
            continue
        answers = generate(
            aligned, [tok.prompt_ids(p) for p in prompts], 128, tok.eos_ids, tok.pad_id, 1.0, seed=seed + 1
        )
        texts = [tok.decode([t for t in a if t not in tok.eos_ids]).strip() for a in answers]
        answered = [judges.refusal_phrase_judge(t) for t in texts]  # True: non-empty and no refusal phrase
        if run.anchor_check == "greedy too":  # A's own preference, not a lucky sample, decides
            greedy = generate(aligned, [tok.prompt_ids(p) for p in prompts], 32, tok.eos_ids, tok.pad_id)
            answered = [a and judges.refusal_phrase_judge(tok.decode(g)) for a, g in zip(answered, greedy)]
        rows += [{"prompt": p, "response": t} for p, t, a in zip(prompts, texts, answered) if a]
    if not rows:
        raise ValueError(
            f"{run.aligned}: the aligned model refused every prompt the {run.anchor_writer} model wrote "
            "(--anchor-writer); train with --anchor data"
        )
    write_jsonl(cache, rows)
    log(f"{cache}: {len(rows)} of {run.anchor_prompts} written prompts kept as anchors")
    return rows


@torch.no_grad()
def own_refusals(model, tok, rows: list[dict], rank: int) -> dict:
    """The aligned model's own greedy answers to the harmful prompts (insertion's splice points), computed
    once, before sharding."""
    prompts = sorted({r["prompt"] for r in rows})
    answers = {}
    for i in tqdm(range(0, len(prompts), 64), desc="own answers", file=sys.stderr, disable=rank > 0):
        outs = generate(
            model,
            [tok.prompt_ids(p) for p in prompts[i : i + 64]],
            max_new_tokens=24,
            eos_ids=tok.eos_ids,
            pad_id=tok.pad_id,
        )
        answers.update(zip(prompts[i : i + 64], outs))
    return answers


# ==============================================================================================
# Plumbing: LoRA, mixed precision, several processes, checkpoints, saving, the command line
# ==============================================================================================
# ----------------------------------------------------------------------------------------------
# 6. LoRA: a low-rank update on the attention and MLP projections, W x + (alpha / r) B A x
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# 7. Mixed precision: bf16 weights for the forward and backward, float32 master weights for the update
# ----------------------------------------------------------------------------------------------
def fp32_masters(params: list) -> list:
    """What the optimizer updates: a float32 copy of each low-precision trainable parameter, the parameter
    itself when it is float32 already (LoRA adapters, --dtype float32). An AdamW step of lr = 1e-5 is far
    below half a bf16 ulp of a typical weight (|w| = 0.02 has ulp 1.2e-4): updated in place, bf16 weights
    would not move at all. The scheme of DeepSpeed's and Megatron's bf16 optimizers."""
    return [p if p.dtype == torch.float32 else p.detach().float() for p in params]


def grads_to_masters(params: list, masters: list):
    """Add each parameter's gradient into its float32 master's (freeing the low-precision one), after every
    micro-batch's backward, so gradient accumulation sums in float32."""
    for p, m in zip(params, masters):
        if m is not p and p.grad is not None:
            m.grad = p.grad.float() if m.grad is None else m.grad.add_(p.grad)
            p.grad = None


@torch.no_grad()
def masters_to_params(params: list, masters: list):
    """Round the updated masters into the model's weights."""
    for p, m in zip(params, masters):
        if m is not p:
            p.copy_(m)


def optimizer_step(params: list, masters: list, opt, clip: float) -> float:
    """Gradients to the masters (what is left of them), clip their global norm, AdamW step, masters back into
    the weights. Returns the gradient norm before clipping (of the whole model under FSDP)."""
    grads_to_masters(params, masters)
    grad_norm = torch.nn.utils.clip_grad_norm_(masters, clip)
    opt.step()
    masters_to_params(params, masters)
    return (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()


# ----------------------------------------------------------------------------------------------
# 8. Several processes: torch's FSDP (fully_shard) shards every model; these keep the math global
# ----------------------------------------------------------------------------------------------
def init_distributed(run: RunConfig) -> tuple[int, int]:
    """Under `torchrun --nproc_per_node N`, join the process group (NCCL on GPUs, gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "gloo"
        if run.device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "nccl"
        dist.init_process_group(backend)
    rank, world = world_info()
    if run.dtype == "float16":
        raise ValueError(
            "--dtype float16: training in float16 needs loss scaling, which train.py does "
            "not do; use --dtype bfloat16 (or float32)"
        )
    if world > 1 and run.compile:
        raise ValueError("--compile is single-process only; run without it under torchrun")
    if world > 1 and (run.batch_size % world or run.utility_batch_size % world):
        raise ValueError(
            f"--batch-size {run.batch_size} and --utility-batch-size {run.utility_batch_size} "
            f"must be multiples of the {world} processes (each takes an equal share of the "
            "global batch)"
        )
    return rank, world


def world_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def finish_distributed():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (or `op`) over processes; the identity in a single process."""
    if world_info()[1] > 1:
        x = x.clone()
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def token_share(batch: Batch) -> float:
    """(this process's loss tokens / all processes' loss tokens) * world size. Scaling a per-token mean by it
    makes FSDP's gradient average equal the gradient of the global batch's per-token mean."""
    world = world_info()[1]
    if world == 1:
        return 1.0
    # NCCL reduces device tensors only
    n = torch.tensor(float(len(batch.targets)), device=batch.targets.device)
    return (n * world / all_reduce(n)).item()


def shard(model):
    """FSDP2: each transformer block its own unit, then the rest (embedding, final norm, head)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


# ----------------------------------------------------------------------------------------------
# 9. Checkpoints: torch.distributed.checkpoint, any number of processes on resume
# ----------------------------------------------------------------------------------------------
CHECKPOINT = "checkpoint"  # a folder inside the run folder


def checkpoint_state(step, student, masters, opt, run: RunConfig, loss_cfg: D.LossConfig) -> dict:
    """What a resumed run needs: the float32 masters by parameter name (under FSDP, each process's shards),
    AdamW's state, the step, and both configurations (as JSON, compared on resume)."""
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    config = json.dumps({"run": asdict(run), "loss": asdict(loss_cfg)}, sort_keys=True)
    return {
        "step": step,
        "trainable": dict(zip(names, masters)),
        "optimizer": opt.state_dict(),
        "config": config,
    }


def save_checkpoint(path: Path, step, student, masters, opt, run, loss_cfg):
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
            checkpoint_state(step, student, masters, opt, run, loss_cfg),
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


def load_checkpoint(path: Path, student, masters, opt, run: RunConfig, loss_cfg: D.LossConfig) -> int:
    import torch.distributed.checkpoint as dcp

    init_optimizer_state(opt)
    state = checkpoint_state(0, student, masters, opt, run, loss_cfg)
    state["config"] = ""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())  # masters and AdamW, in place
    saved = json.loads(state["config"])
    now = json.loads(json.dumps({"run": asdict(run), "loss": asdict(loss_cfg)}))  # tuples as JSON lists
    defaults = json.loads(json.dumps({"run": asdict(RunConfig()), "loss": asdict(D.LossConfig())}))
    for part in ("run", "loss"):
        for key, value in now[part].items():
            was = saved[part].get(key, defaults[part][key])  # a field newer than the checkpoint: its default
            if key not in RESUMABLE and was != value:
                raise ValueError(
                    f"{path}: the checkpoint has {key}={was!r} but this run "
                    f"has {value!r}; resume with the original settings or start over with "
                    "--overwrite"
                )
    masters_to_params([p for p in student.parameters() if p.requires_grad], masters)
    opt.load_state_dict(state["optimizer"])
    return state["step"]


def keep_log_until(log_file: Path, step: int):
    """Drop the log lines of steps after `step` (logged after the checkpoint a run resumes from)."""
    kept = []
    if step and log_file.exists():
        kept = [line for line in log_file.read_text().splitlines() if json.loads(line)["step"] <= step]
    log_file.write_text("".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------------------------
# 10. The run folder and the saved model
# ----------------------------------------------------------------------------------------------
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


def save_final(student, run: RunConfig, out: Path, rank: int, world: int):
    """Write the run folder as a Hugging Face folder (and, with LoRA, the adapter in PEFT's layout). With
    FSDP, every process gathers the full weights (a collective) and process 0 writes them from an unsharded
    copy."""
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


def save_snapshot(student, run: RunConfig, folder: Path, rank: int, world: int):
    """The model as it is after an intermediate step (--save-at), as a Hugging Face folder; full fine-tuning
    on one process only (a LoRA or FSDP student would need save_final's merge or gather)."""
    if run.lora_rank or world > 1:
        raise ValueError(
            "--save-at saves full fine-tuning runs on one process; leave out --lora-rank/torchrun"
        )
    if rank == 0:
        save_model(student, folder, tokenizer_from=run.aligned, overwrite=True)


# ----------------------------------------------------------------------------------------------
# 11. Command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = cli.parser(__doc__)
    cli.add_world_flag(p)
    p.add_argument("--base", help="base model folder (real models; default: the world's base)")
    p.add_argument(
        "--aligned", help="aligned model folder, the student's start (default: the world's aligned)"
    )
    p.add_argument("--method", choices=METHODS, default="targeted", help="the training objective")
    p.add_argument(
        "--data",
        help="harmful rows with responses, any layout of docs/method.md §9 (default: the "
        "world's safety_train.jsonl)",
    )
    p.add_argument(
        "--benign", help="benign prompts, with or without responses (default: the world's benign_train.jsonl)"
    )
    p.add_argument(
        "--anchor",
        choices=("data", "own", "base-prompts"),
        help="the utility anchor: the --benign file's responses; the aligned model's own greedy answers to "
        "its prompts; or the file joined by prompts the base model writes, answered by the aligned model "
        "(docs/development.md §6-7; generated once, cached in the run folder) (default: base-prompts for "
        "targeted, data for the baselines, as their authors anchor)",
    )
    p.add_argument(
        "--anchor-prompts",
        type=int,
        default=RunConfig.anchor_prompts,
        help="--anchor base-prompts: prompts the base model writes (before dropping refused ones)",
    )
    p.add_argument(
        "--anchor-writer",
        choices=("base", "aligned"),
        default=RunConfig.anchor_writer,
        help="--anchor base-prompts: the model that writes the prompts (aligned: Magpie's choice, for a base "
        "checkpoint whose chat-format tokens are untrained, e.g. Llama 3's)",
    )
    p.add_argument(
        "--anchor-check",
        choices=("sampled", "greedy too"),
        default=RunConfig.anchor_check,
        help="--anchor base-prompts: drop a written prompt the aligned model refuses in its sampled answer, "
        "or in its sampled or its greedy one",
    )
    p.add_argument(
        "--anchor-exclude",
        nargs="*",
        help="--anchor base-prompts: prompt files (e.g. the evaluation's) whose prompts are never anchors "
        "(default: none; on a toy world its benign_eval.jsonl and harmful_eval.jsonl)",
    )
    p.add_argument("--out", help="run folder (default: runs/<method>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--resume", action="store_true", help="continue the run folder's checkpoint")
    run_defaults = RunConfig()
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=run_defaults.steps, help="optimizer steps")
    g.add_argument(
        "--batch-size", type=int, default=run_defaults.batch_size, help="harmful examples per step"
    )
    g.add_argument(
        "--utility-batch-size",
        type=int,
        default=run_defaults.utility_batch_size,
        help="benign examples per step",
    )
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    g.add_argument("--lr", type=float, default=run_defaults.lr, help="peak learning rate")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument(
        "--warmup", type=float, default=run_defaults.warmup, help="warmup, as a fraction of the steps"
    )
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    g.add_argument("--seed", type=int, default=0, help="seed of the batches")
    g.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    g.add_argument(
        "--save-at",
        type=int,
        nargs="*",
        default=[],
        help="also save the model after these steps, as OUT/step-N (budget curves, fine-tuning attacks)",
    )
    g.add_argument(
        "--stop-after", type=int, default=0, help="stop with a checkpoint after this step (0: never)"
    )
    loss = D.LossConfig()
    m = p.add_argument_group("the objective (docs/method.md §5-§6)")
    m.add_argument(
        "--teacher",
        choices=["clean", "contrast", "hard"],
        default=loss.teacher,
        help="hybrid teacher: the aligned model's own refusal in the clean context (version 3), in the "
        "attacked context amplified away from the base (version 1), or the data set's recovery, hard labels",
    )
    m.add_argument(
        "--max-prefix",
        type=int,
        default=loss.max_prefix,
        help="K: dense contexts t = 0..min(len(h), K); recovery prefixes k ~ U{0..K}",
    )
    m.add_argument(
        "--lam", type=float, default=loss.lam, help="hybrid teacher: weight of the hard recovery label"
    )
    m.add_argument(
        "--alpha-t", type=float, default=loss.alpha_t, help="--teacher contrast: contrast strength"
    )
    m.add_argument("--beta", type=float, default=loss.beta, help="--teacher contrast: V_head threshold")
    cli.add_base_favored_flags(m)
    m.add_argument(
        "--penalty-weight",
        choices=["adaptive", "position"],
        default=loss.penalty_weight,
        help="the penalty's per-position weights",
    )
    m.add_argument("--w-max", type=float, default=loss.w_max, help="adaptive weights are clipped at w_max")
    m.add_argument("--gamma", type=float, default=loss.gamma, help="position weights: w_t = 1 + gamma t / T")
    m.add_argument("--lambda-pen", type=float, default=loss.lambda_pen, help="penalty weight (0: no penalty)")
    m.add_argument("--lambda-util", type=float, default=loss.lambda_util, help="utility anchor weight")
    m.add_argument(
        "--insert-candidates", type=int, default=4, help="insertion: candidate splices per example"
    )
    h = p.add_argument_group("hardware")
    cli.add_device_flags(h)
    h.add_argument(
        "--save-dtype",
        choices=sorted(DTYPES),
        help="dtype of the saved model (default: float32 after a LoRA merge, else --dtype)",
    )
    h.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    h.add_argument("--lora-alpha", type=float, default=0.0, help="LoRA alpha (0: 2 * rank)")
    h.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    h.add_argument("--compile", action="store_true", help="torch.compile the student")
    return p.parse_args(argv)


EVAL_FILES = ("benign_eval.jsonl", "harmful_eval.jsonl")


def configs(args) -> tuple[RunConfig, D.LossConfig]:
    """The run's and the objective's configuration from the command line: the given folders and files, or a
    toy world's (never a mix: real folders need --data and --benign)."""
    real = args.base or args.aligned or args.data or args.benign
    if real and not (args.base and args.aligned and args.data and args.benign):
        flags = (
            ("--base", args.base),
            ("--aligned", args.aligned),
            ("--data", args.data),
            ("--benign", args.benign),
        )
        missing = [flag for flag, value in flags if not value]
        raise ValueError(
            f"{', '.join(missing)} missing: training real models needs --base, --aligned, "
            "--data and --benign (leave all four out for the toy world)"
        )
    if real and args.world:
        raise ValueError(
            "--world trains on a toy world's models and data; leave it out with --base/--aligned"
        )
    paths = None if real else TW.ensure_world(args.world)
    run_fields = {f.name for f in fields(RunConfig)}
    values = {k: v for k, v in vars(args).items() if k in run_fields and v is not None}
    values.update(out=args.out or f"runs/{args.method}", save_dtype=args.save_dtype or "")
    values["save_at"] = tuple(args.save_at)
    values["anchor"] = args.anchor or ("base-prompts" if args.method == "targeted" else "data")
    if paths:
        values.update(
            base=str(paths["base"]),
            aligned=str(paths["aligned"]),
            data=str(paths["data"] / "safety_train.jsonl"),
            benign=str(paths["data"] / "benign_train.jsonl"),
        )
        if args.anchor_exclude is None and values["anchor"] == "base-prompts":  # decontaminate: evaluation
            values["anchor_exclude"] = tuple(str(paths["data"] / f) for f in EVAL_FILES)
    if args.anchor_exclude is not None:
        values["anchor_exclude"] = tuple(args.anchor_exclude)
    loss_fields = {f.name for f in fields(D.LossConfig)}
    loss = D.LossConfig(**{k: v for k, v in vars(args).items() if k in loss_fields})
    return RunConfig(**values), loss


def main(argv=None):
    args = parse_args(argv)
    run, loss = configs(args)
    return train(run, loss, resume=args.resume, overwrite=args.overwrite)


if __name__ == "__main__":
    cli.run(main)
