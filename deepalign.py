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
    4. training losses (targeted completion and baselines)    hybrid_teacher, kd_loss, bf_penalty, ...
    5. command line: `python deepalign.py profile|tokens|plot`
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
    return torch.where(p > 0, p * (lp_P - lp_Q), 0.0).sum(-1)


def bf_mass(lp, mask) -> torch.Tensor:
    """sum_{v in BF_t} p(v): the probability a model still puts on base-favored tokens (METHOD §3; under the
    aligned model this is the *incompleteness score*). (..., V), (..., V) bool -> (...)."""
    return torch.where(mask, lp.exp(), 0.0).sum(-1)


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
    """V_head = { v : p_A(v) >= beta * max p_A } (Li et al. 2022's plausibility filter; METHOD §4).
    beta = 0 keeps the whole vocabulary."""
    if beta <= 0:
        return torch.ones_like(lp_A, dtype=torch.bool)
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
STAT_ROWS = 64  # contexts per chunk of vocabulary-wide statistics (see position_profile)


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


def response_logits(model, seqs: list[list[int]], starts: list[int], lengths: list[int], pad_id: int) -> torch.Tensor:
    """Teacher-forced logits at response positions, all rows' positions concatenated: (sum(lengths), V) in the
    model dtype, where row i's block t predicts its response token t from context (prompt, response[:t]); split
    with `.split(lengths)`. Right padding keeps RoPE positions 0..T-1; the head runs only where needed."""
    device = model.lm_head.weight.device
    ids = right_pad(seqs, pad_id, device)  # (B, T)
    at = torch.zeros(ids.shape, dtype=torch.bool)
    for i, (s, n) in enumerate(zip(starts, lengths)):
        at[i, s - 1 : s - 1 + n] = True  # the logit at position j predicts token j + 1
    return model(ids, logits_at=at.to(device))  # (N, V); causal, so right padding never affects real positions


def response_log_probs(model, seqs, starts, lengths, pad_id) -> torch.Tensor:
    """log_softmax of `response_logits` in float32: (sum(lengths), V)."""
    return log_probs(response_logits(model, seqs, starts, lengths, pad_id))


def profile_stats(lp_A, lp_B, next_tokens, tau: float = 1.0, top_k: int = 20, valid=None) -> dict[str, torch.Tensor]:
    """The per-context quantities of the position profile (METHOD §3): kl, bf_mass_A, bf_mass_B, bf_count,
    bf_hit. lp_A, lp_B (N, V) float32, next_tokens (N,) the harmful response's actual next tokens -> {key: (N,)}."""
    bf = base_favored_mask(lp_A, lp_B, tau, top_k, valid)  # (N, V)
    return {"kl": kl_per_position(lp_A, lp_B), "bf_mass_A": bf_mass(lp_A, bf), "bf_mass_B": bf_mass(lp_B, bf),
            "bf_count": bf.sum(-1).float(), "bf_hit": bf_hit(bf, next_tokens)}


class Accumulator:
    """Per-position sums and counts: mean_t = sum_t / n_t over all contexts that reach position t."""

    def __init__(self, keys):
        self.sums = {k: torch.zeros(0, dtype=torch.float64) for k in keys}
        self.n = torch.zeros(0, dtype=torch.float64)

    def add(self, t: torch.Tensor, values: dict[str, torch.Tensor]):
        """t (N,) response positions; values {key: (N,)}."""
        t = t.cpu()
        size = int(t.max()) + 1
        if size > len(self.n):  # grow to the longest response seen so far
            grow = lambda x: torch.cat([x, torch.zeros(size - len(x), dtype=x.dtype)])  # noqa: E731
            self.n, self.sums = grow(self.n), {k: grow(v) for k, v in self.sums.items()}
        self.n.index_add_(0, t, torch.ones(len(t), dtype=torch.float64))
        for k, v in values.items():
            self.sums[k].index_add_(0, t, v.detach().double().cpu())

    def rows(self):
        return [{"t": t, "n": int(n), **{k: (self.sums[k][t] / n).item() for k in self.sums}}
                for t, n in enumerate(self.n.tolist())]


@torch.no_grad()
def position_profile(base, aligned, tok, pairs: list[dict], tau: float = 1.0, top_k: int = 20, batch_size: int = 8,
                     max_response_tokens: int = 64, base_format: str = "chat", base_tok=None,
                     refusal: str | None = None, grad_model=None, progress: bool = True) -> dict:
    """Per-position means of kl, bf_mass_A, bf_mass_B, bf_count, bf_hit, grad over harmful (prompt, response)
    pairs (METHOD §1-3): the safety-critical contexts c_t = (x, h_<t), teacher-forced, for t = 0..len(h); the
    last one predicts the chat format's end-of-turn token. At most `max_response_tokens` positions per pair.

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
    # Contexts k = 0..len(h) (METHOD §1): the last one, after the whole response, predicts the end of the turn. The
    # plain format has no end-of-turn token, so there the contexts stop at k = len(h) - 1.
    end = [tok.end_of_turn_id] if base_format == "chat" else []
    valid = tok.real_token_mask(aligned.args.vocab_size)
    valid[end] = True  # the end-of-turn token is special, but at k = len(h) it is what the models compete on
    valid = valid.to(aligned.lm_head.weight.device)
    grad_model = grad_model or base
    acc, grad_acc, skipped = Accumulator(PROFILE_KEYS), Accumulator(["grad"]), 0
    for i in tqdm(range(0, len(pairs), batch_size), desc="profile", disable=not progress, file=sys.stderr):
        batch = pairs[i : i + batch_size]
        seq_A, seq_B, st_A, st_B, resp, kept = [], [], [], [], [], []
        for row in batch:
            head, r = response_split(tok, row["prompt"], row["harmful_response"])
            r = (r + end)[:max_response_tokens]  # targets h_0 .. h_{n-1}, then the end of the turn
            if base_format == "plain":
                head_B, r_B = response_split(base_tok, row["prompt"], row["harmful_response"], plain=True)
                if r_B[:max_response_tokens] != r:
                    skipped += 1
                    continue
            else:
                head_B = head
            seq_A.append(head + r), st_A.append(len(head)), resp.append(r), kept.append(row)
            seq_B.append(head_B + r), st_B.append(len(head_B))
        if not resp:
            continue
        lens = [len(r) for r in resp]
        logits_A = response_logits(aligned, seq_A, st_A, lens, tok.pad_id)  # (N, V), all rows' positions
        logits_B = response_logits(base, seq_B, st_B, lens, tok.pad_id)
        t = torch.cat([torch.arange(n) for n in lens])  # (N,) response position of each row
        target = torch.tensor([y for r in resp for y in r], device=logits_A.device)
        # The vocabulary-wide statistics go STAT_ROWS rows at a time: float32 (rows, V) temporaries that fit in
        # the CPU's cache make them ~3x faster than one pass over (N, V), and peak memory stays small on a GPU.
        for j in range(0, len(t), STAT_ROWS):
            rows = slice(j, j + STAT_ROWS)
            acc.add(t[rows], profile_stats(log_probs(logits_A[rows]), log_probs(logits_B[rows]), target[rows],
                                           tau, top_k, valid))
        refusals = [row.get("refusal", refusal) for row in kept]
        if all(refusals):
            splits = [response_split(tok, row["prompt"], ref) for row, ref in zip(kept, refusals)]
            splits = [(h, (r + [tok.end_of_turn_id])[:max_response_tokens]) for h, r in splits]  # as train.py trains
            lp = response_log_probs(grad_model, [h + r for h, r in splits], [len(h) for h, _ in splits],
                                    [len(r) for _, r in splits], tok.pad_id)
            target = torch.tensor([y for _, r in splits for y in r], device=lp.device)
            grad_acc.add(torch.cat([torch.arange(len(r)) for _, r in splits]), {"grad": logit_grad_norm(lp, target)})
    rows = acc.rows()
    grads = grad_acc.rows() if len(grad_acc.n) else []
    for row in rows:
        row["grad"] = grads[row["t"]]["grad"] if row["t"] < len(grads) else None
    return {"positions": rows, "settings": {"tau": tau, "top_k": top_k, "base_format": base_format,
                                            "max_response_tokens": max_response_tokens, "pairs": len(pairs),
                                            "skipped_pairs": skipped, "same_token_sequence": base_format == "chat"}}


# ----------------------------------------------------------------------------------------------
# 4. Targeted completion: the training losses (METHOD §5) and the baselines' losses (METHOD §6)
#    All take float32 log-probs (B, T, V) and a loss mask (B, T) of the positions that count; each returns the
#    mean per counted token, so the terms are comparable and can be logged separately.
# ----------------------------------------------------------------------------------------------


def masked_mean(x, mask) -> torch.Tensor:
    """Mean of x (B, T) over the positions where mask (B, T) is 1."""
    mask = mask.float()
    return (x * mask).sum() / mask.sum().clamp(min=1)


def hybrid_teacher(lp_A, lp_B, targets, lam: float = 0.5, alpha_T: float = 1.0, beta: float = 0.1) -> torch.Tensor:
    """q_t = lam * onehot(r_t) + (1 - lam) * softmax(l_A + alpha_T (l_A - l_B)) on V_head   (METHOD §5).

    The recovery text (hard) blended with the aligned model's distribution amplified away from the base (soft).
    The paper names hybrid-teacher distillation; this blend is our reading of it. Log-probs stand in for
    logits: they differ by a per-position constant, which softmax cancels. (B, T, V), (B, T) -> (B, T, V)."""
    soft = contrastive_logits(lp_A, lp_B, alpha_T, beta).softmax(-1)  # zero outside V_head
    hard = torch.nn.functional.one_hot(targets, lp_A.shape[-1]).to(soft.dtype)
    return lam * hard + (1 - lam) * soft


def kd_loss(q, lp_S, mask) -> torch.Tensor:
    """L_kd = mean_t KL(q_t || p_S(.|c_t)) = sum_v q (log q - lp_S), with 0 log 0 = 0   (METHOD §5)."""
    log_q = torch.where(q > 0, q.log(), torch.zeros_like(q))
    kl = (q * (log_q - lp_S)).sum(-1)  # (B, T)
    return masked_mean(kl, mask)


def adaptive_weights(bf_mass_A, mask, w_max: float = 5.0, mode: str = "adaptive", gamma: float = 1.0,
                     positions=None, mean=None, T=None) -> torch.Tensor:
    """Per-position penalty weights w_t (METHOD §5), recomputed each batch.

    adaptive: w_t = clip(bf_mass_A_t / mean(bf_mass_A), 0, w_max), the mean over the batch's loss positions:
              positions the aligned model has left more incomplete weigh more. (The paper states adaptive,
              position-aware penalties; normalising by the batch mean is our choice.)
    position: w_t = 1 + gamma * t / T, t the response position, T the largest one in the batch.
    `mean` and `T` override the batch statistics (several processes share one global batch).
    bf_mass_A, mask, positions (B, T) -> (B, T); no gradient flows through the weights."""
    if mode == "adaptive":
        mean = (masked_mean(bf_mass_A, mask) if mean is None else mean).clamp(min=1e-8)
        w = (bf_mass_A / mean).clamp(0, w_max)
    elif mode == "position":
        T = ((positions * mask).max() if T is None else T).clamp(min=1)
        w = 1 + gamma * positions / T
    else:
        raise ValueError(f"penalty weight mode {mode!r} is not supported; use 'adaptive' or 'position'")
    return (w * mask).detach()


def bf_penalty(lp_S, bf, weights, mask) -> torch.Tensor:
    """L_pen = mean_t w_t * sum_{v in BF_t} p_S(v|c_t)   (METHOD §5): the student's mass on base-favored tokens.
    Zero when the student puts no mass on them. (B, T, V), (B, T, V) bool, (B, T), (B, T) -> scalar."""
    return masked_mean(weights * bf_mass(lp_S, bf), mask)


def utility_kl(lp_A, lp_S, mask) -> torch.Tensor:
    """L_util = mean_t KL(p_A(.|c_t) || p_S(.|c_t)) over benign responses (METHOD §5)."""
    return masked_mean(kl_per_position(lp_A, lp_S), mask)


def ce_loss(lp_S, targets, mask) -> torch.Tensor:
    """Cross-entropy of the targets (B, T) under the student (baselines sft / augment / insertion)."""
    return masked_mean(-lp_S.gather(-1, targets[..., None]).squeeze(-1), mask)


def qi_beta_schedule(positions) -> torch.Tensor:
    """Qi et al.'s per-token beta_t: 0.5 for the first response token, 2.0 for tokens 2-5, 0.1 after."""
    return torch.where(positions == 0, 0.5, torch.where(positions <= 4, 2.0, 0.1))


def constrained_loss(lp_S, lp_A, targets, beta_t, mask) -> torch.Tensor:
    """Qi et al. 2024's token-wise constrained objective (METHOD §6):
    mean_t (2 / beta_t) * softplus(beta_t * (logp_A(y_t) - logp_S(y_t))).
    Small beta_t behaves like cross-entropy; large beta_t stops pushing once the student's log-prob of y_t
    exceeds the aligned model's, which keeps early tokens close to the aligned model."""
    lp_y_S = lp_S.gather(-1, targets[..., None]).squeeze(-1)
    lp_y_A = lp_A.gather(-1, targets[..., None]).squeeze(-1)
    return masked_mean(2 / beta_t * torch.nn.functional.softplus(beta_t * (lp_y_A - lp_y_S)), mask)


def check_same_tokenizer(tok_A, tok_B, name_A="aligned", name_B="base"):
    """Comparing or contrasting two next-token distributions only makes sense over one vocabulary."""
    if not tok_A.same_vocabulary(tok_B):
        raise ValueError(f"{tok_A.folder} ({name_A}) and {tok_B.folder} ({name_B}) have different tokenizer.json "
                         "vocabularies; base-favored tokens and contrastive decoding need the same tokenizer")


# ----------------------------------------------------------------------------------------------
# 5. Command line
# ----------------------------------------------------------------------------------------------
PROFILE_COLUMNS = ("t", "n", "kl", "bf_mass_A", "bf_mass_B", "bf_count", "bf_hit", "grad")


def profile_table(rows: list[dict]) -> str:
    lines = ["  ".join(f"{c:>9s}" for c in PROFILE_COLUMNS)]
    for r in rows:
        lines.append("  ".join(f"{r[c]:9d}" if c in ("t", "n") else ("        -" if r[c] is None else f"{r[c]:9.4f}")
                               for c in PROFILE_COLUMNS))
    return "\n".join(lines)


def plot_profile(profiles: dict, path, title: str = "") -> bool:
    """KL(p_A || p_B), bf_mass_A and the refusal-SFT gradient signal against response position, one line per
    profile ({label: positions rows}). False (and a hint) when matplotlib, an optional dependency, is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: `pip install matplotlib` to get the plot (the table and JSON are complete)",
              file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    series = [("kl", "KL(p_A || p_B)"), ("bf_mass_A", "bf_mass_A (incompleteness)"), ("grad", "refusal-SFT gradient signal")]
    for ax, (key, label) in zip(axes, series):
        for name, rows in profiles.items():
            pts = [(r["t"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=name)
        ax.set_title(label)
        ax.set_xlabel("response position t")
        ax.grid(alpha=0.3)
    if len(profiles) > 1:
        axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)
    return True


def load_pair(args):
    """(base, aligned, tokenizers, harmful rows, default refusal) for the CLI; toy world when not given."""
    from data import toyworld
    from model import Tokenizer, load_model

    toy = toyworld.ensure_toy_world() if not (args.base and args.aligned and args.data) else None
    base_dir, aligned_dir = Path(args.base or toy["base"]), Path(args.aligned or toy["aligned"])
    tok, base_tok = Tokenizer(aligned_dir), Tokenizer(base_dir)
    check_same_tokenizer(tok, base_tok)
    rows = toyworld.read_jsonl(args.data or toy["data"] / "harmful_eval.jsonl", ["prompt", "harmful_response"])
    refusal = args.refusal or (toyworld.REFUSALS[0] if toy and not args.data else "I'm sorry, but I can't help with that.")
    base = load_model(base_dir, args.dtype, args.device)
    aligned = load_model(aligned_dir, args.dtype, args.device)
    return base, aligned, tok, base_tok, rows[: args.limit], refusal


def cmd_profile(args):
    base, aligned, tok, base_tok, rows, refusal = load_pair(args)
    grad_model = {"base": base, "aligned": aligned}[args.grad_model]
    prof = position_profile(base, aligned, tok, rows, tau=args.tau, top_k=args.top_k, batch_size=args.batch_size,
                            max_response_tokens=args.max_response_tokens, base_format=args.base_format,
                            base_tok=base_tok, refusal=refusal, grad_model=grad_model)
    prof["settings"].update(base=str(args.base or "toy base"), aligned=str(args.aligned or "toy aligned"),
                            refusal=refusal, grad_model=args.grad_model)
    print(profile_table(prof["positions"]))
    print(f"{len(rows)} pairs ({prof['settings']['skipped_pairs']} skipped); both models read "
          f"{'the identical token sequence (aligned chat format)' if args.base_format == 'chat' else 'their own formats'}",
          file=sys.stderr)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(prof, indent=1))
        os.replace(tmp, out)
    plot = args.plot or (Path(args.out).with_suffix(".png") if args.out else None)
    if plot and plot_profile({"A": prof["positions"]}, plot, f"position profile: A = {prof['settings']['aligned']}, B = {prof['settings']['base']}"):
        print(f"plot: {plot}", file=sys.stderr)


@torch.no_grad()
def cmd_tokens(args):
    """For one harmful example: at each response position, the actual token and the top base-favored tokens."""
    base, aligned, tok, _, rows, _ = load_pair(args)
    row = rows[args.example]
    head, resp = response_split(tok, row["prompt"], row["harmful_response"], max_tokens=args.max_response_tokens)
    lp_A = response_log_probs(aligned, [head + resp], [len(head)], [len(resp)], tok.pad_id)  # (len(resp), V)
    lp_B = response_log_probs(base, [head + resp], [len(head)], [len(resp)], tok.pad_id)
    valid = tok.real_token_mask(aligned.args.vocab_size).to(lp_A.device)
    bf = base_favored_mask(lp_A, lp_B, args.tau, args.top_k, valid)  # (n, V)
    print(f"prompt: {row['prompt']}")
    print("  t  actual token        p_A    p_B   |  top base-favored tokens (p_A -> p_B)")
    for t, y in enumerate(resp):
        ids = bf[t].nonzero().squeeze(-1)
        ids = ids[lp_B[t, ids].argsort(descending=True)][: args.show]
        favored = ", ".join(f"{tok.decode([i])!r} {lp_A[t, i].exp():.2f}->{lp_B[t, i].exp():.2f}" for i in ids.tolist())
        print(f"{t:3d}  {tok.decode([y])!r:16s} {lp_A[t, y].exp():6.3f} {lp_B[t, y].exp():6.3f}  |  {favored or '-'}")


def cmd_plot(args):
    """Overlay saved profiles (e.g. before and after training) in one figure."""
    profiles = {Path(f).stem.removeprefix("profile_"): json.loads(Path(f).read_text())["positions"] for f in args.profiles}
    if plot_profile(profiles, args.out, args.title):
        print(f"plot: {args.out}", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description="Base-favored tokens and position profiles (METHOD §1-3). "
                                            "With no --base/--aligned/--data: the toy world.")
    sub = p.add_subparsers(dest="cmd", required=True)
    overlay = sub.add_parser("plot", help="overlay profile JSON files written by `profile --out`")
    overlay.add_argument("profiles", nargs="+")
    overlay.add_argument("--out", required=True, help="PNG path")
    overlay.add_argument("--title", default="")
    for name in ("profile", "tokens"):
        s = sub.add_parser(name)
        s.add_argument("--base", help="base model folder (default: toy base)")
        s.add_argument("--aligned", help="aligned model folder (default: toy aligned)")
        s.add_argument("--data", help="JSONL of harmful pairs {prompt, harmful_response} (default: toy held-out set)")
        s.add_argument("--tau", type=float, default=1.0, help="BF threshold: lp_B - lp_A > log(tau)")
        s.add_argument("--top-k", type=int, default=20, help="BF tokens must be in the base's top-k")
        s.add_argument("--max-response-tokens", type=int, default=64)
        s.add_argument("--limit", type=int, help="use the first N pairs")
        s.add_argument("--refusal", help="refusal text for the gradient signal (default: the toy refusal, or a generic one)")
        s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    prof = sub.choices["profile"]
    prof.add_argument("--batch-size", type=int, default=16)
    prof.add_argument("--base-format", choices=["chat", "plain"], default="chat",
                      help="chat: both models read the aligned chat format (default); plain: the base reads plain text")
    prof.add_argument("--grad-model", choices=["base", "aligned"], default="base",
                      help="model under which the refusal-SFT gradient signal is measured (default: base, where SFT starts)")
    prof.add_argument("--out", help="write the profile JSON here (and the plot beside it as .png)")
    prof.add_argument("--plot", help="PNG path for the plot (needs matplotlib)")
    tokens = sub.choices["tokens"]
    tokens.add_argument("--example", type=int, default=0, help="index of the pair to show")
    tokens.add_argument("--show", type=int, default=5, help="base-favored tokens shown per position")
    args = p.parse_args(argv)
    {"profile": cmd_profile, "tokens": cmd_tokens, "plot": cmd_plot}[args.cmd](args)


if __name__ == "__main__":
    main()
