"""Training examples (docs/method.md §5-§6): how a harmful or benign row becomes token ids and loss places
for train.py. Every example is one sequence and the logits that predict its targets; a batch is the examples
right-padded, their loss positions concatenated. All work on token lists, as generation sees text: the
recovery's tokens as they follow a harmful prefix, the clean context where the aligned model's alignment is
complete (targeted's teacher), and the splices of worst-insertion training.

    Example, Batch, collate                  a sequence and its loss positions; a padded batch of them
    loss_log_probs                           a model's log-probs at a batch's loss positions only
    recovery_example, dense_example,         prompt + h_<k + recovery; the dense contexts c_t = (x, h_<t);
    answer_example                           prompt + answer (utility anchors, fine-tuning data)
    targeted_examples, targeted_batch        the above for `targeted`, and where each position reads its
                                             clean-context teacher (TeacherIndex)
    insertion_candidates, worst_insertion    insertion's splices, and the one the student finds likeliest
    word_start_ids                           answer-initial tokens -> the mid-text tokens of the same word
    *_batch, draw_*, Data                    each method's harmful batch and what a row draws for it
                                             (train.METHODS; train.make_batches draws and batches a step)
"""

from __future__ import annotations

import functools
import math
import random
from typing import NamedTuple

import torch

import deepalign as D
from infra.tokenizer import Tokenizer


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


class Batches(NamedTuple):
    """One step's batches (train.make_batches), on this process."""

    safety: Batch
    utility: Batch | None
    teacher: TeacherIndex | None
    shares: dict  # {loss term: this process's token share} (1.0 in a single process: token_share)


def loss_log_probs(model, batch: Batch) -> torch.Tensor:
    """Float32 log-probs (N, V) at the loss positions only (the head never computes the whole (B, T, V))."""
    return D.log_probs(model(batch.ids, logits_at=(batch.rows, batch.cols)))


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


def targeted_batch(tok, draws: list, student, cfg: D.LossConfig, device) -> tuple[Batch, TeacherIndex]:
    """The harmful batch of `targeted` for draws [(row, k)]: every row's dense and recovery examples, and
    where each of their loss positions reads its clean-context teacher (targeted_examples)."""
    examples, cleans, index, word_start, soft = [], [], [], [], []
    for row, k in draws:
        pair, clean, idx, ws, sf = targeted_examples(tok, row, k, cfg.max_prefix)
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
# Each method's harmful batch (train.METHODS): what a row draws, and the examples made from the draws
# ----------------------------------------------------------------------------------------------
def recovery_batch(tok, draws: list, student, cfg: D.LossConfig, device) -> tuple[Batch, None]:
    """sft, augment: for draws [(row, k)], prompt + the first k harmful tokens + the recovery."""
    return collate([recovery_example(tok, row, k) for row, k in draws], tok.pad_id, device), None


def dense_batch(tok, draws: list, student, cfg: D.LossConfig, device) -> tuple[Batch, None]:
    """rto: every dense harmful context of each row, the first recovery token its target."""
    return collate([dense_example(tok, row, cfg.max_prefix) for row, _ in draws], tok.pad_id, device), None


def answer_batch(tok, draws: list, student, cfg: D.LossConfig, device) -> tuple[Batch, None]:
    """constrained, finetune: fine-tuning data, the answer given (the harmful response) is the target."""
    examples = [answer_example(tok, row["prompt"], row["harmful_response"]) for row, _ in draws]
    return collate(examples, tok.pad_id, device), None


def insertion_batch(tok, draws: list, student, cfg: D.LossConfig, device) -> tuple[Batch, None]:
    """insertion: for draws [(row, candidate splices)], the splice the student finds most likely, then the
    recovery."""
    examples = [
        recovery_example(tok, row, 0, worst_insertion(student, tok, row, splices, device))
        for row, splices in draws
    ]
    return collate(examples, tok.pad_id, device), None


def draw_uniform(rng: random.Random, row: dict, data: Data, run, cfg: D.LossConfig) -> int:
    """k ~ U{0..K} (§5, §6; rto, constrained and finetune draw it too, unused, as they always have)."""
    return rng.randint(0, cfg.max_prefix)


def draw_none(rng: random.Random, row: dict, data: Data, run, cfg: D.LossConfig) -> int:
    """k = 0: the bare prompt (sft)."""
    return 0


def draw_augment(rng: random.Random, row: dict, data: Data, run, cfg: D.LossConfig) -> int:
    """Qi et al.'s augmentation: k = 0 half the time, else k ~ U[1, K]."""
    K = cfg.max_prefix
    return 0 if K < 1 or rng.random() < 0.5 else rng.randint(1, K)


def draw_splices(rng: random.Random, row: dict, data: Data, run, cfg: D.LossConfig) -> list:
    """insertion: run.insert_candidates random splices of the row into the aligned model's own answer."""
    own = data.own_answers[row["prompt"]]
    return insertion_candidates(data.tok, row, own, rng, run.insert_candidates)


class Data(NamedTuple):
    """What a run's batches are drawn from."""

    tok: Tokenizer
    safety: list  # harmful rows {"prompt", "harmful_response", "recovery"}
    benign: list  # utility rows {"prompt", "response"} (none for finetune)
    own_answers: dict  # insertion: the aligned model's own answer to each harmful prompt (ids)
