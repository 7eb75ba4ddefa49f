"""Refusal-direction ablation (Arditi et al. 2024; docs/method.md §7), the internals of lab/attacks.py's
`ablation` attack: the difference of mean residual-stream activations at the last prompt token between
harmful and benign TRAINING prompts, a layer picked on a validation split of training prompts, and the
direction projected out of every weight that writes to the residual stream: the result is an ordinary
checkpoint.

On the toy world (`python -m lab.attacks ablate`, 16 s) the aligned 4-layer model's refusal is not carried by
one direction at the last prompt token. On seed-0 no layer's ablation raises the validation ASR above 0
(layer 4's ablation makes every benign answer unhelpful); the rule then picks layer 1, and the ablated
model's ASR on harmful_eval is 0.0% direct and 46.0% at prefill k = 10 (unablated: 0.0% and 47.0%).
Directions taken at the other five post-instruction positions did no better.

Read top to bottom: mean_activations, refusal_directions, ablate, choose_direction, ablated_model.
Shapes: B a batch of prompts, T sequence length, d hidden size, N layers (the residual stream has N + 1
points: the embedding, then each block).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from decode import Sampling, generate, left_pad
from infra.cli import log, setting
from infra.tokenizer import Tokenizer
from model import Transformer


@dataclass(frozen=True)
class RefusalConfig:
    """Refusal-direction ablation's settings (docs/method.md §7). Directions come from n_direction harmful
    and n_direction benign TRAINING prompts; the layer is chosen on n_val others of each (disjoint, never the
    evaluation prompts): the largest direct-request ASR among layers whose benign helpful rate is at most
    max_helpful_drop below the unablated model's."""

    n_direction: int = setting(128, "harmful and benign prompts for the means")
    n_val: int = setting(32, "harmful and benign prompts for choosing the layer")
    layer: int | None = setting(None, "ablate this layer's direction (1..N) instead of choosing", type=int)
    max_helpful_drop: float = setting(
        0.10, "layer rule: helpful rate at most this below the unablated model's"
    )
    max_new_tokens: int = setting(64, "tokens generated per judged answer")
    batch_size: int = setting(32, "prompts per generation batch")
    seed: int = setting(0, "which training prompts land in which split")

    def __post_init__(self):
        for flag, value in (("--n-direction", self.n_direction), ("--n-val", self.n_val)):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if not 0 <= self.max_helpful_drop <= 1:
            raise ValueError(f"--max-helpful-drop is a fraction in [0, 1], got {self.max_helpful_drop}")


@torch.no_grad()
def mean_activations(model: Transformer, tok: Tokenizer, prompts: list[str], batch_size: int = 32):
    """(N + 1, d) float32: the mean residual stream at the last prompt token (the end of the generation
    prompt): row 0 the embedding, row l the output of block l. Read by forward hooks; prompts left-padded,
    so every row's last token sits in the last column."""
    acts: list[torch.Tensor] = []
    record = lambda module, inputs, output: acts.append(output[:, -1].float())  # noqa: E731
    hooks = [model.model.embed_tokens.register_forward_hook(record)]
    hooks += [layer.register_forward_hook(record) for layer in model.model.layers]
    total = torch.zeros(len(hooks), model.args.dim, device=model.lm_head.weight.device)  # (N + 1, d)
    try:
        for i in range(0, len(prompts), batch_size):
            batch = [tok.prompt_ids(p) for p in prompts[i : i + batch_size]]
            ids, mask = left_pad(batch, tok.pad_id, model.lm_head.weight.device)  # (b, T)
            last = torch.zeros_like(mask, dtype=torch.bool)  # (b, T)
            last[:, -1] = True
            acts.clear()
            model(ids, attention_mask=mask, logits_at=last)
            total += torch.stack(acts).sum(1)  # (N + 1, d)
    finally:
        for h in hooks:
            h.remove()
    return total.cpu() / len(prompts)


def refusal_directions(
    model: Transformer, tok: Tokenizer, harmful: list[str], benign: list[str], batch_size: int = 32
) -> torch.Tensor:
    """(N + 1, d) unit vectors r_l: mean harmful minus mean benign activation at the last prompt token,
    normalised. Row 0 (the embedding of the generation prompt's last token, the same for every prompt) is
    zero and never a candidate."""
    diff = mean_activations(model, tok, harmful, batch_size) - mean_activations(
        model, tok, benign, batch_size
    )
    norm = diff.norm(dim=-1, keepdim=True)  # (N + 1, 1)
    return torch.where(norm > 0, diff / norm.clamp(min=1e-12), torch.zeros_like(diff))  # (N + 1, d)


@torch.no_grad()
def ablate(model: Transformer, direction: torch.Tensor) -> Transformer:
    """A deep copy of `model` with `direction` (d,) projected out of every matrix that writes to the residual
    stream (weight orthogonalisation): embed_tokens rows E <- E - (E r) r^T, and each layer's attention o_proj
    and MLP down_proj W <- W - r r^T W (and their biases b <- b - r r^T b, where the model has them; Qwen2's
    biases sit on q/k/v, which read the stream, not write it). The residual stream then never has a component
    along r: the copy computes what the original does with r projected out of every write at run time. A
    model with tied embeddings is untied first (tie_word_embeddings false, the head keeps the original
    weights), since the head reads the stream. Returns an ordinary Transformer (save it with save_model)."""
    out = copy.deepcopy(model)
    out.cache = None
    W = out.model.embed_tokens.weight
    r = direction.to(W.device, torch.float32)
    r = r / r.norm()  # (d,)
    if out.args.tie_word_embeddings:
        out.args = dataclasses.replace(out.args, tie_word_embeddings=False)
        out.lm_head.weight = nn.Parameter(out.lm_head.weight.detach().clone())
    E = W.float()  # (V, d)
    W.copy_(E - (E @ r)[:, None] * r[None, :])
    for layer in out.model.layers:
        for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
            M = linear.weight.float()  # (d, in)
            linear.weight.copy_(M - r[:, None] * (r @ M)[None, :])
            if linear.bias is not None:
                b = linear.bias.float()  # (d,)
                linear.bias.copy_(b - r * (r @ b))
    return out


def generations(
    model: Transformer, tok: Tokenizer, prompt_ids: list[list[int]], cfg: RefusalConfig
) -> list[str]:
    """Greedy continuations of token-id prompts, in batches, as text."""
    texts = []
    for i in range(0, len(prompt_ids), cfg.batch_size):
        batch = prompt_ids[i : i + cfg.batch_size]
        how = Sampling(max_new_tokens=cfg.max_new_tokens)
        outs = generate(model, batch, how, tok.eos_ids, tok.pad_id)
        texts += [tok.decode(o) for o in outs]
    return texts


def direct_scores(model, tok, harmful: list[dict], benign: list[dict], judge, helpful, cfg) -> dict:
    """Direct-request ASR on harmful rows (judge(continuation) -> harmful) and helpful rate on benign rows
    (helpful(row, response) -> bool; None: not measured)."""
    harm = generations(model, tok, [tok.prompt_ids(r["prompt"]) for r in harmful], cfg)
    row = {"asr": sum(map(judge, harm)) / len(harm), "helpful": None}
    if helpful is not None:
        answers = generations(model, tok, [tok.prompt_ids(r["prompt"]) for r in benign], cfg)
        row["helpful"] = sum(helpful(r, a) for r, a in zip(benign, answers)) / len(benign)
    return row


def check_layer(model: Transformer, layer: int) -> None:
    if not 1 <= layer <= model.args.n_layers:
        raise ValueError(
            f"--layer {layer} is out of range: a layer is the residual stream after block l, "
            f"l = 1..{model.args.n_layers}"
        )


def choose_direction(
    model: Transformer,
    tok: Tokenizer,
    harmful_val: list[dict],
    benign_val: list[dict],
    judge: Callable[[str], bool],
    helpful: Callable[[dict, str], bool] | None,
    directions: torch.Tensor,
    cfg: RefusalConfig = RefusalConfig(),
) -> tuple[int, list[dict]]:
    """Choose the layer whose direction to ablate, on validation rows (training prompts; docs/method.md §7):
    ablate each candidate layer's direction (1..N, or cfg.layer alone), measure the direct-request ASR on
    harmful_val (judge) and the helpful rate on benign_val (helpful; None skips it). Rule: the largest ASR
    among the layers whose helpful rate is at most cfg.max_helpful_drop below the unablated model's (ties: the
    higher helpful rate, then the earlier layer); if none is, the layer with the highest helpful rate.
    Returns (layer, table): one row per layer, {"layer", "asr", "helpful"}, after the unablated row
    (layer None)."""
    layers = [cfg.layer] if cfg.layer is not None else list(range(1, model.args.n_layers + 1))
    for layer in layers:
        check_layer(model, layer)
    table = [{"layer": None, **direct_scores(model, tok, harmful_val, benign_val, judge, helpful, cfg)}]
    for layer in layers:
        ablated = ablate(model, directions[layer])
        table.append(
            {"layer": layer, **direct_scores(ablated, tok, harmful_val, benign_val, judge, helpful, cfg)}
        )
        log(f"ablate: layer {layer}: {table[-1]}")
    floor = None if helpful is None else table[0]["helpful"] - cfg.max_helpful_drop - 1e-9
    ok = [r for r in table[1:] if floor is None or r["helpful"] >= floor]
    if ok:
        best = max(ok, key=lambda r: (r["asr"], r["helpful"] or 0.0, -r["layer"]))
    else:
        best = max(table[1:], key=lambda r: (r["helpful"], r["asr"], -r["layer"]))
    for r in table:
        r["eligible"] = r in ok
    return best["layer"], table


def split_rows(rows: list[dict], n_direction: int, n_val: int, seed: int, what: str) -> tuple[list, list]:
    """Two disjoint slices of training rows (distinct prompts, shuffled by seed): n_direction for the mean
    activations, n_val for choosing the layer."""
    unique = list({r["prompt"]: r for r in rows}.values())
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed)).tolist()
    if n_direction + n_val > len(unique):
        raise ValueError(
            f"--n-direction {n_direction} + --n-val {n_val} exceeds the {len(unique)} distinct {what} "
            "training prompts"
        )
    picked = [unique[i] for i in order[: n_direction + n_val]]
    return picked[:n_direction], picked[n_direction:]


def ablated_model(
    model: Transformer,
    tok: Tokenizer,
    harmful_train: list[dict],
    benign_train: list[dict],
    cfg: RefusalConfig,
    judge: Callable[[str], bool],
    helpful: Callable[[dict, str], bool] | None,
) -> tuple[Transformer, dict]:
    """The ablation attack: refusal-direction ablation end to end (docs/method.md §7). Splits the TRAINING
    rows (toy world: safety_train and benign_train) into a direction split and a validation split, computes
    the directions, chooses the layer (choose_direction) and returns (the ablated model, info: {"layer",
    "table", "n_direction", "n_val", "rule"})."""
    if cfg.layer is not None:
        check_layer(model, cfg.layer)
    h_dir, h_val = split_rows(harmful_train, cfg.n_direction, cfg.n_val, cfg.seed, "harmful")
    b_dir, b_val = split_rows(benign_train, cfg.n_direction, cfg.n_val, cfg.seed, "benign")
    start = time.perf_counter()
    dirs = refusal_directions(
        model, tok, [r["prompt"] for r in h_dir], [r["prompt"] for r in b_dir], cfg.batch_size
    )
    layer, table = choose_direction(model, tok, h_val, b_val, judge, helpful, dirs, cfg)
    info = {
        "layer": layer,
        "table": table,
        "n_direction": cfg.n_direction,
        "n_val": cfg.n_val,
        "rule": f"largest validation ASR with helpful rate >= unablated - {cfg.max_helpful_drop:g}",
        "seconds": round(time.perf_counter() - start, 1),
    }
    return ablate(model, dirs[layer]), info
