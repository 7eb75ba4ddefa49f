"""The method: base-favored tokens, position profiles, contrastive scores, and the targeted-completion losses.

Bach, Nguyen, Le & Tran, "Rethinking Deep Alignment Through The Lens Of Incomplete Learning" (arXiv 2511.12155).
Section numbers ("METHOD §2") refer to ../shared/METHOD.md, which separates what the paper states from the
choices we made where it is silent; every such choice is an argument here and a CLI flag.

Notation: aligned model A, its base model B, student S; lp = log_softmax(logits) in float32; positions t count
*response* tokens from 0. All functions take log-probabilities over the last dim (..., V) and broadcast over
any leading dims, e.g. (B, T, V).

Read top to bottom:
    1. per-position quantities (pure tensor functions)        base_favored_mask, kl_per_position, bf_mass, ...
    2. contrastive scores (inference time)                    contrastive_logits
    3. teacher-forced position profile over a data set        position_profile
    4. command line: `python deepalign.py profile|tokens`
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------------
# 1. Per-position quantities
# ----------------------------------------------------------------------------------------------


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax in float32 (logits may be bf16: upcast before any KL or log-prob arithmetic)."""
    return logits.float().log_softmax(-1)


def in_top_k(lp: torch.Tensor, k: int) -> torch.Tensor:
    """(..., V) bool: v is among the top-k of lp, ties included (fewer than k tokens are strictly more likely)."""
    k = min(k, lp.shape[-1])
    kth = lp.topk(k, dim=-1).values[..., -1:]  # (..., 1) the k-th largest value
    return lp >= kth


def base_favored_mask(lp_A, lp_B, tau: float = 1.0, top_k: int = 20, valid=None) -> torch.Tensor:
    """BF_t = { v : lp_B(v) - lp_A(v) > log(tau)  and  v in top-k of p_B }   (METHOD §2).

    The paper defines base-favored tokens as those the base model assigns higher probability than the aligned
    model (tau = 1). The top-k restriction is our choice: it keeps the set to tokens the base model would
    actually say; without it, half the vocabulary's tail qualifies. `valid` (V,) bool restricts the set to real
    token ids (no padded rows, no reserved special tokens). lp_A, lp_B (..., V) -> (..., V) bool.
    """
    favored = (lp_B - lp_A) > math.log(tau)  # nan (both -inf) compares False
    mask = favored & in_top_k(lp_B, top_k)
    return mask & valid if valid is not None else mask


def kl_per_position(lp_P, lp_Q) -> torch.Tensor:
    """KL(P || Q) = sum_v p(v) (lp_P(v) - lp_Q(v)) per position; terms with p(v) = 0 count 0 (METHOD §3,
    as in Qi et al. 2024). (..., V) -> (...)."""
    p = lp_P.exp()
    terms = p * (lp_P - lp_Q)
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum(-1)


def bf_mass(lp, mask) -> torch.Tensor:
    """sum_{v in BF_t} p(v): the probability a model still puts on base-favored tokens (METHOD §3; under the
    aligned model this is the *incompleteness score*). (..., V), (..., V) bool -> (...)."""
    return torch.where(mask, lp.exp(), torch.zeros_like(lp)).sum(-1)


def bf_hit(mask, next_tokens) -> torch.Tensor:
    """1.0 where the actual next token (of the harmful response) is base-favored (METHOD §3 bf_hit).
    mask (..., V) bool, next_tokens (...) long -> (...) float."""
    return mask.gather(-1, next_tokens[..., None]).squeeze(-1).float()


def logit_grad_norm(lp, targets) -> torch.Tensor:
    """|| dLoss_t / dlogits_t || = || softmax(l_t) - onehot(y_t) ||_2 for cross-entropy at each position: the
    per-position gradient signal of SFT (METHOD §3 grad_t). Computed in closed form:
    sum_v p_v^2 - 2 p_y + 1. lp (..., V), targets (...) -> (...)."""
    p = lp.exp()
    p_y = p.gather(-1, targets[..., None]).squeeze(-1)
    return (p.pow(2).sum(-1) - 2 * p_y + 1).clamp(min=0).sqrt()


# ----------------------------------------------------------------------------------------------
# 2. Contrastive scores (inference time)
# ----------------------------------------------------------------------------------------------


LOG_FLOOR = -1e4  # a log-prob below this is as impossible as -inf; flooring keeps 0 * inf from making NaN


def head_mask(lp_A, beta: float = 0.1) -> torch.Tensor:
    """V_head = { v : p_A(v) >= beta * max p_A } (Li et al. 2022's plausibility filter; METHOD §4)."""
    return lp_A >= lp_A.max(-1, keepdim=True).values + math.log(beta)


def contrastive_logits(lp_A, lp_B, alpha: float = 1.0, beta: float = 0.1, mode: str = "full",
                       tau: float = 1.0, top_k: int = 20, valid=None) -> torch.Tensor:
    """Contrastive scores s_t (METHOD §4): decode from softmax(s_t / temperature) or argmax s_t.

    mode "full": s(v) = lp_A(v) + alpha * (lp_A(v) - lp_B(v))        for v in V_head, -inf elsewhere
    mode "bf":   s(v) = lp_A(v) - alpha * (lp_B(v) - lp_A(v)) * [v in BF_t], lp_A(v) otherwise, on V_head
    The paper states contrastive decoding between aligned and base logits; the exact form (an expert-amateur
    contrast with Li et al.'s plausibility filter, i.e. emulated alignment amplified by 1 + alpha) is our
    choice. `valid` restricts only the base-favored set (mode "bf"). alpha = 0 gives lp_A on V_head, whose argmax is the aligned model's argmax: greedy contrastive
    decoding at alpha = 0 is plain greedy decoding, token for token. (..., V) -> (..., V).
    """
    lp_B = lp_B.clamp(min=LOG_FLOOR)  # (..., V)
    if mode == "full":
        s = lp_A + alpha * (lp_A - lp_B)
    elif mode == "bf":
        bf = base_favored_mask(lp_A, lp_B, tau, top_k, valid)
        s = torch.where(bf, lp_A - alpha * (lp_B - lp_A), lp_A)
    else:
        raise ValueError(f"cd mode {mode!r} is not supported; use 'full' or 'bf'")
    # The head is not restricted to `valid` (real tokens): eos is a special token and must stay choosable.
    return s.masked_fill(~head_mask(lp_A, beta), float("-inf"))


# ----------------------------------------------------------------------------------------------
# 3. Position profile: the paper's diagnosis, teacher-forced over a data set
# ----------------------------------------------------------------------------------------------
PROFILE_KEYS = ("kl", "bf_mass_A", "bf_mass_B", "bf_count", "bf_hit")


def response_split(tok, prompt: str, response: str, plain: bool = False, max_tokens: int | None = None):
    """(prompt ids, response ids) of the chat-formatted prompt with `response` as the assistant's answer,
    tokenized in one pass (as a prefilling attack would be). Raises if the tokenizer merges across the boundary."""
    head = tok.prompt_ids(prompt, plain=plain)
    full = tok.prompt_ids(prompt, prefill=response, plain=plain)
    if full[: len(head)] != head:
        raise ValueError(f"the response {response[:40]!r}... merges with the generation prompt under this tokenizer; "
                         "start responses with a word, not a space or punctuation")
    resp = full[len(head):]
    return head, resp[:max_tokens] if max_tokens else resp


def right_pad(seqs: list[list[int]], pad_id: int, device):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids.to(device)


def response_log_probs(model, seqs: list[list[int]], starts: list[int], lengths: list[int], pad_id: int) -> list[torch.Tensor]:
    """Teacher-forced log-probs at response positions: for row i, lp (n_i, V) float32, where row t predicts
    response token t from context (prompt, response[:t]). Right padding keeps RoPE positions 0..T-1."""
    device = model.lm_head.weight.device
    ids = right_pad(seqs, pad_id, device)  # (B, T)
    logits = model(ids)  # (B, T, V): causal, so padding at the right never affects real positions
    return [log_probs(logits[i, s - 1 : s - 1 + n]) for i, (s, n) in enumerate(zip(starts, lengths))]


class Accumulator:
    """Per-position sums and counts: mean_t = sum_t / n_t over all contexts that reach position t."""

    def __init__(self, keys):
        self.sums, self.n = {k: [] for k in keys}, []

    def add(self, values: dict[str, torch.Tensor]):
        n = len(next(iter(values.values())))
        while len(self.n) < n:
            self.n.append(0)
            for k in self.sums:
                self.sums[k].append(0.0)
        for t in range(n):
            self.n[t] += 1
        for k, v in values.items():
            for t, x in enumerate(v.tolist()):
                self.sums[k][t] += x

    def rows(self):
        return [{"t": t, "n": n, **{k: self.sums[k][t] / n for k in self.sums}} for t, n in enumerate(self.n)]


@torch.no_grad()
def position_profile(base, aligned, tok, pairs: list[dict], tau: float = 1.0, top_k: int = 20, batch_size: int = 8,
                     max_response_tokens: int = 64, base_format: str = "chat", base_tok=None,
                     refusal: str | None = None, grad_model=None, progress: bool = True) -> dict:
    """Per-position means of kl, bf_mass_A, bf_mass_B, bf_count, bf_hit, grad over harmful (prompt, response)
    pairs (METHOD §1-3): the safety-critical contexts c_t = (x, h_<t), teacher-forced.

    Both models read **the identical token sequence**: the aligned model's chat format with the harmful
    response as the assistant's answer. Base models never saw that template; with base_format="plain" the
    base reads its own plain text instead (see model.PLAIN_FORMAT_DOC), and a pair is used only where the
    response tokenizes identically in both formats (skipped pairs are counted in the result).
    Base-favored sets are restricted to real token ids of the shared vocabulary (no padded rows or specials).

    grad: the per-position gradient signal of refusal SFT, || softmax(l_t) - onehot(r_t) || on (prompt,
    refusal) under `grad_model` (default: the base, where refusal SFT starts). The refusal is each pair's
    "refusal" key, else `refusal`; without either, grad is left out.
    """
    from tqdm import tqdm

    base_tok = base_tok or tok
    valid = tok.real_token_mask(aligned.args.vocab_size).to(aligned.lm_head.weight.device)
    grad_model = grad_model or base
    acc, grad_acc, skipped = Accumulator(PROFILE_KEYS), Accumulator(["grad"]), 0
    for i in tqdm(range(0, len(pairs), batch_size), desc="profile", disable=not progress, file=sys.stderr):
        batch = pairs[i : i + batch_size]
        seq_A, seq_B, st_A, st_B, resp = [], [], [], [], []
        for row in batch:
            head, r = response_split(tok, row["prompt"], row["harmful_response"], max_tokens=max_response_tokens)
            if base_format == "plain":
                head_B, r_B = response_split(base_tok, row["prompt"], row["harmful_response"], plain=True,
                                             max_tokens=max_response_tokens)
                if r_B != r:
                    skipped += 1
                    continue
            else:
                head_B = head
            seq_A.append(head + r), st_A.append(len(head)), resp.append(r)
            seq_B.append(head_B + r), st_B.append(len(head_B))
        if not resp:
            continue
        lens = [len(r) for r in resp]
        lps_A = response_log_probs(aligned, seq_A, st_A, lens, tok.pad_id)
        lps_B = response_log_probs(base, seq_B, st_B, lens, tok.pad_id)
        for lp_A, lp_B, r in zip(lps_A, lps_B, resp):  # (n, V) each
            bf = base_favored_mask(lp_A, lp_B, tau, top_k, valid)
            target = torch.tensor(r, device=lp_A.device)
            acc.add({"kl": kl_per_position(lp_A, lp_B), "bf_mass_A": bf_mass(lp_A, bf), "bf_mass_B": bf_mass(lp_B, bf),
                     "bf_count": bf.sum(-1).float(), "bf_hit": bf_hit(bf, target)})
        refusals = [row.get("refusal", refusal) for row in batch]
        if all(refusals):
            splits = [response_split(tok, row["prompt"], ref, max_tokens=max_response_tokens) for row, ref in zip(batch, refusals)]
            lps = response_log_probs(grad_model, [h + r for h, r in splits], [len(h) for h, _ in splits],
                                     [len(r) for _, r in splits], tok.pad_id)
            for lp, (_, r) in zip(lps, splits):
                grad_acc.add({"grad": logit_grad_norm(lp, torch.tensor(r, device=lp.device))})
    rows = acc.rows()
    grads = grad_acc.rows()
    for row in rows:
        row["grad"] = grads[row["t"]]["grad"] if row["t"] < len(grads) else None
    return {"positions": rows, "settings": {"tau": tau, "top_k": top_k, "base_format": base_format,
                                            "max_response_tokens": max_response_tokens, "pairs": len(pairs),
                                            "skipped_pairs": skipped, "same_token_sequence": base_format == "chat"}}
