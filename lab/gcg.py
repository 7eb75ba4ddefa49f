"""GCG adversarial suffixes (Zou et al. 2023; docs/method.md §7), the optimiser behind lab/attacks.py's `gcg`
attack.

GCG appends L adversarial tokens to the user turn (user text = request + " " + suffix) and optimises them so
that the answer begins with a target (toy world: the harmful response's first --target-tokens tokens; real
data: AdvBench `target`, JailbreakBench `Target`).

Default budget on the toy world, chosen so that one model on one toy world takes at most 5 minutes on 2 CPU
cores: 8 prompts spread over harmful_eval's 8 categories, attacked one at a time, each with L = 20 suffix
tokens, k = 256 candidate tokens per position, B = 128 swaps per step, at most 60 steps (early stop at
success); the target is the harmful response's first 10 tokens. Measured on the seed-0 aligned model
(`python -m lab.attacks gcg`, one thread, on a 2-core machine shared with other jobs, load 6-8): 177 s wall,
131 s CPU; target reached 0/8, ASR 37.5% by the toy judge. --universal (one suffix for the 8): 481 s under
the same load, ASR 87.5%. The paper's settings are L = 20, k = 256, B = 512 and hundreds of steps (real
models on a GPU: --steps 250 --batch 512 --target-tokens 0 --n-prompts 0 --dtype bfloat16).

Read top to bottom:
    1. The suffix slot   where the suffix sits in the chat template (a sentinel split) and which tokens may
                         fill it (allowed_tokens, round_trips)
    2. GCG               one_hot_grad, candidate_losses, optimise, gcg, gcg_attack_inputs (for the attack)

Shapes: B candidates, L suffix tokens, T sequence length, n target tokens, V vocabulary, d hidden size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from decode import Sampling, generate
from infra.cli import log, setting
from infra.files import spread
from infra.tokenizer import Tokenizer
from model import Transformer

SENTINEL = "deepalign-suffix-sentinel"  # stands in for the suffix when the chat template is split
INIT_TOKENS = (" !", " x", " .", " the")  # the suffix starts as L copies of the first of these that fits


# ----------------------------------------------------------------------------------------------
# 1. The suffix slot
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Slot:
    """One prompt's token layout around an adversarial suffix (docs/method.md §7, GCG):

        before + suffix + after + target
        before  the chat template up to the user content, then the request's ids
        suffix  L optimised ids; their text starts with the space that separates it from the request
        after   the rest of the template, up to and including the generation prompt
        target  what the answer should begin with

    Found by rendering the user turn "request <SENTINEL>" and cutting the text at the sentinel: the template
    (ChatML, Llama-3, Qwen, the plain format) may wrap the user content in anything, as long as it renders it
    verbatim. `round_trips` checks every candidate suffix by rendering and tokenizing the real prompt text,
    so the ids optimised are the ids the model reads when the prompt is re-tokenized."""

    request: str
    before: tuple[int, ...]
    after: tuple[int, ...]
    target: tuple[int, ...]

    def ids(self, suffix: list[int]) -> list[int]:
        return [*self.before, *suffix, *self.after, *self.target]

    def target_start(self, L: int) -> int:
        return len(self.before) + L + len(self.after)


def suffix_slot(tok: Tokenizer, request: str, target: str) -> Slot:
    """Split the chat template around the suffix (a sentinel) and tokenize the pieces; the target is
    tokenized after the generation prompt in one pass, as a prefilling attack tokenizes its prefix."""
    request = request.strip()
    text = tok.format_chat([{"role": "user", "content": f"{request} {SENTINEL}"}])
    if text.count(SENTINEL) != 1 or f"{request} {SENTINEL}" not in text:
        raise ValueError(
            "the chat template does not render the user content verbatim; GCG cannot place a suffix"
        )
    pre, post = text.split(SENTINEL)
    head = pre[: len(pre) - len(request) - 1]  # the template up to the user content
    special = tok.chat_template is None  # as Tokenizer.encode_chat: the plain format's BOS comes from here
    before = tok.encode(head, add_special_tokens=special) + tok.encode(request)
    if tok.encode(head + request, add_special_tokens=special) != before:
        raise ValueError(f"the request {request[:40]!r} merges with the chat template's tokens")
    gen_prompt = tok.encode(text.replace(f" {SENTINEL}", ""), add_special_tokens=special)
    with_target = tok.encode(text.replace(f" {SENTINEL}", "") + target, add_special_tokens=special)
    if with_target[: len(gen_prompt)] != gen_prompt or len(with_target) == len(gen_prompt):
        raise ValueError(f"the target {target[:40]!r} is empty or merges with the generation prompt")
    return Slot(request, tuple(before), tuple(tok.encode(post)), tuple(with_target[len(gen_prompt) :]))


def suffix_text(tok: Tokenizer, suffix: list[int]) -> str:
    """The suffix as the user types it: its decoded text without the separating space."""
    return tok.decode(suffix)[1:]


def user_text(tok: Tokenizer, slot: Slot, suffix: list[int]) -> str:
    return f"{slot.request} {suffix_text(tok, suffix)}"


def allowed_tokens(tok: Tokenizer, vocab_size: int) -> torch.Tensor:
    """(V,) bool: the tokens GCG may put in a suffix. Not special (tok.real_token_mask), inside the tokenizer,
    and round-tripping alone: decode then encode gives the token back (byte pieces of a multi-byte character,
    which decode to U+FFFD, do not). A whole suffix must also round-trip in context (round_trips)."""
    ok = tok.real_token_mask(vocab_size)  # (V,)
    ids = ok.nonzero().squeeze(1).tolist()
    texts = tok.tok.decode_batch([[i] for i in ids], skip_special_tokens=False)
    again = tok.tok.encode_batch(texts, add_special_tokens=False)
    for i, text, enc in zip(ids, texts, again):
        ok[i] = bool(text) and enc.ids == [i]
    return ok


def leading_space_tokens(tok: Tokenizer, vocab_size: int) -> torch.Tensor:
    """(V,) bool: tokens whose text starts with a space, the only ones allowed as a suffix's first token (it
    carries the space between the request and the suffix)."""
    lead = torch.zeros(vocab_size, dtype=torch.bool)
    n = min(tok.vocab_size, vocab_size)
    texts = tok.tok.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
    lead[:n] = torch.tensor([t.startswith(" ") for t in texts])
    return lead


def round_trips(tok: Tokenizer, slot: Slot, suffixes: list[list[int]]) -> list[bool]:
    """Whether each suffix survives re-tokenization: the prompt rendered with the user text request + " " +
    suffix text and tokenized in one pass (Tokenizer.prompt_ids) gives exactly before + suffix + after."""
    texts = [tok.decode(s) for s in suffixes]
    ok = [t.startswith(" ") for t in texts]
    rendered = [tok.format_chat([{"role": "user", "content": slot.request + t}]) for t in texts]
    encoded = tok.tok.encode_batch(rendered, add_special_tokens=tok.chat_template is None)
    return [
        good and enc.ids == [*slot.before, *s, *slot.after] for good, enc, s in zip(ok, encoded, suffixes)
    ]


def initial_suffix(tok: Tokenizer, slots: list[Slot], L: int, allowed, lead) -> list[int]:
    """L copies of " !" (the paper's "! ! ! ..."), or of the first of INIT_TOKENS, or of any allowed token,
    that round-trips in every slot."""
    preferred = [ids[0] for ids in (tok.encode(t) for t in INIT_TOKENS) if len(ids) == 1]
    others = (allowed & lead).nonzero().squeeze(1).tolist()
    for t in preferred + others[:200]:
        if (
            t < len(allowed)
            and allowed[t]
            and lead[t]
            and all(round_trips(tok, s, [[t] * L])[0] for s in slots)
        ):
            return [t] * L
    raise ValueError(
        "the tokenizer has no token that starts with a space and round-trips when repeated "
        f"--suffix-len={L} times after the request; GCG needs one to start from"
    )


# ----------------------------------------------------------------------------------------------
# 2. GCG (Zou et al. 2023)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GCGConfig:
    """GCG's settings (docs/method.md §7). The paper's are L = 20, k = 256, B = 512 and hundreds of steps;
    the defaults are the toy-world budget, at most 5 minutes for one model on one toy world on 2 CPU cores
    (the module docstring gives the measured time). target_tokens = 10 on the toy world: a target of 4
    tokens (an opener, never a step's words) is reached more often, but the answer then drifts to a benign
    topic; with 10 the first step's words keep it on the request (seed-0 aligned, 8 prompts, 60 steps:
    target reached 37.5% vs 0%, ASR 12.5% vs 37.5%)."""

    suffix_len: int = setting(20, "L: suffix tokens")
    # k: candidate tokens per position (the vocabulary's allowed tokens if fewer)
    top_k: int = setting(256, "k: candidate tokens per position")
    batch: int = setting(128, "B: candidate swaps scored per step")  # in one batched forward
    steps: int = setting(60, "optimisation steps per suffix (at most)")  # fewer when every target is reached
    target_tokens: int = setting(10, "target = this many harmful-response tokens; 0: all")
    n_prompts: int = setting(8, "attack this many prompts, spread over the set; 0: all")
    universal: bool = setting(False, "one suffix for all prompts (losses summed)")
    seed: int = setting(0, "candidate sampling seed")
    early_stop: bool = setting(True, "stop once greedy decoding begins with the target (every target)")
    chunk: int = setting(0, "candidates per forward (0: all B at once)")  # bf16 on a GPU: fewer

    def __post_init__(self):
        for flag, value, least in (
            ("--suffix-len", self.suffix_len, 1),
            ("--top-k", self.top_k, 1),
            ("--batch", self.batch, 1),
            ("--steps", self.steps, 0),
            ("--target-tokens", self.target_tokens, 0),
            ("--n-prompts", self.n_prompts, 0),
            ("--gcg-chunk", self.chunk, 0),
        ):
            if value < least:
                raise ValueError(f"{flag} must be at least {least}, got {value}")


def target_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits (B, n, V), target (n,) -> the mean cross-entropy of each row (B,), in float32."""
    B, n, V = logits.shape
    ce = F.cross_entropy(logits.float().reshape(B * n, V), target.repeat(B), reduction="none")  # (B*n,)
    return ce.view(B, n).mean(1)


def one_hot_grad(model: Transformer, slots: list[Slot], suffix: list[int]) -> tuple[torch.Tensor, float]:
    """The gradient of the target loss (summed over slots) with respect to the one-hot suffix, (L, V), and
    the loss. The suffix enters through the model's `embeds` input as one_hot @ embed_tokens.weight, so the
    gradient at token v of position i is (dloss / d embedding_i) . E[v]; the most negative entries are the
    swaps expected to lower the loss most."""
    W = model.model.embed_tokens.weight  # (V, d)
    device, L = W.device, len(suffix)
    one_hot = F.one_hot(torch.tensor(suffix, device=device), W.shape[0]).to(W.dtype)  # (L, V)
    one_hot.requires_grad_(True)
    grad, total = torch.zeros(L, W.shape[0], device=device), 0.0
    for slot in slots:
        ids = torch.tensor([slot.ids(suffix)], device=device)  # (1, T)
        s, n = slot.target_start(L), len(slot.target)
        with torch.no_grad():
            fixed = model.model.embed_tokens(ids)  # (1, T, d)
        nb = len(slot.before)
        embeds = torch.cat([fixed[:, :nb], (one_hot @ W)[None], fixed[:, nb + L :]], dim=1)  # (1, T, d)
        at = torch.zeros_like(ids, dtype=torch.bool)  # (1, T)
        at[:, s - 1 : s - 1 + n] = True  # the positions that predict the target
        logits = model(ids, logits_at=at, embeds=embeds)  # (n, V)
        loss = target_loss(logits[None], ids[0, s : s + n])[0]
        (g,) = torch.autograd.grad(loss, one_hot)
        grad += g.float()
        total += loss.item()
    return grad, total  # (L, V)


@torch.no_grad()
def candidate_losses(
    model: Transformer, slot: Slot, candidates: torch.Tensor, chunk: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score candidate suffixes (B, L) in one batched forward (or forwards of `chunk` rows): the mean
    cross-entropy of the target after each (B,), and whether each one's teacher-forced argmax is the target
    at every position (B,) bool, which is exactly "greedy decoding begins with the target"."""
    B, L = candidates.shape
    device = candidates.device
    s, n = slot.target_start(L), len(slot.target)
    before = torch.tensor(slot.before, device=device).expand(B, -1)  # (B, Tb)
    rest = torch.tensor([*slot.after, *slot.target], device=device).expand(B, -1)  # (B, Ta + n)
    ids = torch.cat([before, candidates, rest], dim=1)  # (B, T)
    target = ids[0, s : s + n]  # (n,)
    losses, hits = [], []
    for i in range(0, B, chunk or B):
        rows = ids[i : i + (chunk or B)]  # (b, T)
        at = torch.zeros_like(rows, dtype=torch.bool)  # (b, T)
        at[:, s - 1 : s - 1 + n] = True
        logits = model(rows, logits_at=at).view(len(rows), n, -1)  # (b, n, V)
        losses.append(target_loss(logits, target))
        hits.append((logits.argmax(-1) == target).all(-1))
    return torch.cat(losses), torch.cat(hits)  # (B,), (B,)


def sample_candidates(suffix: torch.Tensor, top: torch.Tensor, B: int, generator) -> torch.Tensor:
    """B random single-token swaps of suffix (L,): a random position, a random one of its top-k tokens
    top (L, k) -> (B, L)."""
    L, k = top.shape
    pos = torch.randint(0, L, (B,), generator=generator)  # (B,)
    pick = torch.randint(0, k, (B,), generator=generator)  # (B,)
    out = suffix.repeat(B, 1)  # (B, L)
    out[torch.arange(B), pos] = top[pos, pick]
    return out


def optimise(model, tok, slots: list[Slot], cfg: GCGConfig, allowed, lead, generator) -> dict:
    """One suffix for `slots` (one prompt, or all of them in universal mode): GCG steps until the budget
    is spent or every target is reached. Returns {suffix, losses (per slot), hits, steps}."""
    device = model.lm_head.weight.device
    suffix = initial_suffix(tok, slots, cfg.suffix_len, allowed, lead)

    def score(cands: torch.Tensor):  # (B, L) -> summed loss (B,), per-slot losses (S, B), hits (S, B)
        per = [candidate_losses(model, slot, cands.to(device), cfg.chunk) for slot in slots]
        losses, hits = torch.stack([p[0] for p in per]), torch.stack([p[1] for p in per])  # (S, B) each
        return losses.sum(0), losses, hits

    total, losses, hits = score(torch.tensor([suffix]))
    total, losses, hits = total[0].item(), losses[:, 0], hits[:, 0]
    k = min(cfg.top_k, int(allowed.sum()), int((allowed & lead).sum()))
    steps = 0
    while steps < cfg.steps and not (cfg.early_stop and bool(hits.all())):
        steps += 1
        grad, _ = one_hot_grad(model, slots, suffix)  # (L, V)
        grad = grad.cpu().masked_fill(~allowed, float("inf"))
        grad[0].masked_fill_(~lead, float("inf"))  # the first token carries the separating space
        top = (-grad).topk(k, dim=1).indices  # (L, k): most negative gradient first
        cands = sample_candidates(torch.tensor(suffix), top, cfg.batch, generator)  # (B, L)
        keep = torch.ones(len(cands), dtype=torch.bool)
        for slot in slots:
            keep &= torch.tensor(round_trips(tok, slot, cands.tolist()))
        if not keep.any():
            continue
        cands = cands[keep]  # (B', L)
        cand_total, cand_losses, cand_hits = score(cands)
        best = int(cand_total.argmin())
        if cand_total[best].item() < total:  # keep the best swap of the batch if it lowers the loss
            suffix, total = cands[best].tolist(), cand_total[best].item()
            losses, hits = cand_losses[:, best], cand_hits[:, best]
        if steps % 25 == 0:
            log(f"gcg: step {steps}: loss {total:.3f}, targets reached {int(hits.sum())}/{len(slots)}")
    return {"suffix": suffix, "losses": losses.tolist(), "hits": hits.tolist(), "steps": steps}


def gcg(
    model: Transformer, tok: Tokenizer, prompts: list[str], targets: list[str], cfg: GCGConfig
) -> list[dict]:
    """GCG (docs/method.md §7) on each prompt, or with cfg.universal one suffix over all of them (loss
    summed). Returns per prompt {"prompt", "target", "suffix" (text), "suffix_ids", "prompt_ids" (the whole
    generation prompt with the suffix, as Tokenizer.prompt_ids tokenizes the user text request + " " +
    suffix, ready for decode.generate), "loss" (this prompt's target cross-entropy), "steps", "success"
    (greedy decoding from prompt_ids begins with the target, checked with decode.generate)}."""
    if len(prompts) != len(targets):
        raise ValueError(f"gcg: {len(prompts)} prompts but {len(targets)} targets")
    V = model.args.vocab_size
    allowed, lead = allowed_tokens(tok, V), leading_space_tokens(tok, V)
    if not (allowed & lead).any():
        raise ValueError("the tokenizer has no token that starts with a space; GCG's suffix needs one")
    generator = torch.Generator().manual_seed(cfg.seed)
    slots = [suffix_slot(tok, p, t) for p, t in zip(prompts, targets)]
    groups = [list(range(len(slots)))] if cfg.universal else [[i] for i in range(len(slots))]
    found = {}
    for group in groups:
        start = time.perf_counter()
        result = optimise(model, tok, [slots[i] for i in group], cfg, allowed, lead, generator)
        for j, i in enumerate(group):
            found[i] = {**result, "loss": result["losses"][j]}
        seconds = time.perf_counter() - start
        log(f"gcg: prompts {group[0]}..{group[-1]}: {result['steps']} steps, {seconds:.1f}s")
    out = []
    for i, (slot, prompt, target) in enumerate(zip(slots, prompts, targets)):
        suffix = found[i]["suffix"]
        ids = tok.prompt_ids(user_text(tok, slot, suffix))
        assert ids == [*slot.before, *suffix, *slot.after], "the suffix does not round-trip (round_trips)"
        out.append(
            {
                "prompt": prompt,
                "target": target,
                "suffix": suffix_text(tok, suffix),
                "suffix_ids": suffix,
                "prompt_ids": ids,
                "loss": found[i]["loss"],
                "steps": found[i]["steps"],
            }
        )
    longest = Sampling(max_new_tokens=max(len(s.target) for s in slots))
    gens = generate(model, [r["prompt_ids"] for r in out], longest, (), tok.pad_id)
    for r, slot, g in zip(out, slots, gens):
        r["success"] = g[: len(slot.target)] == list(slot.target)
    return out


def gcg_target(tok: Tokenizer, row: dict, cfg: GCGConfig) -> str:
    """A row's GCG target: its "target", else the first cfg.target_tokens tokens of its "harmful_response"
    (tokenized after the generation prompt; 0: all of it)."""
    if row.get("target"):
        return row["target"]
    if not row.get("harmful_response"):
        raise ValueError(f"the row {row['prompt'][:40]!r} has no 'target' or 'harmful_response' for GCG")
    if not cfg.target_tokens:
        return row["harmful_response"]
    slot = suffix_slot(tok, row["prompt"], row["harmful_response"])
    return tok.decode(slot.target[: cfg.target_tokens])


def gcg_attack_inputs(model: Transformer, tok: Tokenizer, rows: list[dict], cfg: GCGConfig) -> list[dict]:
    """For the gcg attack: GCG on cfg.n_prompts of `rows` spread evenly over them (infra.files.spread; 0:
    every row). Rows hold "prompt" and "target" or "harmful_response". Returns per attacked row the gcg()
    record (its "prompt_ids" are what the model continues from; the attack forces nothing into the assistant
    turn, so "prefix" is "") plus the row's category, held_out and severity."""
    rows = spread(rows, cfg.n_prompts)
    targets = [gcg_target(tok, r, cfg) for r in rows]
    records = gcg(model, tok, [r["prompt"] for r in rows], targets, cfg)
    keys = ("category", "held_out", "severity")
    return [{**rec, "prefix": "", **{k: r[k] for k in keys if k in r}} for r, rec in zip(rows, records)]
