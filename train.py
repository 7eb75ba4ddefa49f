"""Targeted completion: fine-tune an aligned model so that safety holds at every response position.

    python train.py                                   # targeted completion on the toy world
    python train.py --base DIR --aligned DIR --data safety.jsonl --benign benign.jsonl --out runs/x \
                    --dtype bfloat16 --lora-rank 16 --checkpointing
    torchrun --nproc_per_node 4 train.py ...          # FSDP: every model sharded over 4 GPUs (or CPU processes)

The student S starts from the aligned model A; A and the base model B stay frozen (eval mode, no gradients)
and read exactly the student's contexts. Methods (METHOD §5-6), all on the same data and loop:

  targeted     hybrid-teacher distillation + adaptive penalty on base-favored tokens + utility KL   (the paper)
  sft          cross-entropy on refusals to harmful prompts only (the shallow recipe the paper diagnoses)
  augment      Qi et al.'s data augmentation: cross-entropy on (prompt, harmful prefix, recovery) + benign CE
  constrained  Qi et al.'s token-wise constrained objective on harmful fine-tuning data (+ benign)
  insertion    worst-insertion training (after arXiv 2606.04168): a harmful span spliced into the model's own
               refusal, then recovery; of several candidate splices, the one whose harmful continuation the
               student finds most likely is trained on

Data: safety triplets {"prompt", "harmful_response", "recovery"} (--data) and benign pairs {"prompt",
"response"} (--benign), JSONL (data/toyworld.py documents the schema). Each step draws a safety batch of
(prompt, harmful prefix of random length k ~ U{0..K}, recovery) and a utility batch of benign pairs, seeded by
(seed, step), so a resumed run sees exactly the batches an uninterrupted one would.

Output (--out): a Hugging Face folder (LoRA merged) that eval.py, decode.py and transformers load, beside
train_log.jsonl (every loss term, every step) and train_args.json; checkpoint/ every --save-every steps
(torch.distributed.checkpoint, written atomically; --resume continues from it, with any number of processes).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import deepalign as D
from data import toyworld
from model import DTYPES, Tokenizer, generate, load_model, log, save_model

METHODS = ("targeted", "sft", "augment", "constrained", "insertion")


# ----------------------------------------------------------------------------------------------
# LoRA: a low-rank update on the attention and MLP projections, W x + (alpha / r) B A x
# ----------------------------------------------------------------------------------------------
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))  # fp32
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))  # 0: starts as W
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.enabled = True

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:  # the frozen aligned teacher is the student with adapters off
            return y
        return y + ((x.to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T) * self.scale).to(y.dtype)

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            delta = (self.lora_B @ self.lora_A) * self.scale  # (out, in) fp32
            self.base.weight.copy_((self.base.weight.float() + delta).to(self.base.weight.dtype))
        return self.base


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


def merge_lora(model):
    """Fold each adapter into its weight and put the plain nn.Linear back (same names as the checkpoint)."""
    for module in list(model.modules()):
        for name in LORA_TARGETS:
            child = getattr(module, name, None)
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())


# ----------------------------------------------------------------------------------------------
# Mixed precision: bf16/fp16 weights for the forward and backward, float32 master weights for the update
# ----------------------------------------------------------------------------------------------
def fp32_masters(params: list) -> list:
    """The tensors the optimizer updates: a float32 copy of each low-precision trainable parameter, the parameter
    itself when it is float32 already (LoRA adapters, --dtype float32). Needed because an AdamW step of
    lr = 1e-5 is far below half a bf16 ulp of a typical weight (|w| = 0.02 has ulp 1.2e-4): updated in place,
    bf16 weights would not move at all. The same scheme as DeepSpeed's and Megatron's bf16 optimizers."""
    return [p if p.dtype == torch.float32 else p.detach().float() for p in params]


def grads_to_masters(params: list, masters: list):
    """Add each parameter's gradient into its float32 master's (freeing the low-precision one). Called after
    every micro-batch's backward, so gradient accumulation sums in float32, not in bf16."""
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
    """Gradients to the masters (what is left of them), clip their global norm, AdamW step, masters back to the
    weights. Returns the gradient norm before clipping (of the whole model under FSDP)."""
    grads_to_masters(params, masters)
    grad_norm = torch.nn.utils.clip_grad_norm_(masters, clip)
    opt.step()
    masters_to_params(params, masters)
    return (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()


# ----------------------------------------------------------------------------------------------
# Several processes: torch's FSDP (fully_shard) shards every model; these helpers keep the math global
# ----------------------------------------------------------------------------------------------
def world_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (or `op`) over processes; the identity in a single process."""
    if world_info()[1] > 1:
        x = x.clone()
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def token_share(batch) -> float:
    """(this process's loss tokens / all processes' loss tokens) * world size. Scaling a per-token mean by it
    makes FSDP's gradient average equal the gradient of the global batch's per-token mean."""
    world = world_info()[1]
    if world == 1:
        return 1.0
    n = torch.tensor(float(len(batch[3])), device=batch[3].device)  # on the device: NCCL reduces GPU tensors only
    return (n * world / all_reduce(n)).item()


def shard(model):
    """FSDP2: each transformer block its own unit, then the rest (embedding, final norm, head)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


# ----------------------------------------------------------------------------------------------
# Examples: token ids, the positions that carry loss, their targets and response positions
# ----------------------------------------------------------------------------------------------
def recovery_example(tok, row: dict, k: int, answer_ids=None):
    """(ids, loss mask, response positions): prompt + first k harmful tokens (or `answer_ids`) + recovery + end
    of turn, loss on the recovery and the end-of-turn token. Token-level concatenation, as generation sees it."""
    head, harm = D.response_split(tok, row["prompt"], row["harmful_response"])
    prefix = list(answer_ids) if answer_ids is not None else harm[:k]
    sep = " " if prefix and not tok.decode(prefix).endswith((" ", "\n")) else ""
    target = tok.encode(sep + row["recovery"]) + [tok.end_of_turn_id]
    ids = head + prefix + target
    mask = [0] * (len(head) + len(prefix)) + [1] * len(target)
    return ids, mask, len(head)


def answer_example(tok, prompt: str, response: str):
    """(ids, loss mask, response start): prompt + response + end of turn, loss on the response."""
    head, resp = D.response_split(tok, prompt, response)
    ids = head + resp + [tok.end_of_turn_id]
    return ids, [0] * len(head) + [1] * (len(resp) + 1), len(head)


def collate(examples, pad_id: int, device):
    """Right-padded ids (B, T) and, per loss token (N of them): batch row, index of the logit that predicts it
    (position - 1), target id, and response position t (counted from the start of the answer)."""
    T = max(len(ids) for ids, _, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    rows, cols, pos = [], [], []
    for b, (seq, mask, start) in enumerate(examples):
        ids[b, : len(seq)] = torch.tensor(seq)
        for i, m in enumerate(mask):
            if m:
                rows.append(b), cols.append(i - 1), pos.append(i - start)
    rows, cols = torch.tensor(rows), torch.tensor(cols)
    return ids.to(device), rows.to(device), cols.to(device), ids[rows, cols + 1].to(device), torch.tensor(pos, device=device)


def loss_logprobs(model, batch):
    """Log-probs (N, V) float32 at the loss positions only (the head never computes the whole (B, T, V))."""
    ids, rows, cols, _, _ = batch
    return D.log_probs(model(ids, logits_at=(rows, cols)))


# ----------------------------------------------------------------------------------------------
# The losses of one step, per method
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def frozen_logprobs(model, batch, student):
    """Log-probs of a frozen model. "adapters-off": the LoRA student with its adapters switched off, which is
    exactly the aligned model (so only two weight copies are held: student and base)."""
    if model == "adapters-off":
        set_lora(student, False)
        try:
            return loss_logprobs(student, batch)
        finally:
            set_lora(student, True)
    return loss_logprobs(model, batch)


def step_losses(method, student, teacher_A, base, safety, utility, args, valid):
    """Every loss term of one step (per-token means over this process's tokens), and "loss", what is minimised:
    with several processes, each mean is weighted by this process's token share (see token_share)."""
    ones = lambda b: torch.ones_like(b[3], dtype=torch.float)  # noqa: E731  every gathered token counts
    s_share, u_share = token_share(safety), token_share(utility)
    terms = {}
    if method == "targeted":
        lp_S = loss_logprobs(student, safety)
        lp_A, lp_B = frozen_logprobs(teacher_A, safety, student), frozen_logprobs(base, safety, student)
        y, pos = safety[3], safety[4]
        bf = D.base_favored_mask(lp_A, lp_B, args.tau, args.top_k, valid)  # (N, V)
        q = D.hybrid_teacher(lp_A, lp_B, y, args.lam, args.alpha_t, args.beta)
        m_A = D.bf_mass(lp_A, bf)  # (N,) the aligned model's incompleteness at each loss position
        mean = all_reduce(m_A.sum()) / all_reduce(torch.tensor(float(len(m_A)), device=m_A.device))  # global batch
        T = all_reduce(pos.max().float(), dist.ReduceOp.MAX)  # the global batch's last position
        w = D.adaptive_weights(m_A, ones(safety), args.w_max, args.penalty_weight, args.gamma, pos, mean=mean, T=T)
        terms["kd"] = D.kd_loss(q, lp_S, ones(safety))
        terms["pen"] = D.bf_penalty(lp_S, bf, w, ones(safety))
        terms["bf_mass_S"] = D.bf_mass(lp_S, bf).mean().detach()
        lp_S_u = loss_logprobs(student, utility)
        lp_A_u = frozen_logprobs(teacher_A, utility, student)
        terms["util"] = D.utility_kl(lp_A_u, lp_S_u, ones(utility))
        terms["loss"] = s_share * (terms["kd"] + args.lambda_pen * terms["pen"]) + args.lambda_util * u_share * terms["util"]
    elif method == "constrained":
        for name, batch in (("safety", safety), ("util", utility)):
            lp_S = loss_logprobs(student, batch)
            lp_A = frozen_logprobs(teacher_A, batch, student)
            beta_t = D.qi_beta_schedule(batch[4])
            terms[name] = D.constrained_loss(lp_S, lp_A, batch[3], beta_t, ones(batch))
        terms["loss"] = s_share * terms["safety"] + u_share * terms["util"]
    else:  # sft, augment, insertion: cross-entropy
        terms["ce"] = D.ce_loss(loss_logprobs(student, safety), safety[3], ones(safety))
        terms["loss"] = s_share * terms["ce"]
        if method != "sft":
            terms["util"] = D.ce_loss(loss_logprobs(student, utility), utility[3], ones(utility))
            terms["loss"] = terms["loss"] + args.lambda_util * u_share * terms["util"]
    shares = {k: (u_share if k == "util" else 1.0 if k == "loss" else s_share) for k in terms}
    return terms, shares


# ----------------------------------------------------------------------------------------------
# Batches (seeded by step, so resuming replays the same data order)
# ----------------------------------------------------------------------------------------------
def prefix_length(rng: random.Random, method: str, K: int) -> int:
    """k for a safety example: 0 for sft; Qi et al.'s augmentation takes k = 0 half the time, else U[1, K];
    targeted/insertion/constrained draw k ~ U{0..K} (METHOD §5)."""
    if method == "sft":
        return 0
    if method == "augment":
        return 0 if K < 1 or rng.random() < 0.5 else rng.randint(1, K)
    return rng.randint(0, K)


def insertion_candidates(tok, row, own: list[int], rng: random.Random, n: int):
    """n random splices: the model's own answer cut after j tokens, then m harmful tokens from offset a.
    Returns [(answer prefix ids, the next harmful tokens)]."""
    _, harm = D.response_split(tok, row["prompt"], row["harmful_response"])
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
    """The candidate splice whose next harmful tokens the student finds most likely (one forward each, always,
    so that sharded ranks run the same number of forwards)."""
    head = tok.prompt_ids(row["prompt"])
    scores = []
    for prefix, cont in candidates:
        ids = torch.tensor([head + prefix + (cont or [tok.pad_id])], device=device)
        lp = D.log_probs(student(ids)[0, len(head) + len(prefix) - 1 : -1])  # (len(cont), V)
        score = lp.gather(-1, torch.tensor(cont, device=device)[:, None]).sum().item() if cont else float("-inf")
        scores.append(score)
    return candidates[max(range(len(candidates)), key=scores.__getitem__)][0]


def make_batches(step, tok, safety_rows, benign_rows, own_answers, student, args, device, rank=0, world=1):
    """The step's safety and utility batches. Every random draw is made for the whole global batch (seeded by
    the step), then rank r keeps examples r, r + world, ...: any number of processes sees the same data."""
    rng = random.Random(args.seed * 1_000_003 + step)
    draws = []
    for _ in range(args.batch_size):
        row = safety_rows[rng.randrange(len(safety_rows))]
        if args.method == "insertion":
            draws.append((row, insertion_candidates(tok, row, own_answers[row["prompt"]], rng, args.insert_candidates)))
        else:
            draws.append((row, prefix_length(rng, args.method, args.max_prefix)))
    benign = [benign_rows[rng.randrange(len(benign_rows))] for _ in range(args.utility_batch_size)]
    examples = []
    for row, draw in draws[rank::world]:
        if args.method == "constrained":  # harmful fine-tuning data: the harmful response is the target
            examples.append(answer_example(tok, row["prompt"], row["harmful_response"]))
        elif args.method == "insertion":
            examples.append(recovery_example(tok, row, 0, answer_ids=worst_insertion(student, tok, row, draw, device)))
        else:
            examples.append(recovery_example(tok, row, draw))
    utility = [answer_example(tok, r["prompt"], r["response"]) for r in benign[rank::world]]
    return collate(examples, tok.pad_id, device), collate(utility, tok.pad_id, device)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
CHECKPOINT = "checkpoint"  # a folder inside the run folder
RESUME_KEYS = ("method", "seed", "lora_rank", "lora_alpha", "batch_size", "utility_batch_size", "grad_accum", "lr",
               "steps", "warmup", "weight_decay", "clip", "dtype", "max_prefix", "insert_candidates", "lam", "alpha_t",
               "beta", "tau", "top_k", "penalty_weight", "w_max", "gamma", "lambda_pen", "lambda_util", "data", "benign")


def checkpoint_state(step, student, masters, opt, sched, args) -> dict:
    """What a resumed run needs: the float32 masters by parameter name (under FSDP, each process's shards),
    AdamW's and the schedule's state, the step, and the settings (as JSON, checked on resume)."""
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    return {"step": step, "trainable": dict(zip(names, masters)), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "args": json.dumps(vars(args), sort_keys=True)}


def barrier():
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(path: Path, step, student, masters, opt, sched, args):
    """Written with torch.distributed.checkpoint: every process writes its own shards, and any number of
    processes can read them back (it reshards on load). Written to a temporary folder that replaces `path` only
    when complete, so a kill mid-write leaves the previous checkpoint intact."""
    import torch.distributed.checkpoint as dcp

    rank, _ = world_info()
    tmp, old = path.with_name(f"{path.name}.tmp"), path.with_name(f"{path.name}.old")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    with warnings.catch_warnings():  # one process: dcp warns that it assumes so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(checkpoint_state(step, student, masters, opt, sched, args), checkpoint_id=tmp,
                 no_dist=not dist.is_initialized())
    barrier()
    if rank == 0:
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def init_optimizer_state(opt):
    """Give AdamW its state tensors (zeros) with a step of lr 0 on zero gradients, which moves nothing:
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


def load_checkpoint(path: Path, student, masters, opt, sched, args) -> int:
    import torch.distributed.checkpoint as dcp

    init_optimizer_state(opt)
    state = checkpoint_state(0, student, masters, opt, sched, args)
    state["args"] = ""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())  # masters and AdamW state, in place
    saved = json.loads(state["args"])
    for key in RESUME_KEYS:
        if saved.get(key) != getattr(args, key):
            raise ValueError(f"{path}: checkpoint has {key}={saved.get(key)!r} but this run has "
                             f"{getattr(args, key)!r}; resume with the original settings or start with --overwrite")
    masters_to_params([p for p in student.parameters() if p.requires_grad], masters)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return state["step"]


# ----------------------------------------------------------------------------------------------
# Main loop
# ----------------------------------------------------------------------------------------------
def prepare_out(args) -> Path:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if args.resume and (out / CHECKPOINT).exists():
            return out
        if args.resume:
            raise FileNotFoundError(f"{out} has no {CHECKPOINT}/ to resume (a finished run, or another folder); "
                                    "pass --overwrite to start it again")
        if not args.overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it, or --resume to "
                                  "continue its checkpoint")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_data(args):
    toy = None
    if not (args.base and args.aligned and args.data and args.benign):
        toy = toyworld.ensure_toy_world()
    args.base, args.aligned = str(args.base or toy["base"]), str(args.aligned or toy["aligned"])
    args.data = str(args.data or toy["data"] / "safety_train.jsonl")
    args.benign = str(args.benign or toy["data"] / "benign_train.jsonl")
    safety = toyworld.read_jsonl(args.data, ["prompt", "harmful_response"] + (["recovery"] if args.method != "constrained" else []))
    benign = toyworld.read_jsonl(args.benign, ["prompt", "response"])
    return safety, benign


def init_distributed(args) -> tuple[int, int]:
    """Under `torchrun --nproc_per_node N`, join the process group (NCCL on GPUs, gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if args.device.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            args.device = f"cuda:{local}"
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    rank, world = world_info()
    if args.dtype == "float16":
        raise ValueError("--dtype float16: training in float16 needs loss scaling, which train.py does not do; "
                         "use --dtype bfloat16 (or float32)")
    if world > 1 and args.compile:
        raise ValueError("--compile is a single-process option for now; run without it under torchrun")
    if world > 1 and (args.batch_size % world or args.utility_batch_size % world):
        raise ValueError(f"--batch-size {args.batch_size} and --utility-batch-size {args.utility_batch_size} must be "
                         f"multiples of the {world} processes (each process takes an equal share of the global batch)")
    return rank, world


def save_final(student, args, out: Path, rank: int, world: int):
    """Merge LoRA and write the run folder as a Hugging Face folder. With FSDP, every process gathers the full
    weights (a collective) and process 0 writes them into a fresh, unsharded copy of the model."""
    if world > 1:
        full = {n: p.full_tensor().cpu() for n, p in student.named_parameters()}
        if rank != 0:
            return
        student = load_model(args.aligned, DTYPES[args.dtype], "cpu")
        if args.lora_rank:
            add_lora(student, args.lora_rank, args.lora_alpha or 2 * args.lora_rank)
        params = dict(student.named_parameters())
        with torch.no_grad():
            for name, value in full.items():
                params[name].copy_(value)
    if args.lora_rank:
        merge_lora(student)
    tmp = save_model(student, out / f"model.tmp-{os.getpid()}", tokenizer_from=args.aligned, overwrite=True)
    for f in tmp.iterdir():  # the run folder itself becomes the Hugging Face folder
        os.replace(f, out / f.name)
    tmp.rmdir()
    shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
    log(f"wrote {out}")


def train(args) -> Path:
    rank, world = init_distributed(args)
    torch.manual_seed(args.seed)
    safety_rows, benign_rows = load_data(args)
    out = prepare_out(args) if rank == 0 else Path(args.out)
    if world > 1:
        dist.barrier()
    tok, base_tok = Tokenizer(args.aligned), Tokenizer(args.base)
    D.check_same_tokenizer(tok, base_tok)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    student = load_model(args.aligned, dtype, device)
    needs_base = args.method == "targeted"
    base = load_model(args.base, dtype, device) if needs_base else None
    if base is not None and base.args.vocab_size != student.args.vocab_size:
        raise ValueError(f"{args.base} has vocab_size {base.args.vocab_size} but {args.aligned} has "
                         f"{student.args.vocab_size}; base and aligned must share one vocabulary")
    if args.lora_rank:
        add_lora(student, args.lora_rank, args.lora_alpha or 2 * args.lora_rank)
        teacher_A = "adapters-off"  # two weight copies in memory: student(+adapters) and base
    else:
        teacher_A = load_model(args.aligned, dtype, device) if args.method in ("targeted", "constrained") else None
    for frozen in (base, teacher_A):
        if isinstance(frozen, nn.Module):
            frozen.requires_grad_(False).eval()
    student.checkpointing = args.checkpointing
    valid = tok.real_token_mask(student.args.vocab_size).to(device)
    own_answers = {}
    if args.method == "insertion":  # the aligned model's own (greedy) answers, computed once, before sharding
        prompts = sorted({r["prompt"] for r in safety_rows})
        for i in tqdm(range(0, len(prompts), 64), desc="own answers", file=sys.stderr, disable=rank > 0):
            outs = generate(student, [tok.prompt_ids(p) for p in prompts[i : i + 64]], max_new_tokens=24,
                            eos_ids=tok.eos_ids, pad_id=tok.pad_id)
            own_answers.update(zip(prompts[i : i + 64], outs))
    if world > 1:  # FSDP: shard the student and the frozen models alike
        for m in (student, base, teacher_A):
            if isinstance(m, nn.Module):
                shard(m)

    params = [p for p in student.parameters() if p.requires_grad]
    masters = fp32_masters(params)  # what AdamW updates: float32 copies of bf16/fp16 weights, else params
    opt = torch.optim.AdamW(masters, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    warmup = max(1, int(args.warmup * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    start = 0
    if args.resume and (out / CHECKPOINT).exists():
        start = load_checkpoint(out / CHECKPOINT, student, masters, opt, sched, args)
        if rank == 0:
            log(f"resumed from {out / CHECKPOINT} at step {start}")
    if rank == 0:
        log_file = out / "train_log.jsonl"
        kept = [line for line in log_file.read_text().splitlines() if json.loads(line)["step"] <= start] \
            if start and log_file.exists() else []
        log_file.write_text("".join(line + "\n" for line in kept))  # drop steps logged after the checkpoint
        (out / "train_args.json").write_text(json.dumps({**vars(args), "world_size": world}, indent=2))
    model_fn = torch.compile(student, dynamic=True) if args.compile else student

    student.train()
    bar = tqdm(range(start, args.steps), desc=f"train {args.method}", file=sys.stderr, initial=start, total=args.steps,
               mininterval=2.0, disable=rank > 0)
    for step in bar:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logged = {}
        for micro in range(args.grad_accum):
            safety, utility = make_batches(step * args.grad_accum + micro, tok, safety_rows, benign_rows, own_answers,
                                           model_fn, args, device, rank, world)
            terms, shares = step_losses(args.method, model_fn, teacher_A, base, safety, utility, args, valid)
            (terms["loss"] / args.grad_accum).backward()
            grads_to_masters(params, masters)
            for k, v in terms.items():  # the global batch's value of every term
                logged[k] = logged.get(k, 0.0) + all_reduce(v.detach() * shares[k]).item() / world / args.grad_accum
        grad_norm = optimizer_step(params, masters, opt, args.clip)
        sched.step()
        record = {"step": step + 1, **{k: round(v, 6) for k, v in logged.items()}, "grad_norm": round(grad_norm, 4),
                  "lr": sched.get_last_lr()[0], "seconds": round(time.perf_counter() - t0, 3)}
        if rank == 0:
            with open(out / "train_log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        bar.set_postfix({k: f"{v:.3f}" for k, v in logged.items() if k in ("loss", "kd", "pen", "util", "ce")}, refresh=False)
        if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_checkpoint(out / CHECKPOINT, step + 1, student, masters, opt, sched, args)
        if args.stop_after and step + 1 == args.stop_after:  # for tests and demos of --resume
            save_checkpoint(out / CHECKPOINT, step + 1, student, masters, opt, sched, args)
            if rank == 0:
                log(f"stopped after step {step + 1} (--stop-after); continue with --resume")
            if world > 1:
                dist.destroy_process_group()
            return out

    student.eval()
    save_final(student, args, out, rank, world)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="base model folder (default: toy base)")
    p.add_argument("--aligned", help="aligned model folder, the student's start (default: toy aligned)")
    p.add_argument("--method", choices=METHODS, default="targeted")
    p.add_argument("--data", help="safety triplets JSONL {prompt, harmful_response, recovery} (default: toy)")
    p.add_argument("--benign", help="benign pairs JSONL {prompt, response} for utility batches (default: toy)")
    p.add_argument("--out", help="run folder (default: runs/<method>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--resume", action="store_true", help="continue the run folder's checkpoint")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=150)
    g.add_argument("--batch-size", type=int, default=16, help="safety examples per step")
    g.add_argument("--utility-batch-size", type=int, default=16, help="benign examples per step")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup", type=float, default=0.05, help="fraction of steps")
    g.add_argument("--clip", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save-every", type=int, default=50)
    g.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this step")
    m = p.add_argument_group("method (METHOD §5; defaults as stated there)")
    m.add_argument("--max-prefix", type=int, default=40, help="K: harmful prefix length k ~ U{0..K}")
    m.add_argument("--lam", type=float, default=0.5, help="hybrid teacher: weight of the hard recovery label (1 = hard only)")
    m.add_argument("--alpha-t", type=float, default=1.0, help="hybrid teacher: contrast strength")
    m.add_argument("--beta", type=float, default=0.1, help="hybrid teacher: V_head plausibility threshold")
    m.add_argument("--tau", type=float, default=1.0, help="base-favored threshold")
    m.add_argument("--top-k", type=int, default=20, help="base-favored tokens are in the base's top-k")
    m.add_argument("--penalty-weight", choices=["adaptive", "position"], default="adaptive")
    m.add_argument("--w-max", type=float, default=5.0)
    m.add_argument("--gamma", type=float, default=1.0, help="position weights: w_t = 1 + gamma t / T")
    m.add_argument("--lambda-pen", type=float, default=1.0, help="0 = no penalty (ablation)")
    m.add_argument("--lambda-util", type=float, default=1.0)
    m.add_argument("--insert-candidates", type=int, default=4, help="insertion: candidate splices per example")
    h = p.add_argument_group("hardware")
    h.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    h.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    h.add_argument("--lora-rank", type=int, default=0, help="0 = full fine-tuning")
    h.add_argument("--lora-alpha", type=float, help="default 2 * rank")
    h.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    h.add_argument("--compile", action="store_true", help="torch.compile the student")
    args = p.parse_args(argv)
    args.out = args.out or f"runs/{args.method}"
    return args


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
