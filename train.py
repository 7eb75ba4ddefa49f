"""Targeted completion: fine-tune an aligned model so that safety holds at every response position.

    python train.py                                   # targeted completion on the seed-0 toy world
    python train.py --world data/worlds/seed-1 --method augment --out runs/seed-1/augment
    python train.py --base DIR --aligned DIR --data harmful.csv --benign benign.jsonl --out runs/x \\
                    --dtype bfloat16 --lora-rank 16 --checkpointing
    torchrun --nproc_per_node 4 train.py ...          # FSDP: every model sharded over 4 GPUs (or CPUs)

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

Data: harmful rows {"prompt", "harmful_response", "recovery"?} (--data, any layout of docs/method.md §9)
and benign rows {"prompt", "response"?} (--benign). What a row lacks is the aligned model's own: its refusal
to the bare prompt as the recovery (targeted's clean teacher always uses it: §5 version 3), its answer as the
response (as Qi et al. make their anchors; --anchor own: every row's); generated once, cached in the run
folder, reused on --resume. Each step's batches are seeded by (seed, step): a resumed run sees the same.

Output (--out): a Hugging Face folder (with LoRA: the merge, done in float32) that eval.py, decode.py and
transformers load, and beside it train_log.jsonl (every loss term of every step), train_config.json, and with
LoRA the adapter in PEFT's layout (adapter/). checkpoint/ every --save-every steps; --resume continues it.

Read top to bottom: 1. one step's losses (each method's forwards, then deepalign's losses); 2. the batches
(data/examples.py makes the examples); 3. METHODS: name -> its draws, batch, loss, frozen models; 4. RunConfig
(deepalign.LossConfig: the objective); 5. the loop: train(); 6. data the aligned model makes; 7. command line.
The plumbing (LoRA, float32 masters, FSDP, checkpoints, progress bars) is in infra/.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn as nn

import deepalign as D
from data import examples as E
from data import toyworld as TW
from data.refusals import refusal_phrase_judge
from decode import Sampling, generate
from infra import cli, distributed, formats
from infra.checkpoints import CHECKPOINT, prepare_out, save_checkpoint, save_final, save_snapshot, start_run
from infra.cli import log, setting
from infra.files import read_jsonl, write_jsonl
from infra.hf import load_model
from infra.inputs import real_or_toy
from infra.lora import FrozenAligned, add_lora
from infra.optim import check_finite, fp32_masters, get_lr, grads_to_masters, optimizer_step
from infra.progress import progress_bar
from infra.tokenizer import Tokenizer
from model import DTYPES


# ----------------------------------------------------------------------------------------------
# 1. One step's losses: each method's forwards, then deepalign's losses
# ----------------------------------------------------------------------------------------------
class Frozen(NamedTuple):
    base: nn.Module | None
    aligned: FrozenAligned | None
    valid: torch.Tensor  # (V,) bool: real token ids
    word_start: torch.Tensor | None  # (V,) long: see data/examples.word_start_ids


def step_losses(method: str, student, frozen: Frozen, batches: E.Batches, cfg: D.LossConfig) -> dict:
    """Every loss term of one step (per-token means over this process's tokens) and "loss", what is minimised
    (each mean weighted by this process's token share of the global batch: infra.distributed.token_share)."""
    return METHODS[method].loss(student, frozen, batches, cfg)


def targeted_terms(student, frozen: Frozen, batches: E.Batches, cfg: D.LossConfig) -> dict:
    """Targeted completion (§5): the student, the frozen A and B and the teacher at the harmful contexts, the
    penalty's base-favored sets and weights (over the global batch), A and the student on the benign ones."""
    safety, utility = batches.safety, batches.utility
    lp_S = E.loss_log_probs(student, safety)  # (N, V)
    with torch.no_grad():
        lp_A, lp_B = E.loss_log_probs(frozen.aligned, safety), E.loss_log_probs(frozen.base, safety)  # (N, V)
        q = teacher_distribution(lp_A, lp_B, safety.targets, batches.teacher, frozen, cfg)  # (N, V) or (N,)
        bf = D.base_favored_mask(lp_A, lp_B, cfg, frozen.valid)  # (N, V)
        mass_A = D.bf_mass(lp_A, bf)  # (N,)
        # the weights read the global batch's mean bf_mass_A and its last position (several processes)
        mean, T = distributed.global_mean(mass_A), distributed.global_max(safety.positions)  # () each
        w = D.penalty_weights(mass_A, safety.positions.float(), cfg, mean, T)  # (N,)
        lp_A_util = E.loss_log_probs(frozen.aligned, utility)  # (M, V)
    lp_S_util = E.loss_log_probs(student, utility)  # (M, V)
    terms = D.targeted_loss(lp_S, q, bf, w, lp_S_util, lp_A_util, cfg, safety.dense)
    s, u = batches.shares["kd"], batches.shares["util"]  # each mean weighed by its token share
    terms["loss"] = D.targeted_objective(s * terms["kd"], s * terms["pen"], u * terms["util"], cfg)
    return terms


def constrained_terms(student, frozen: Frozen, batches: E.Batches, cfg: D.LossConfig) -> dict:
    """Qi et al.'s token-wise constrained objective (§6), on the safety and the utility batch alike."""
    terms, shares = {}, batches.shares
    for name, batch in (("safety", batches.safety), ("util", batches.utility)):
        beta_t = D.qi_beta_schedule(batch.positions)
        terms[name] = D.constrained_loss(
            E.loss_log_probs(student, batch), E.loss_log_probs(frozen.aligned, batch), batch.targets, beta_t
        )
    terms["loss"] = shares["safety"] * terms["safety"] + shares["util"] * terms["util"]
    return terms


def ce_terms(student, frozen: Frozen, batches: E.Batches, cfg: D.LossConfig) -> dict:
    """Cross-entropy on the harmful batch's targets alone (sft; finetune, the attacker's, anchors nothing)."""
    ce = D.ce_loss(E.loss_log_probs(student, batches.safety), batches.safety.targets)
    return {"ce": ce, "loss": batches.shares["ce"] * ce}


def anchored_ce_terms(student, frozen: Frozen, batches: E.Batches, cfg: D.LossConfig) -> dict:
    """Cross-entropy on the harmful batch and, weighted lambda_util, on the utility anchor (augment, rto,
    insertion)."""
    terms, utility = ce_terms(student, frozen, batches, cfg), batches.utility
    terms["util"] = D.ce_loss(E.loss_log_probs(student, utility), utility.targets)
    terms["loss"] = terms["loss"] + cfg.lambda_util * batches.shares["util"] * terms["util"]
    return terms


@torch.no_grad()
def teacher_distribution(lp_A, lp_B, targets, index: E.TeacherIndex, frozen: Frozen, cfg: D.LossConfig):
    """The hybrid teacher q (N, V) of every harmful loss position (§5): clean (version 3), contrast (version
    1); for the hard teacher (lam = 1, or --teacher hard) the targets (N,) themselves: one-hot on them, which
    D.targeted_loss reads as -log p_S(y) without building it."""
    if cfg.teacher == "hard" or (cfg.teacher == "clean" and not D.uses_clean_teacher(cfg)):
        return targets
    if cfg.teacher == "contrast":
        return D.contrast_teacher(lp_A, lp_B, targets, cfg.lam, cfg.alpha_t, cfg.beta)
    if cfg.teacher != "clean":
        raise ValueError(f"--teacher {cfg.teacher!r} is not supported; use clean, contrast or hard")
    p_clean = E.loss_log_probs(frozen.aligned, index.clean).exp()  # (N_clean, V): A in the clean contexts
    p_clean = p_clean[index.index]  # (N, V): the clean context each harmful position reads
    mapped = D.word_start_distribution(p_clean, frozen.word_start)  # (N, V)
    p_clean = torch.where(index.word_start[:, None], mapped, p_clean)
    q = D.clean_teacher(p_clean, targets, cfg.lam)  # (N, V)
    return torch.where(index.soft[:, None], q, D.hard_labels(targets, q.shape[-1]))


# ----------------------------------------------------------------------------------------------
# 2. Batches (seeded by the step, so a resumed run replays the same data; data/examples.py makes them)
# ----------------------------------------------------------------------------------------------
def make_batches(step: int, data: E.Data, student, run: RunConfig, cfg: D.LossConfig) -> E.Batches:
    """The step's harmful and utility batches. Every random draw is made for the whole global batch (seeded by
    the step); process r keeps examples r, r + world, ..., so any number of processes sees the same data."""
    rank, world = distributed.world_info()
    method = METHODS[run.method]
    rng = random.Random(run.seed * 1_000_003 + step)
    draws = []
    for _ in range(run.batch_size):
        row = data.safety[rng.randrange(len(data.safety))]
        draws.append((row, method.draw(rng, row, data, run, cfg)))
    n_benign = run.utility_batch_size if data.benign else 0  # finetune: the attacker anchors nothing
    benign = [data.benign[rng.randrange(len(data.benign))] for _ in range(n_benign)]
    safety, teacher = method.batch(data.tok, draws[rank::world], student, cfg, run.device)
    utility = [E.answer_example(data.tok, r["prompt"], r["response"]) for r in benign[rank::world]]
    utility = E.collate(utility, data.tok.pad_id, run.device) if utility else None
    s_share = distributed.token_share(safety.targets)
    shares = {name: s_share for name in ("kd", "kd_dense", "kd_recovery", "pen", "bf_mass_S", "ce", "safety")}
    shares["util"] = distributed.token_share(utility.targets) if utility else 1.0
    return E.Batches(safety, utility, teacher, shares)


# ----------------------------------------------------------------------------------------------
# 3. The methods
# ----------------------------------------------------------------------------------------------
class Method(NamedTuple):
    """A training method (docs/method.md §5-§6): what each harmful row draws, the harmful batch made of the
    draws, the loss, and which frozen models it reads."""

    draw: Callable  # (rng, row, data, run, cfg) -> the row's draw: a prefix length k, or splices
    batch: Callable  # (tok, draws [(row, draw)], student, cfg, device) -> (Batch, TeacherIndex | None)
    loss: Callable  # (student, frozen, batches, cfg) -> {term: (), ..., "loss": ()}
    frozen: tuple = ()  # the frozen models its loss reads: "base", "aligned"
    anchor: str = "data"  # its default utility anchor (--anchor), as its authors anchor
    teacher: bool = False  # reads LossConfig.teacher (§5): the clean teacher's own refusals as recoveries
    own_answers: bool = False  # its draws splice the aligned model's own answers
    attacker: bool = False  # the attacker's fine-tuning (§7): the data's answers, no recoveries, no anchor


METHODS = {  # name: its draws and harmful batch (data/examples.py), its loss, the frozen models it reads
    "targeted": Method(
        E.draw_uniform, E.targeted_batch, targeted_terms, ("base", "aligned"), "base-prompts", teacher=True
    ),
    "sft": Method(E.draw_none, E.recovery_batch, ce_terms),
    "augment": Method(E.draw_augment, E.recovery_batch, anchored_ce_terms),
    "rto": Method(E.draw_uniform, E.dense_batch, anchored_ce_terms),
    "constrained": Method(E.draw_uniform, E.answer_batch, constrained_terms, ("aligned",)),
    "insertion": Method(E.draw_splices, E.insertion_batch, anchored_ce_terms, own_answers=True),
    "finetune": Method(E.draw_uniform, E.answer_batch, ce_terms, attacker=True),
}


# ----------------------------------------------------------------------------------------------
# 4. Configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunConfig:
    """One training run: the method, the data, the optimisation and the hardware (the objective's own settings
    are deepalign.LossConfig). A resumed run must match its checkpoint in both (but the fields RESUMABLE)."""

    method: str = setting("targeted", "the training objective", choices=tuple(METHODS))
    base: str = setting("", "base model folder (real models)", shown="the world's base")
    aligned: str = setting("", "aligned model folder, the student's start", shown="the world's aligned")
    data: str = setting(
        "",
        "harmful rows with responses, any layout of docs/method.md §9",
        shown="the world's safety_train.jsonl",
    )
    benign: str = setting(
        "", "benign prompts, with or without responses", shown="the world's benign_train.jsonl"
    )
    anchor: str = setting(
        "base-prompts",
        "the utility anchor: the --benign file's responses; the aligned model's own greedy answers to its "
        "prompts; or the file joined by prompts the base model writes, answered by the aligned model "
        "(docs/development.md §6-7; generated once, cached in the run folder)",
        choices=("data", "own", "base-prompts"),
        shown="base-prompts for targeted, data for the baselines, as their authors anchor",
    )
    anchor_prompts: int = setting(
        2000, "--anchor base-prompts: prompts the base model writes (before dropping refused ones)"
    )
    anchor_writer: str = setting(
        "base",
        "--anchor base-prompts: the model that writes the prompts (aligned: Magpie's choice, for a base "
        "checkpoint whose chat-format tokens are untrained, e.g. Llama 3's)",
        choices=("base", "aligned"),
    )
    anchor_check: str = setting(
        "greedy too",
        "--anchor base-prompts: drop a written prompt the aligned model refuses in its sampled answer, or in "
        "its sampled or its greedy one",
        choices=("sampled", "greedy too"),
    )
    anchor_exclude: tuple = setting(
        (),
        "--anchor base-prompts: prompt files (e.g. the evaluation's) whose prompts are never anchors",
        type=str,
        shown="none; on a toy world its benign_eval.jsonl and harmful_eval.jsonl",
    )
    out: str = setting("runs/targeted", "run folder", shown="runs/<method>")
    steps: int = setting(150, "optimizer steps")
    batch_size: int = setting(16, "harmful examples per step")
    utility_batch_size: int = setting(16, "benign examples per step")
    grad_accum: int = setting(1, "micro-batches per step")
    lr: float = setting(3e-4, "peak learning rate")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    warmup: float = setting(0.05, "warmup, as a fraction of the steps")
    clip: float = setting(1.0, "gradient-norm clipping")
    seed: int = setting(0, "seed of the batches")
    save_every: int = setting(50, "checkpoint every N steps")
    save_at: tuple = setting(
        (),
        "also save the model after these steps, as OUT/step-N (budget curves, fine-tuning attacks)",
        type=int,
    )
    stop_after: int = setting(0, "stop with a checkpoint after this step (0: never)")
    insert_candidates: int = setting(4, "insertion: candidate splices per example")
    dtype: str = setting("float32", "weights and activations", choices=cli.DTYPE_NAMES)
    device: str = setting("cpu", "torch device", shown="cuda if available, else cpu")
    lora_rank: int = setting(0, "LoRA rank (0: full fine-tuning)")
    lora_alpha: float = setting(0.0, "LoRA alpha (0: 2 * rank)")
    checkpointing: bool = setting(False, "activation checkpointing per block")
    compile: bool = setting(False, "torch.compile the student")
    save_dtype: str = setting(
        "",
        "dtype of the saved model",
        choices=cli.DTYPE_NAMES,
        shown="float32 after a LoRA merge, else --dtype",
    )


RESUMABLE = ("out", "save_every", "save_at", "stop_after", "device", "compile")  # may differ on --resume
GROUPS = {  # RunConfig's flags in --help, by group (the others come first; the objective's are LossConfig's)
    "optimisation": ("steps", "batch_size", "utility_batch_size", "grad_accum", "lr", "weight_decay")
    + ("warmup", "clip", "seed", "save_every", "save_at", "stop_after"),
    "the objective (docs/method.md §5-§6)": ("insert_candidates",),
    "hardware": ("dtype", "device", "save_dtype", "lora_rank", "lora_alpha", "checkpointing", "compile"),
}


def check_run(run: RunConfig, world: int):
    """The settings train.py cannot run with, as one-line errors."""
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


# ----------------------------------------------------------------------------------------------
# 5. The training loop
# ----------------------------------------------------------------------------------------------
class Student(NamedTuple):
    """The model being trained and what updates it."""

    model: nn.Module  # what is saved and checkpointed
    forward: Callable  # the model, or torch.compile of it (--compile)
    params: list  # its trainable parameters
    masters: list  # what AdamW updates: float32 copies of bf16 parameters (else the parameters)
    opt: torch.optim.Optimizer


def train(run: RunConfig, loss_cfg: D.LossConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train run.method's student on the objective; write the run folder (out) and return it."""
    rank, world = distributed.init_distributed(run.device)
    check_run(run, world)
    torch.manual_seed(run.seed)  # LoRA's initial adapters
    out = prepare_out(Path(run.out), resume, overwrite) if rank == 0 else Path(run.out)
    distributed.barrier()
    S, frozen, data = build(run, loss_cfg, out, rank, world)
    configs = {"run": run, "loss": loss_cfg}
    start = start_run(out, resume, S.model, S.masters, S.opt, configs, RESUMABLE)
    S.model.train()
    bar = progress_bar(range(start, run.steps), f"train {run.method}", rank, initial=start, total=run.steps)
    for step in bar:
        t0 = time.perf_counter()
        lr = get_lr(step, run.steps, run.lr, warmup_frac=run.warmup, floor=0.0)
        for group in S.opt.param_groups:
            group["lr"] = lr
        S.opt.zero_grad(set_to_none=True)
        logged = {}
        for micro in range(run.grad_accum):
            batches = make_batches(step * run.grad_accum + micro, data, S.forward, run, loss_cfg)
            terms = step_losses(run.method, S.forward, frozen, batches, loss_cfg)
            check_finite(terms, step + 1)
            (terms["loss"] / run.grad_accum).backward()
            grads_to_masters(S.params, S.masters)
            for k, v in distributed.global_values(terms, batches.shares).items():
                logged[k] = logged.get(k, 0.0) + v / run.grad_accum
        grad_norm = optimizer_step(S.params, S.masters, S.opt, run.clip)
        record = {"step": step + 1, **{k: round(v, 6) for k, v in logged.items()}}
        record.update(grad_norm=round(grad_norm, 4), lr=lr, seconds=round(time.perf_counter() - t0, 3))
        if rank == 0:
            with open(out / "train_log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        shown = {k: f"{logged[k]:.3f}" for k in ("loss", "kd", "pen", "util", "ce") if k in logged}
        bar.set_postfix(shown, refresh=False)
        if step + 1 in run.save_at and step + 1 < run.steps:
            save_snapshot(S.model, run, out / f"step-{step + 1}", rank, world)
        stopping = run.stop_after and step + 1 == run.stop_after
        if stopping or ((step + 1) % run.save_every == 0 and step + 1 < run.steps):
            save_checkpoint(out / CHECKPOINT, step + 1, S.model, S.masters, S.opt, configs)
        if stopping:
            if rank == 0:
                log(f"stopped after step {step + 1} (--stop-after); continue with --resume")
            distributed.finish_distributed()
            return out
    S.model.eval()
    save_final(S.model, run, out, rank, world)
    distributed.finish_distributed()
    return out


def build(run: RunConfig, cfg: D.LossConfig, out: Path, rank: int, world: int) -> tuple:
    """The student (with LoRA adapters if asked), the frozen models its method reads, and the data (what the
    files lack made by the aligned model: load_data); under several processes every model sharded alike."""
    method = METHODS[run.method]
    tok, device = Tokenizer(run.aligned), torch.device(run.device)
    D.check_same_tokenizer(tok, Tokenizer(run.base))
    student = load_model(run.aligned, DTYPES[run.dtype], device)
    writes = run.anchor == "base-prompts" and run.anchor_writer == "base" and not method.attacker
    base = load_model(run.base, DTYPES[run.dtype], device) if "base" in method.frozen or writes else None
    own = method.teacher and cfg.teacher == "clean"  # §5 version 3: A's own refusals as recoveries
    safety, benign = load_data(run, tok, student, out, rank, own_recoveries=own, base=base)
    base = base if "base" in method.frozen else None  # otherwise only the writer of the anchor's prompts
    if base is not None and base.args.vocab_size != student.args.vocab_size:
        V_B, V_A = base.args.vocab_size, student.args.vocab_size
        raise ValueError(
            f"{run.base} has vocab_size {V_B} but {run.aligned} has {V_A}; base and aligned must share one "
            "vocabulary"
        )
    if run.lora_rank:
        add_lora(student, run.lora_rank, run.lora_alpha or 2 * run.lora_rank)
    aligned = None  # under LoRA the student with its adapters off is exactly A: no third copy
    if "aligned" in method.frozen:
        a = student if run.lora_rank else load_model(run.aligned, DTYPES[run.dtype], device)
        aligned = FrozenAligned(a, adapters_off=bool(run.lora_rank))
    copies = [m for m in (base, aligned.model if aligned and not run.lora_rank else None) if m is not None]
    for m in copies:
        m.requires_grad_(False).eval()
    student.checkpointing = run.checkpointing
    valid = tok.real_token_mask(student.args.vocab_size).to(device)
    clean = method.teacher and D.uses_clean_teacher(cfg)  # word_start: for the clean teacher's soft part
    word_start = E.word_start_ids(tok, student.args.vocab_size).to(device) if clean else None
    own_answers = own_refusals(student, tok, safety, rank) if method.own_answers else {}
    if world > 1:  # FSDP: shard the student and the frozen models alike
        for m in [student] + copies:
            distributed.shard(m)
    params = [p for p in student.parameters() if p.requires_grad]
    masters = fp32_masters(params)
    opt = torch.optim.AdamW(masters, lr=run.lr, betas=(0.9, 0.95), weight_decay=run.weight_decay)
    forward = torch.compile(student, dynamic=True) if run.compile else student
    S = Student(student, forward, params, masters, opt)
    return S, Frozen(base, aligned, valid, word_start), E.Data(tok, safety, benign, own_answers)


# ----------------------------------------------------------------------------------------------
# 6. Data, and the data the aligned model makes itself
# ----------------------------------------------------------------------------------------------
def load_data(
    run: RunConfig, tok, aligned, out: Path, rank: int, own_recoveries: bool = False, base=None
) -> tuple[list, list]:
    """The harmful rows (with harmful responses) and the benign rows; recoveries and benign responses the
    files lack are the aligned model's own (generated on process 0, cached in the run folder). With
    own_recoveries (targeted's clean teacher, docs/method.md §5 version 3) every recovery is A's own greedy
    answer to the bare prompt, whatever the file holds; so is every benign answer with run.anchor "own", and
    with "base-prompts" the benign rows are joined by prompts the base model writes (written_anchors). The
    attacker's fine-tuning (§7, finetune) trains on the file's answers alone ("response" if no
    "harmful_response"): no recoveries, no anchor."""
    attacker = METHODS[run.method].attacker
    rows = formats.read_prompts(run.data, "harmful")
    if attacker:
        rows = [{**r, "harmful_response": r.get("harmful_response") or r.get("response")} for r in rows]
    safety = [r for r in rows if r.get("harmful_response")]
    if own_recoveries:
        safety = [{k: v for k, v in r.items() if k != "recovery"} for r in safety]
    if not safety:
        raise ValueError(
            f"{run.data}: no row has a harmful response; training needs (prompt, harmful "
            "response) pairs (e.g. our JSONL, AdvBench's goal,target, HEx-PHI with responses)"
        )
    benign = formats.read_prompts(run.benign, "benign")
    if attacker:
        return safety, []
    if run.anchor == "own":  # the anchor follows the aligned model's own answers (docs/development.md §5)
        benign = [{k: v for k, v in r.items() if k != "response"} for r in benign]
    model, writer = (aligned, base if run.anchor_writer == "base" else aligned) if rank == 0 else (None, None)
    if rank > 0:  # the other processes read what process 0 generated
        distributed.barrier()
    fill_missing(safety, "recovery", tok, model, out / "generated_recoveries.jsonl")
    fill_missing(benign, "response", tok, model, out / "generated_responses.jsonl")
    written = written_anchors(run, tok, writer, model, out / WRITTEN) if run.anchor == "base-prompts" else []
    if rank == 0:
        distributed.barrier()
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
    for i in progress_bar(range(0, len(todo), batch_size), f"generate {key}s", disable=not todo):
        prompts = todo[i : i + batch_size]
        outs = generate(model, [tok.prompt_ids(p) for p in prompts], Sampling(64), tok.eos_ids, tok.pad_id)
        cached.update(
            zip(prompts, [tok.decode([t for t in o if t not in tok.eos_ids]).strip() for o in outs])
        )
    if todo:
        write_jsonl(cache, [{"prompt": p, key: cached[p]} for p in sorted(cached)])
        log(f"{cache}: {len(todo)} answers ({key}) generated by the aligned model")
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
    model (sampled, T = 1); kept iff the answer is not a refusal (refusal_phrase_judge: no oracle; with
    anchor_check "greedy too" neither is A's greedy answer), the prompt is new and in no file of
    run.anchor_exclude. Generated once (writer given: process 0), cached, and reused."""
    if cache.exists():
        return read_jsonl(cache, ["prompt", "response"])
    if writer is None:
        raise FileNotFoundError(f"{cache}: the written anchors are missing (process 0 writes them)")
    excluded = {r["prompt"] for f in run.anchor_exclude for r in formats.read_prompts(f, "benign")}
    opening = user_turn_opening(tok)
    stops = [tok.end_of_turn_id, *tok.eos_ids]
    rows, seen = [], set(excluded)
    for i in progress_bar(range(0, run.anchor_prompts, batch_size), "write anchors"):
        n = min(batch_size, run.anchor_prompts - i)
        seed = run.seed * 1_000_003 + i
        written = generate(writer, [opening] * n, Sampling(64, temperature=1.0, seed=seed), stops, tok.pad_id)
        prompts = [tok.decode([t for t in w if t not in stops]).split("\n\n")[0].strip() for w in written]
        prompts = [p for p in dict.fromkeys(prompts) if p and p not in seen]
        seen.update(prompts)
        if not prompts:
            continue
        ids, sampled = [tok.prompt_ids(p) for p in prompts], Sampling(128, temperature=1.0, seed=seed + 1)
        answers = generate(aligned, ids, sampled, tok.eos_ids, tok.pad_id)
        texts = [tok.decode([t for t in a if t not in tok.eos_ids]).strip() for a in answers]
        answered = [refusal_phrase_judge(t) for t in texts]  # True: non-empty and no refusal phrase
        if run.anchor_check == "greedy too":  # A's own preference, not a lucky sample, decides
            greedy = generate(aligned, ids, Sampling(32), tok.eos_ids, tok.pad_id)
            answered = [a and refusal_phrase_judge(tok.decode(g)) for a, g in zip(answered, greedy)]
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
    for i in progress_bar(range(0, len(prompts), 64), "own answers", rank=rank):
        ids = [tok.prompt_ids(p) for p in prompts[i : i + 64]]
        outs = generate(model, ids, Sampling(24), tok.eos_ids, tok.pad_id)
        answers.update(zip(prompts[i : i + 64], outs))
    return answers


# ----------------------------------------------------------------------------------------------
# 7. Command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = cli.parser(__doc__)
    cli.add_world_flag(p)
    grouped = {name for names in GROUPS.values() for name in names}
    cli.add_settings(p, RunConfig, skip=grouped)
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--resume", action="store_true", help="continue the run folder's checkpoint")
    for title, names in GROUPS.items():
        g = p.add_argument_group(title)
        if title.startswith("the objective"):
            cli.add_settings(g, D.LossConfig)
        cli.add_settings(g, RunConfig, skip=[f.name for f in fields(RunConfig) if f.name not in names])
    # computed when left out (configs): the method's anchor, out = runs/<method>, the toy world's files
    p.set_defaults(anchor=None, anchor_exclude=None, out=None)
    p.set_defaults(device="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


EVAL_FILES = ("benign_eval.jsonl", "harmful_eval.jsonl")


def configs(args) -> tuple[RunConfig, D.LossConfig]:
    """The run's and the objective's settings from the flags, with what the flags leave to be computed: the
    given folders and files or a toy world's (never a mix: real_or_toy), the method's own anchor, out =
    runs/<method>, and on a toy world an anchor that never holds an evaluation prompt."""
    real = real_or_toy(args, ("base", "aligned", "data", "benign"))
    anchor = args.anchor or METHODS[args.method].anchor
    computed = dict(anchor=anchor, out=args.out or f"runs/{args.method}")
    computed["anchor_exclude"] = tuple(args.anchor_exclude or ())
    if not real:
        paths = TW.ensure_world(args.world)
        computed.update(base=str(paths["base"]), aligned=str(paths["aligned"]))
        computed.update(data=str(paths["data"] / "safety_train.jsonl"))
        computed.update(benign=str(paths["data"] / "benign_train.jsonl"))
        if args.anchor_exclude is None and anchor == "base-prompts":  # decontaminate: the evaluation's
            computed["anchor_exclude"] = tuple(str(paths["data"] / f) for f in EVAL_FILES)
    return cli.settings_from(RunConfig, args, **computed), cli.settings_from(D.LossConfig, args)


def main(argv=None):
    args = parse_args(argv)
    run, loss = configs(args)
    return train(run, loss, resume=args.resume, overwrite=args.overwrite)


if __name__ == "__main__":
    cli.run(main)
