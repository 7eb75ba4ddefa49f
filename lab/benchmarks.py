"""Utility benchmarks for real models: MMLU and BBH accuracy, run by our own model.py (docs/method.md §7).

Alignment must not cost utility, and the paper reports MMLU and BBH. Both read the user's local copies:
    MMLU  hendrycks/test layout: {folder}/dev/{subject}_dev.csv and {folder}/test/{subject}_test.csv, no
          header, columns question,A,B,C,D,answer. The prompt is built exactly as hendrycks' evaluate.py
          builds it; the prediction is the letter (" A" .. " D") most likely after "Answer:": the summed
          log-probability of its tokens, as lm-eval-harness scores a continuation (one token in most
          tokenizers).
    BBH   BIG-Bench Hard task files {"examples": [{"input", "target"}]}, few-shot from each task's first
          examples, greedy generation, exact match of the first line of the answer.
Both are plain text (no chat template) with the BOS the tokenizer's post-processor adds, batched with left
padding; progress goes to stderr.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from decode import Sampling, generate, left_pad, next_token_logits
from infra.progress import progress_bar

CHOICES = ("A", "B", "C", "D")


# ----------------------------------------------------------------------------------------------
# MMLU
# ----------------------------------------------------------------------------------------------
def mmlu_root(folder) -> Path:
    """The folder holding dev/ and test/: the one given, or its data/ (the tarball's layout)."""
    folder = Path(folder)
    for root in (folder, folder / "data"):
        if (root / "dev").is_dir() and (root / "test").is_dir():
            return root
    raise FileNotFoundError(
        f"{folder}: no dev/ and test/ folders (nor data/dev, data/test); pass the hendrycks MMLU data folder"
    )


def read_mmlu_csv(path: Path) -> list[list[str]]:
    """Rows [question, A, B, C, D, answer] of one headerless MMLU file; fields are used verbatim (hendrycks
    reads them with pandas, which would print a numeric column's '1' as '1.0')."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        start = 1
        for fields in reader:
            if fields:
                if len(fields) != 6 or fields[5].strip() not in CHOICES:
                    raise ValueError(
                        f"{path}:{start}: expected question,A,B,C,D,answer with answer in A-D, "
                        f"got {len(fields)} fields ending in {fields[-1]!r}"
                    )
                rows.append(fields[:5] + [fields[5].strip()])
            start = reader.line_num + 1
    return rows


def format_subject(subject: str) -> str:
    """hendrycks' format_subject: every underscore-separated word with a space in front, so the header reads
    'about  abstract algebra.' with two spaces, as in the original prompts."""
    return "".join(" " + word for word in subject.split("_"))


def format_example(row: list[str], include_answer: bool = True) -> str:
    """hendrycks' format_example: the question, each choice as '\\nA. ...', '\\nAnswer:', and for a shot
    the answer letter and a blank line."""
    choices = "".join(f"\n{letter}. {choice}" for letter, choice in zip(CHOICES, row[1:5]))
    text = row[0] + choices + "\nAnswer:"
    return text + f" {row[5]}\n\n" if include_answer else text


def mmlu_prompt(subject: str, shots: list[list[str]], question: list[str]) -> str:
    """hendrycks' gen_prompt + format_example: a header, the shots with answers, the question up to
    'Answer:'."""
    about = format_subject(subject)
    header = f"The following are multiple choice questions (with answers) about {about}.\n\n"
    return header + "".join(format_example(s) for s in shots) + format_example(question, include_answer=False)


def letter_continuations(tok, prompt: str) -> list[list[int]]:
    """The token ids of " A" .. " D" after `prompt` (which ends in "Answer:"), split as lm-eval-harness splits
    a context and its continuation: the tokens of prompt + " X" after those of the prompt. One token each in
    most tokenizers; several where the vocabulary has no " A"."""
    head = tok.encode(prompt)
    conts = []
    for letter in CHOICES:
        full = tok.encode(f"{prompt} {letter}")
        if full[: len(head)] != head or len(full) == len(head):
            raise ValueError(
                f"{tok.folder}: the tokenizer merges ' {letter}' into the tokens of 'Answer:' before it; "
                "MMLU scoring needs the prompt's tokens unchanged, the letter's after them"
            )
        conts.append(full[len(head) :])
    return conts


@torch.no_grad()
def continuation_log_probs(model, prompts: list[list[int]], conts: list[list[int]], pad_id: int):
    """Summed log-probability (N,) of each continuation conts[i] (non-empty) after prompts[i], teacher-forced:
    one left-padded forward over prompt + continuation, logits only where they predict a continuation
    token."""
    device = model.lm_head.weight.device
    ids, mask = left_pad([p + c for p, c in zip(prompts, conts)], pad_id, device)  # (N, T)
    T = ids.shape[1]
    rows = torch.cat([torch.full((len(c),), i) for i, c in enumerate(conts)]).to(device)  # (M,)
    cols = torch.cat([torch.arange(T - len(c), T) for c in conts]).to(device)  # (M,): continuation tokens
    logits = model(ids, attention_mask=mask, logits_at=(rows, cols - 1))  # (M, V): each predicts the next
    token_lp = logits.float().log_softmax(-1).gather(-1, ids[rows, cols][:, None])[:, 0]  # (M,)
    return torch.zeros(len(conts), device=device).index_add_(0, rows, token_lp)  # (N,)


def batch_letter_scores(model, seqs: list[list[int]], conts: list[list[list[int]]], pad_id: int):
    """(B, 4) summed log-probabilities of the letters' tokens conts[b] after each prompt seqs[b]. Letters of
    one token each: one forward, next-token log-probabilities (the fast path). Else prompt + letter is
    teacher-forced, four sequences per question, in forwards of B sequences."""
    if all(len(c) == 1 for letters in conts for c in letters):
        log_probs = next_token_logits(model, seqs, pad_id).log_softmax(-1)  # (B, V)
        ids = torch.tensor([[c[0] for c in letters] for letters in conts], device=log_probs.device)  # (B, 4)
        return log_probs.gather(-1, ids).cpu()
    prompts = [s for s in seqs for _ in CHOICES]  # (4B,): each prompt once per letter
    flat = [c for letters in conts for c in letters]  # (4B,)
    B = len(seqs)
    parts = [
        continuation_log_probs(model, prompts[i : i + B], flat[i : i + B], pad_id) for i in range(0, 4 * B, B)
    ]
    return torch.cat(parts).view(B, len(CHOICES)).cpu()


def letter_scores(model, seqs: list[list[int]], conts: list, pad_id: int, batch_size: int) -> torch.Tensor:
    """(Q, 4) summed log-probabilities of " A" .. " D" after each prompt, in batches of similar lengths."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a batch
    scores = torch.zeros(len(seqs), len(CHOICES))  # (Q, 4)
    for i in progress_bar(range(0, len(order), batch_size), "mmlu", leave=False):
        batch = order[i : i + batch_size]
        scores[batch] = batch_letter_scores(
            model, [seqs[j] for j in batch], [conts[j] for j in batch], pad_id
        )
    return scores


def mmlu_questions(root: Path, limit: int | None, shots: int) -> list[tuple[str, str, str]]:
    """(subject, prompt, answer) for every test question (at most `limit` per subject), subjects sorted."""
    questions = []
    for test_file in sorted((root / "test").glob("*_test.csv")):
        subject = test_file.name.removesuffix("_test.csv")
        dev_file = root / "dev" / f"{subject}_dev.csv"
        if not dev_file.exists():
            raise FileNotFoundError(f"{dev_file}: missing; {subject}'s {shots}-shot prompts come from it")
        dev = read_mmlu_csv(dev_file)
        if len(dev) < shots:
            raise ValueError(f"{dev_file}: {len(dev)} examples, fewer than shots={shots}")
        for row in read_mmlu_csv(test_file)[:limit]:
            questions.append((subject, mmlu_prompt(subject, dev[:shots], row), row[5]))
    if not questions:
        raise FileNotFoundError(f"{root / 'test'}: no *_test.csv files")
    return questions


def mmlu_accuracy(model, tok, folder, limit: int | None = None, shots: int = 5, batch_size: int = 8) -> dict:
    """MMLU accuracy, hendrycks' protocol (docs/method.md §7): `shots` examples from each subject's dev file,
    plain text with BOS, and the prediction = the letter among " A", " B", " C", " D" whose tokens have the
    highest summed log-probability after the prompt (letter_scores). limit: at most that many test questions
    per subject.
    Returns {"accuracy" (question-weighted), "subjects": {subject: {"accuracy", "n", "predictions", "scores"
    (per question, the four letters' log-probabilities)}}, "n", "shots"}."""
    questions = mmlu_questions(mmlu_root(folder), limit, shots)
    seqs = [tok.encode(prompt, add_special_tokens=True) for _, prompt, _ in questions]
    conts = [letter_continuations(tok, prompt) for _, prompt, _ in questions]
    scores = letter_scores(model, seqs, conts, tok.pad_id, batch_size)  # (Q, 4)
    subjects: dict[str, dict] = {}
    for (subject, _, answer), row in zip(questions, scores.tolist()):
        guess = CHOICES[max(range(len(CHOICES)), key=row.__getitem__)]  # the first of equal scores
        entry = subjects.setdefault(subject, {"correct": 0, "n": 0, "predictions": [], "scores": []})
        entry["correct"] += guess == answer
        entry["n"] += 1
        entry["predictions"].append(guess)
        entry["scores"].append(row)
    correct = sum(s["correct"] for s in subjects.values())
    per_subject = {
        name: {
            "accuracy": s["correct"] / s["n"],
            "n": s["n"],
            "predictions": s["predictions"],
            "scores": s["scores"],
        }
        for name, s in subjects.items()
    }
    n = len(questions)
    return {"accuracy": correct / n, "subjects": per_subject, "n": n, "shots": shots}


# ----------------------------------------------------------------------------------------------
# BBH
# ----------------------------------------------------------------------------------------------
def bbh_prompt(shots: list[dict], example: dict) -> str:
    """Our answer-only few-shot format (not BBH's chain-of-thought prompts): 'Q: {input}\\nA: {target}\\n\\n'
    per shot, then 'Q: {input}\\nA:'."""
    return "".join(f"Q: {s['input']}\nA: {s['target']}\n\n" for s in shots) + f"Q: {example['input']}\nA:"


def bbh_answer(generated: str) -> str:
    """The first line of the generated text, stripped (a base model goes on with the next 'Q: ...')."""
    lines = generated.strip().splitlines()
    return lines[0].strip() if lines else ""


def read_bbh_task(path: Path) -> list[dict]:
    try:
        examples = json.loads(path.read_text(encoding="utf-8"))["examples"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: expected {{'examples': [{{'input', 'target'}}, ...]}} ({e})") from None
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str) or "target" not in ex:
            raise ValueError(f"{path}: examples[{i}] needs a string 'input' and a 'target'")
    return examples


def bbh_accuracy(
    model,
    tok,
    folder,
    limit: int | None = None,
    shots: int = 3,
    max_new_tokens: int = 16,
    batch_size: int = 8,
) -> dict:
    """BBH accuracy (docs/method.md §7) over every task file {folder}/*.json: a task's first `shots` examples
    are its shots, the rest (at most `limit` per task) its questions; greedy generation of up to
    `max_new_tokens`, exact match of bbh_answer with the stripped target.
    Returns {"accuracy" (question-weighted), "tasks": {task: {"accuracy", "n", "answers"}}, "n", "shots"}."""
    files = sorted(Path(folder).glob("*.json"))
    if not files:
        raise FileNotFoundError(f"{folder}: no BBH task files (*.json)")
    tasks, correct, total = {}, 0, 0
    greedy = Sampling(max_new_tokens=max_new_tokens)
    for path in progress_bar(files, "bbh", leave=False):
        examples = read_bbh_task(path)
        questions = examples[shots:][:limit]
        seqs = [tok.encode(bbh_prompt(examples[:shots], ex), add_special_tokens=True) for ex in questions]
        answers = []
        for i in range(0, len(seqs), batch_size):
            outs = generate(model, seqs[i : i + batch_size], greedy, tok.eos_ids, tok.pad_id)
            answers += [bbh_answer(tok.decode(out)) for out in outs]
        right = sum(a == str(ex["target"]).strip() for a, ex in zip(answers, questions))
        n = len(questions)
        tasks[path.stem] = {"accuracy": right / max(n, 1), "n": n, "answers": answers}
        correct, total = correct + right, total + n
    return {"accuracy": correct / max(total, 1), "tasks": tasks, "n": total, "shots": shots}
