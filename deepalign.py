"""The method: base-favored tokens, the position profile, contrastive scores, and the training objectives of
targeted completion and its baselines (Bach, Nguyen, Le & Tran, arXiv 2511.12155).

Every definition is in docs/method.md, which separates what the paper states from our choices where it is
silent; each docstring below names the section (§N) it implements, and every choice is an argument here and a
flag of the commands.

Notation: aligned model A, its base model B, student S (starts as A); lp = log_softmax(logits) in float32;
positions t count *response* tokens from 0. The tensor functions take log-probabilities over the last dim
(..., V) and broadcast over any leading dims: (N, V) for N contexts, or (B, T, V).

Read top to bottom:
    1. per-position quantities (§2, §3)            BaseFavored, base_favored_mask, kl_per_position, bf_mass,
                                                   bf_hit, logit_grad_norm, ...
    2. contrastive scores (§4)                     Contrast, head_mask, contrastive_logits
    3. the position profile over a data set (§3)   position_profile, gradient_signal
    4. targeted completion (§5)                    LossConfig, clean_teacher, contrast_teacher,
                                                   penalty_weights, ..., and targeted_loss, the whole
                                                   objective in one function (targeted_objective: L)
    5. the baselines' losses (§6)                  ce_loss, constrained_loss
train.py computes what the objective reads (the models' log-probs, the penalty's weights over the global
batch, each process's token share); these functions take tensors and a config.
The profile command (python -m experiments.profile profile | tokens | plot) is experiments/profile.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from infra.cli import setting
from infra.progress import progress_bar

# ----------------------------------------------------------------------------------------------
# 1. Per-position quantities
# ----------------------------------------------------------------------------------------------


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax in float32 (logits may be bf16: upcast before any KL or log-prob arithmetic)."""
    return logits.float().log_softmax(-1)


def in_top_k(lp: torch.Tensor, k: int) -> torch.Tensor:
    """(..., V) bool: v is among the top-k of lp, ties included (fewer than k tokens are strictly
    likelier)."""
    k = min(k, lp.shape[-1])
    kth = lp.topk(k, dim=-1).values[..., -1:]  # (..., 1) the k-th largest value
    return lp >= kth


@dataclass(frozen=True)
class BaseFavored:
    """The settings of the base-favored set BF_t (docs/method.md §2)."""

    tau: float = setting(1.0, "base-favored: lp_B - lp_A > log(tau)")
    top_k: int = setting(20, "base-favored tokens are in the base's top-k")
    rho: float = setting(0.01, "base-favored tokens have p_B >= rho * max p_B")


def base_favored_mask(lp_A, lp_B, bf: BaseFavored = BaseFavored(), valid=None) -> torch.Tensor:
    """BF_t = { v : lp_B(v) - lp_A(v) > log(tau),  v in top-k of p_B,  p_B(v) >= rho * max p_B }   (§2).

    The first condition is the paper's (tau = 1: the base gives v more probability than the aligned model);
    top-k and the relative floor rho are our choices: tokens the base would actually say, and not two
    near-zero probabilities that differ by rounding (rho = 0 gives version 1 of §2). `valid` (V,) bool keeps
    the set to real token ids (no padded rows, no reserved special tokens). lp_A, lp_B (..., V) -> (...,
    V)."""
    favored = (lp_B - lp_A) > math.log(bf.tau)  # nan (both -inf) compares False
    mask = favored & in_top_k(lp_B, bf.top_k)
    if bf.rho > 0:
        mask = mask & (lp_B >= lp_B.max(-1, keepdim=True).values + math.log(bf.rho))
    return mask & valid if valid is not None else mask


def kl_per_position(lp_P, lp_Q) -> torch.Tensor:
    """KL(P || Q) = sum_v p(v) (lp_P(v) - lp_Q(v)) per position; terms with p(v) = 0 count 0 (§3 kl_t, as in
    Qi et al. 2024). (..., V) -> (...)."""
    p = lp_P.exp()
    return torch.where(p > 0, p * (lp_P - lp_Q), 0.0).sum(-1)


def bf_mass(lp, mask) -> torch.Tensor:
    """sum_{v in BF_t} p(v): the probability a model still puts on base-favored tokens (§3; under the aligned
    model this is the *incompleteness score* bf_mass_A). (..., V), (..., V) bool -> (...)."""
    return torch.where(mask, lp.exp(), 0.0).sum(-1)


def bf_hit(mask, next_tokens) -> torch.Tensor:
    """1.0 where the actual next token (of the harmful response) is base-favored (§3 bf_hit).
    mask (..., V) bool, next_tokens (...) long -> (...) float."""
    return mask.gather(-1, next_tokens[..., None]).squeeze(-1).float()


def harmful_log_prob(lp, next_tokens) -> torch.Tensor:
    """log p(h_t | x, h_<t): the log-probability a model gives the harmful response's actual next token
    (§7 harmful-continuation likelihood; judge-free, it moves before any ASR does).
    lp (..., V), next_tokens (...) long -> (...)."""
    return lp.gather(-1, next_tokens[..., None]).squeeze(-1)


def logit_grad_norm(p, targets) -> torch.Tensor:
    """|| dLoss_t / dlogits_t || = || softmax(l_t) - onehot(y_t) ||_2 of cross-entropy at each position: the
    per-position gradient signal of SFT (§3 grad_t), in closed form sqrt(sum_v p_v^2 - 2 p_y + 1).
    p (..., V) probabilities, targets (...) -> (...)."""
    p_y = p.gather(-1, targets[..., None]).squeeze(-1)  # (...)
    return (p.pow(2).sum(-1) - 2 * p_y + 1).clamp(min=0).sqrt()


# ----------------------------------------------------------------------------------------------
# 2. Contrastive scores (inference time)
# ----------------------------------------------------------------------------------------------
LOG_FLOOR = -1e4  # a log-prob below this is as impossible as -inf; flooring keeps 0 * inf from making NaN
# Contrastive decoding's defaults. docs/method.md states alpha 1.0, beta 0.1; these were chosen on the
# development worlds (docs/development.md §2): the only setting of the grid that meets the §4 targets there.
CD_ALPHA = 2.0
CD_BETA = 0.03


def head_mask(lp_A, beta: float = CD_BETA) -> torch.Tensor:
    """V_head = { v : p_A(v) >= beta * max p_A } (Li et al. 2022's plausibility filter, §4); beta = 0 keeps
    the whole vocabulary."""
    if beta <= 0:
        return torch.ones_like(lp_A, dtype=torch.bool)
    return lp_A >= lp_A.max(-1, keepdim=True).values + math.log(beta)


@dataclass(frozen=True)
class Contrast:
    """The settings of contrastive decoding (docs/method.md §4)."""

    alpha: float = setting(CD_ALPHA, "contrast strength; 0 = plain aligned decoding")
    beta: float = setting(CD_BETA, "plausibility head: keep p_A >= beta * max p_A")
    cd_mode: str = setting(
        "full",
        "contrast every head token, or base-favored ones only (§2: --tau, --top-k, --rho)",
        choices=("full", "bf"),
    )
    bf: BaseFavored = setting(BaseFavored(), "the base-favored set of cd_mode bf", flag=False)


def contrastive_logits(lp_A, lp_B, c: Contrast = Contrast(), valid=None) -> torch.Tensor:
    """The contrastive score s_t (§4); decode from argmax s_t or softmax(s_t / temperature).

        cd_mode "full":  s(v) = lp_A(v) + alpha (lp_A(v) - lp_B(v))                    on V_head, else -inf
        cd_mode "bf":    s(v) = lp_A(v) - alpha (lp_B(v) - lp_A(v)) [v in BF_t], else lp_A(v)   on V_head

    The paper states contrastive decoding between aligned and base; this form (an expert-amateur contrast with
    Li et al.'s head, i.e. alignment amplified by 1 + alpha) is our choice. alpha = 0 gives lp_A on V_head,
    whose argmax is A's: greedy contrastive decoding at alpha = 0 is plain greedy decoding, token for token.
    `valid` restricts the base-favored set (cd_mode "bf") only. (..., V) -> (..., V)."""
    lp_B = lp_B.clamp(min=LOG_FLOOR)  # (..., V)
    if c.cd_mode == "full":
        s = lp_A + c.alpha * (lp_A - lp_B)
    elif c.cd_mode == "bf":
        bf = base_favored_mask(lp_A, lp_B, c.bf, valid)
        s = torch.where(bf, lp_A - c.alpha * (lp_B - lp_A), lp_A)
    else:
        raise ValueError(f"--cd-mode {c.cd_mode!r} is not supported; use 'full' or 'bf'")
    # The head is not restricted to `valid`: the end-of-turn token is special and must stay choosable.
    return s.masked_fill(~head_mask(lp_A, c.beta), float("-inf"))


# ----------------------------------------------------------------------------------------------
# 3. The position profile: the paper's diagnosis, teacher-forced over a data set
# ----------------------------------------------------------------------------------------------
PROFILE_KEYS = ("kl", "bf_mass_A", "bf_mass_B", "bf_count", "bf_hit", "harmful_lp_A", "harmful_lp_B")
STAT_ROWS = 64  # contexts per chunk of vocabulary-wide statistics (see position_profile)


@dataclass(frozen=True)
class ProfileConfig(BaseFavored):
    """The settings of a position profile (§2, §3): the base-favored set's, and these."""

    max_response_tokens: int = 64
    batch_size: int = 16
    base_format: str = "chat"  # "plain": the base reads its own plain-text format (model.PLAIN_FORMAT_DOC)


def response_split(tok, prompt: str, response: str, plain: bool = False, max_tokens: int | None = None):
    """(prompt ids, response ids) of the chat-formatted prompt with `response` as the assistant's answer,
    tokenized in one pass (as a prefilling attack is). Raises if the tokenizer merges across the boundary."""
    head = tok.prompt_ids(prompt, plain=plain)
    full = tok.prompt_ids(prompt, prefill=response, plain=plain)
    if full[: len(head)] != head:
        raise ValueError(
            f"the response {response[:40]!r}... merges with the generation prompt under this "
            "tokenizer; start responses with a word, not a space or punctuation"
        )
    resp = full[len(head) :]
    return head, resp[:max_tokens] if max_tokens else resp


def right_pad(seqs: list[list[int]], pad_id: int, device):
    """Token lists -> ids (B, T) padded on the right, so every row keeps RoPE positions 0..len-1."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids.to(device)


def response_logits(
    model, seqs: list[list[int]], starts: list[int], lengths: list[int], pad_id: int
) -> torch.Tensor:
    """Teacher-forced logits at response positions, every row's positions concatenated: (sum(lengths), V) in
    the model dtype; row i's block t predicts its response token t from (prompt, response[:t]) (split it with
    `.split(lengths)`). Causal attention: right padding never reaches a real position."""
    device = model.lm_head.weight.device
    ids = right_pad(seqs, pad_id, device)  # (B, T)
    at = torch.zeros(ids.shape, dtype=torch.bool)  # (B, T)
    for i, (s, n) in enumerate(zip(starts, lengths)):
        at[i, s - 1 : s - 1 + n] = True  # the logit at position j predicts token j + 1
    return model(ids, logits_at=at.to(device))  # (N, V): the head runs only where needed


def response_log_probs(model, seqs, starts, lengths, pad_id) -> torch.Tensor:
    """log_softmax of `response_logits` in float32: (sum(lengths), V)."""
    return log_probs(response_logits(model, seqs, starts, lengths, pad_id))


def profile_stats(lp_A, lp_B, next_tokens, cfg: ProfileConfig, valid=None) -> dict[str, torch.Tensor]:
    """The per-context quantities of the position profile (§3): kl, bf_mass_A, bf_mass_B, bf_count, bf_hit,
    and the harmful-continuation log-likelihood under each model (§7: harmful_lp_A, harmful_lp_B).
    lp_A, lp_B (N, V) float32, next_tokens (N,) the harmful response's actual next tokens -> {key: (N,)}."""
    bf = base_favored_mask(lp_A, lp_B, cfg, valid)  # (N, V)
    return {
        "kl": kl_per_position(lp_A, lp_B),
        "bf_mass_A": bf_mass(lp_A, bf),
        "bf_mass_B": bf_mass(lp_B, bf),
        "bf_count": bf.sum(-1).float(),
        "bf_hit": bf_hit(bf, next_tokens),
        "harmful_lp_A": harmful_log_prob(lp_A, next_tokens),
        "harmful_lp_B": harmful_log_prob(lp_B, next_tokens),
    }


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
            self.n = grow(self.n, size)
            self.sums = {k: grow(v, size) for k, v in self.sums.items()}
        self.n.index_add_(0, t, torch.ones(len(t), dtype=torch.float64))
        for k, v in values.items():
            self.sums[k].index_add_(0, t, v.detach().double().cpu())

    def rows(self) -> list[dict]:
        return [
            {"t": t, "n": int(n), **{k: (self.sums[k][t] / n).item() for k in self.sums}}
            for t, n in enumerate(self.n.tolist())
        ]


def grow(x: torch.Tensor, size: int) -> torch.Tensor:
    return torch.cat([x, torch.zeros(size - len(x), dtype=x.dtype)])


def profile_sequences(tok, base_tok, row: dict, cfg: ProfileConfig, end: list[int]):
    """(aligned ids, base ids, aligned response start, base response start, targets) of one pair, or None if
    under base_format "plain" the response does not tokenize the same in both formats. The targets are
    h_0 .. h_{n-1} and then the end of the turn (contexts k = 0..len(h), §1)."""
    head, r = response_split(tok, row["prompt"], row["harmful_response"])
    r = (r + end)[: cfg.max_response_tokens]
    head_B = head
    if cfg.base_format == "plain":
        head_B, r_B = response_split(base_tok, row["prompt"], row["harmful_response"], plain=True)
        if r_B[: cfg.max_response_tokens] != r:
            return None
    return head + r, head_B + r, len(head), len(head_B), r


@torch.no_grad()
def position_profile(
    base,
    aligned,
    tok,
    pairs: list[dict],
    cfg: ProfileConfig = ProfileConfig(),
    base_tok=None,
    progress: bool = True,
) -> dict:
    """Per-position means of kl, bf_mass_A, bf_mass_B, bf_count, bf_hit over harmful (prompt, response) pairs
    (§1-§3): the safety-critical contexts c_t = (x, h_<t), teacher-forced, for t = 0..len(h) (the last
    predicts the chat format's end-of-turn token), at most cfg.max_response_tokens per pair.

    Both models read **the identical token sequence**: the aligned model's chat format with the harmful
    response as the answer. Base models never saw that template; with base_format "plain" the base reads its
    own plain text instead, and a pair is used only where the response tokenizes identically in both formats
    (the skipped ones are counted). The base-favored sets hold real token ids of the shared vocabulary
    only."""
    base_tok = base_tok or tok
    end = [tok.end_of_turn_id] if cfg.base_format == "chat" else []  # plain text has no end-of-turn token
    valid = tok.real_token_mask(aligned.args.vocab_size)
    valid[end] = True  # a special token, but at k = len(h) it is what the two models compete on
    valid = valid.to(aligned.lm_head.weight.device)
    acc, skipped = Accumulator(PROFILE_KEYS), 0
    for i in progress_bar(range(0, len(pairs), cfg.batch_size), "profile", disable=not progress):
        built = [profile_sequences(tok, base_tok, row, cfg, end) for row in pairs[i : i + cfg.batch_size]]
        skipped += sum(b is None for b in built)
        built = [b for b in built if b is not None]
        if not built:
            continue
        seq_A, seq_B, st_A, st_B, resp = (list(column) for column in zip(*built))
        lens = [len(r) for r in resp]
        logits_A = response_logits(aligned, seq_A, st_A, lens, tok.pad_id)  # (N, V), all rows' positions
        logits_B = response_logits(base, seq_B, st_B, lens, tok.pad_id)  # (N, V)
        t = torch.cat([torch.arange(n) for n in lens])  # (N,) response position of each context
        target = torch.tensor([y for r in resp for y in r], device=logits_A.device)  # (N,)
        # The vocabulary-wide statistics go STAT_ROWS contexts at a time: float32 (rows, V) temporaries
        # that fit in a CPU's cache make them ~3x faster than one pass over (N, V), and GPU peak memory
        # stays small.
        for j in range(0, len(t), STAT_ROWS):
            rows = slice(j, j + STAT_ROWS)
            acc.add(
                t[rows],
                profile_stats(log_probs(logits_A[rows]), log_probs(logits_B[rows]), target[rows], cfg, valid),
            )
    settings = {
        **asdict(cfg),
        "pairs": len(pairs),
        "skipped_pairs": skipped,
        "same_token_sequence": cfg.base_format == "chat",
    }
    return {"positions": acc.rows(), "settings": settings}


@torch.no_grad()
def gradient_signal(
    model, tok, pairs: list[dict], refusal: str, max_tokens: int = 64, batch_size: int = 16
) -> list[float]:
    """grad_t (§3): the per-position gradient signal of refusal SFT, ||softmax(l_t) - onehot(r_t)|| at every
    position of (prompt, refusal + end of turn) under `model` (the base, where refusal SFT starts), averaged
    over the pairs' prompts. Each pair's own "refusal" key overrides `refusal`. Returns [mean at t]."""
    acc = Accumulator(["grad"])
    for i in range(0, len(pairs), batch_size):
        rows = pairs[i : i + batch_size]
        splits = [response_split(tok, row["prompt"], row.get("refusal", refusal)) for row in rows]
        splits = [(h, (r + [tok.end_of_turn_id])[:max_tokens]) for h, r in splits]  # as train.py trains it
        lp = response_log_probs(
            model,
            [h + r for h, r in splits],
            [len(h) for h, _ in splits],
            [len(r) for _, r in splits],
            tok.pad_id,
        )  # (N, V)
        target = torch.tensor([y for _, r in splits for y in r], device=lp.device)  # (N,)
        t = torch.cat([torch.arange(len(r)) for _, r in splits])  # (N,)
        acc.add(t, {"grad": logit_grad_norm(lp.exp(), target)})
    return [row["grad"] for row in acc.rows()]


# ----------------------------------------------------------------------------------------------
# 4. Targeted completion (§5): the objective, and each of its parts
#    Inputs are float32 log-probs at the loss positions only, (N, V) for N harmful contexts (dense and
#    recovery, concatenated) and (M, V) for M benign ones; every term is a mean per token.
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossConfig(BaseFavored):
    """Every choice of §5 (and the baselines' of §6), with the defaults docs/method.md states (version 3;
    the development world's evidence for lam is docs/development.md §3)."""

    teacher: str = setting(
        "clean",
        "hybrid teacher: the aligned model's own refusal in the clean context (version 3), in the attacked "
        "context amplified away from the base (version 1), or the data set's recovery, hard labels",
        choices=("clean", "contrast", "hard"),
    )
    # docs/method.md §5 states lam 0.5; the development world chose 1 by the rule of docs/development.md §3
    # (at 0.5 helpfulness fell 3.1 points; the rule allows 2)
    lam: float = setting(1.0, "hybrid teacher: weight of the hard recovery label")
    alpha_t: float = setting(1.0, "--teacher contrast: contrast strength")
    beta: float = setting(0.1, "--teacher contrast: V_head threshold")
    penalty_weight: str = setting(
        "adaptive", "the penalty's per-position weights", choices=("adaptive", "position")
    )
    w_max: float = setting(5.0, "adaptive weights are clipped at w_max")
    gamma: float = setting(1.0, "position weights: w_t = 1 + gamma t / T")
    lambda_pen: float = setting(1.0, "penalty weight (0: no penalty)")
    lambda_util: float = setting(1.0, "utility anchor weight")
    max_prefix: int = setting(40, "K: dense contexts t = 0..min(len(h), K); recovery prefixes k ~ U{0..K}")


def uses_clean_teacher(cfg: LossConfig) -> bool:
    """Whether the teacher has a soft part read in the clean context (§5 --teacher clean with lam < 1); at
    lam = 1 it is the hard labels alone and the clean-context forward is skipped."""
    return cfg.teacher == "clean" and cfg.lam < 1.0


def hard_labels(targets, V: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(targets, V).float()  # (N, V)


def clean_teacher(p_clean, targets, lam: float) -> torch.Tensor:
    """q = lam * onehot(r) + (1 - lam) * p_A(. | clean context)   (§5, --teacher clean).

    The aligned model in the *clean* context, where its alignment is complete (the prompt without the harmful
    prefix, plus the recovery so far), blended with the hard recovery label. p_clean (N, V) probabilities,
    targets (N,) -> q (N, V). At a dense context p_clean is A's distribution over the first token of its own
    answer to x (written as a word that starts mid-text: see word_start_distribution)."""
    return lam * hard_labels(targets, p_clean.shape[-1]) + (1 - lam) * p_clean


def contrast_teacher(lp_A, lp_B, targets, lam: float, alpha_t: float, beta: float) -> torch.Tensor:
    """q = lam * onehot(r) + (1 - lam) * softmax(l_A + alpha_T (l_A - l_B)) on V_head   (§5 --teacher
    contrast, version 1): the aligned model *in the attacked context*, amplified away from the base.
    Log-probs stand in for logits (they differ by a constant per position, which softmax cancels)."""
    c = Contrast(alpha=alpha_t, beta=beta)  # cd_mode "full"
    soft = contrastive_logits(lp_A, lp_B, c).softmax(-1)  # (N, V), zero outside V_head
    return lam * hard_labels(targets, lp_A.shape[-1]) + (1 - lam) * soft


def word_start_distribution(p: torch.Tensor, word_start: torch.Tensor) -> torch.Tensor:
    """A distribution over answer-initial tokens rewritten over the tokens that start the same word in the
    middle of a text: p (N, V), word_start (V,) the id of the mid-text token for every id (byte-level BPE
    spells "sorry" at the start of an answer and " sorry" after a harmful prefix with different ids), so
    q(w) = sum of p(v) over the v with word_start[v] = w. (N, V) -> (N, V)."""
    return torch.zeros_like(p).index_add_(-1, word_start, p)


def kd_loss(q, lp_S) -> torch.Tensor:
    """KL(q || p_S) = sum_v q (log q - lp_S) at each position, with 0 log 0 = 0   (§5 L_kd). (N, V) ->
    (N,)."""
    log_q = torch.where(q > 0, q.log(), torch.zeros_like(q))
    return (q * (log_q - lp_S)).sum(-1)


def hard_kd_loss(targets, lp_S) -> torch.Tensor:
    """KL(one-hot(y) || p_S) = -log p_S(y): L_kd of the hard teacher (lam = 1, or --teacher hard) without
    building its (N, V) one-hot (the one-hot's entropy is 0). (N,), (N, V) -> (N,)."""
    return -lp_S.gather(-1, targets[:, None]).squeeze(-1)


def penalty_weights(bf_mass_A, positions, cfg: LossConfig, mean=None, T=None) -> torch.Tensor:
    """w_t of the adaptive penalty (§5), recomputed each batch; no gradient flows through them.

    adaptive: w_t = clip(bf_mass_A_t / mean(bf_mass_A), 0, w_max), the mean over the batch's positions:
              positions the aligned model left more incomplete weigh more (the normalisation is our choice);
    position: w_t = 1 + gamma t / T, T the last position of the batch.
    `mean` and `T` override the batch's own (several processes share one global batch). (N,) -> (N,)."""
    if cfg.penalty_weight == "adaptive":
        mean = (bf_mass_A.mean() if mean is None else mean).clamp(min=1e-8)
        w = (bf_mass_A / mean).clamp(0, cfg.w_max)
    elif cfg.penalty_weight == "position":
        T = (positions.max() if T is None else T).clamp(min=1)
        w = 1 + cfg.gamma * positions / T
    else:
        raise ValueError(
            f"--penalty-weight {cfg.penalty_weight!r} is not supported; use adaptive or position"
        )
    return w.detach()


def targeted_loss(lp_S, teacher, bf, w, lp_S_util, lp_A_util, cfg: LossConfig, dense) -> dict:
    """The whole objective of targeted completion (§5):

        L = L_kd + lambda_pen L_pen + lambda_util L_util
        L_kd   = mean_t KL(q_t || p_S(.|c_t))                       q: the hybrid teacher (clean_teacher, ...)
        L_pen  = mean_t w_t sum_{v in BF_t} p_S(v|c_t)              BF_t from the frozen A and B (§2)
        L_util = mean_t KL(p_A(.|c_t) || p_S(.|c_t))                over benign responses

    At the N harmful contexts (dense and recovery): lp_S (N, V) the student's log-probs; teacher: q (N, V),
    or for the hard teacher its targets (N,) long (L_kd = -log p_S(y): hard_kd_loss); bf (N, V) the
    base-favored sets of A and B (base_favored_mask); w (N,) the penalty weights (penalty_weights); dense (N,)
    bool marks the dense contexts. lp_S_util, lp_A_util (M, V) at the benign positions. Returns every term
    (kd, kd_dense, kd_recovery, pen, util, bf_mass_S) and "loss", L."""
    hard = not teacher.is_floating_point()
    kl = hard_kd_loss(teacher, lp_S) if hard else kd_loss(teacher, lp_S)  # (N,)
    mass_S = bf_mass(lp_S, bf)  # (N,)
    terms = {
        "kd": kl.mean(),
        "kd_dense": kl[dense].mean() if dense.any() else kl.new_zeros(()),
        "kd_recovery": kl[~dense].mean() if (~dense).any() else kl.new_zeros(()),
        "pen": (w * mass_S).mean(),
        "util": kl_per_position(lp_A_util, lp_S_util).mean(),
        "bf_mass_S": mass_S.mean().detach(),
    }
    terms["loss"] = targeted_objective(terms["kd"], terms["pen"], terms["util"], cfg)
    return terms


def targeted_objective(kd, pen, util, cfg: LossConfig) -> torch.Tensor:
    """L = L_kd + lambda_pen L_pen + lambda_util L_util from its three terms (§5)."""
    return kd + cfg.lambda_pen * pen + cfg.lambda_util * util


# ----------------------------------------------------------------------------------------------
# 5. The baselines' losses (§6)
# ----------------------------------------------------------------------------------------------
def ce_loss(lp_S, targets) -> torch.Tensor:
    """Mean cross-entropy of targets (N,) under the student (sft, augment, rto, insertion)."""
    return -lp_S.gather(-1, targets[:, None]).squeeze(-1).mean()


def qi_beta_schedule(positions) -> torch.Tensor:
    """Qi et al.'s per-token beta_t (§6, §8): 0.5 for the first response token, 2.0 for tokens 2-5, 0.1
    after."""
    return torch.where(positions == 0, 0.5, torch.where(positions <= 4, 2.0, 0.1))


def constrained_loss(lp_S, lp_A, targets, beta_t) -> torch.Tensor:
    """Qi et al. 2024's token-wise constrained objective (§6, §8):
    mean_t (2 / beta_t) softplus(beta_t (logp_A(y_t) - logp_S(y_t))). Small beta_t behaves like cross-entropy;
    a large one stops pushing once the student's log-prob of y_t exceeds the aligned model's."""
    lp_y_S = lp_S.gather(-1, targets[:, None]).squeeze(-1)  # (N,)
    lp_y_A = lp_A.gather(-1, targets[:, None]).squeeze(-1)  # (N,)
    return (2 / beta_t * torch.nn.functional.softplus(beta_t * (lp_y_A - lp_y_S))).mean()


def check_same_tokenizer(tok_A, tok_B, name_A="aligned", name_B="base"):
    """Comparing or contrasting two next-token distributions only makes sense over one vocabulary."""
    if not tok_A.same_vocabulary(tok_B):
        raise ValueError(
            f"{tok_A.folder} ({name_A}) and {tok_B.folder} ({name_B}) have different "
            "tokenizer.json vocabularies; base-favored tokens and contrastive decoding need one "
            "tokenizer"
        )
