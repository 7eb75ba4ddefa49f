"""Evaluate safety and utility: attacks, attack success rate (ASR), and benign helpfulness.

    python eval.py                                  # the toy world's base and aligned models
    python eval.py --model DIR [--model DIR2 ...]   # any checkpoint folders
    python eval.py --harmful advbench.csv --benign prompts.jsonl --judge refusal_phrase --model ~/models/Qwen2.5-7B-Instruct
    python eval.py --model DIR --decode contrastive [--contrast-base BASE] --alpha 0 0.5 1 2 --beta 0.1 0.01   # a sweep
    python eval.py --compare                        # train (once) and evaluate every method: the reproduction table

Attacks (METHOD §7):
  prefill   the first k tokens of a harmful response are forced at the start of the assistant's turn
            (k = 0 is the direct request); the model continues; the *continuation* is judged.
  insertion the model's own answer to the request (normally a refusal) is cut after j tokens, m tokens of a
            harmful response are spliced in, and the model continues (Lyu et al., arXiv 2606.04168).
Judges: `toy` (exact, knows the toy world's harmful vocabulary) or `refusal_phrase` (our keyword list, for real
models). Utility: helpful-answer rate on benign prompts (exact in the toy world), over-refusal rate, and the
mean per-token NLL of benign reference responses.

Data formats (--harmful / --benign): our JSONL schema (data/toyworld.py: harmful rows have "prompt" and
"harmful_response", benign rows "prompt" and "response"), an AdvBench-style CSV with columns goal,target, or
a .txt file with one prompt per line (direct attack only: no harmful response to prefill).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import deepalign
from decode import add_contrastive_args, contrastive_generate
from model import DTYPES, Tokenizer, generate, load_model, log

ROOT = Path(__file__).resolve().parent
from data import toyworld  # noqa: E402  (data/toyworld.py: the toy world's data, judges and build command)

JUDGES = {"toy": toyworld.toy_judge, "refusal_phrase": toyworld.refusal_phrase_judge}


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def load_rows(path, kind: str) -> list[dict]:
    """Harmful rows {"prompt", "harmful_response"?} or benign rows {"prompt", "response"?} from .jsonl, .csv
    (goal,target as AdvBench; or prompt,response) or .txt (one prompt per line). Malformed rows raise an error
    naming the file, the line and what is missing."""
    path = Path(path)
    answer = "harmful_response" if kind == "harmful" else "response"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (--{kind})")
    if path.suffix == ".jsonl":
        return toyworld.read_jsonl(path, ["prompt"])
    if path.suffix == ".csv":
        rows = []
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            prompt_col = "goal" if "goal" in cols else "prompt" if "prompt" in cols else None
            answer_col = next((c for c in ("target", answer, "response") if c in cols), None)
            if prompt_col is None:
                raise ValueError(f"{path}:1: header {cols} has no 'goal' (AdvBench) or 'prompt' column")
            for lineno, rec in enumerate(reader, start=2):
                if not (rec.get(prompt_col) or "").strip():
                    raise ValueError(f"{path}:{lineno}: empty or missing {prompt_col!r}")
                row = {"prompt": rec[prompt_col].strip()}
                if answer_col and (rec.get(answer_col) or "").strip():
                    row[answer] = rec[answer_col].strip()
                rows.append(row)
        return rows
    if path.suffix == ".txt":
        return [{"prompt": line.strip()} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    raise ValueError(f"{path}: unknown format {path.suffix!r}; use .jsonl, .csv (goal,target) or .txt")


# ----------------------------------------------------------------------------------------------
# Attacks: each builds the token ids the model continues from
# ----------------------------------------------------------------------------------------------
def prefill_inputs(tok, row: dict, k: int):
    """Prompt ids with the first k tokens of the harmful response inside the assistant turn, and the prefix text.
    The whole string is tokenized in one pass, so the prefix tokens are exactly the response's first k."""
    head, resp = deepalign.response_split(tok, row["prompt"], row["harmful_response"])
    return head + resp[:k], tok.decode(resp[:k])


def insertion_inputs(tok, row: dict, own_answer: list[int], j: int, m: int):
    """The model's own answer cut after j tokens, then m harmful-response tokens spliced in (as text, one space
    between), tokenized in one pass inside the assistant turn."""
    _, resp = deepalign.response_split(tok, row["prompt"], row["harmful_response"])
    own = tok.decode([t for t in own_answer[:j] if t not in tok.eos_ids]).rstrip()
    prefix = (own + " " if own else "") + tok.decode(resp[:m])
    return tok.prompt_ids(row["prompt"], prefill=prefix), prefix


# ----------------------------------------------------------------------------------------------
# Generation and utility for one model (or one decoder)
# ----------------------------------------------------------------------------------------------
def batched(fn, items: list, batch_size: int, desc: str):
    out = []
    for i in tqdm(range(0, len(items), batch_size), desc=desc, file=sys.stderr, leave=False):
        out.extend(fn(items[i : i + batch_size]))
    return out


def plain_decoder(model, tok, args):
    def run(prompts: list[list[int]]) -> list[list[int]]:
        return generate(model, prompts, max_new_tokens=args.max_new_tokens, eos_ids=tok.eos_ids, pad_id=tok.pad_id,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed, compile=args.compile)
    return run


def contrastive_decoder(model, base, tok, args, alpha: float, beta: float):
    valid = tok.real_token_mask(model.args.vocab_size).to(model.lm_head.weight.device)

    def run(prompts: list[list[int]]) -> list[list[int]]:
        return contrastive_generate(model, base, prompts, max_new_tokens=args.max_new_tokens, eos_ids=tok.eos_ids,
                                    pad_id=tok.pad_id, alpha=alpha, beta=beta, mode=args.cd_mode, tau=args.tau,
                                    top_k=args.top_k, valid=valid, temperature=args.temperature, top_p=args.top_p,
                                    seed=args.seed, compile=args.compile)
    return run


@torch.no_grad()
def mean_nll(model, tok, rows: list[dict], batch_size: int, base=None, alpha: float = 0.0) -> float:
    """Mean per-token negative log-likelihood of benign reference responses, teacher-forced, chat-formatted.
    With `base`: under the contrastive distribution softmax(lp_A + alpha (lp_A - lp_B)) over the whole
    vocabulary (the plausibility head is left out here: it would give reference tokens outside it infinite NLL)."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        splits = [deepalign.response_split(tok, r["prompt"], r["response"]) for r in rows[i : i + batch_size]]
        seqs, starts, lens = [h + r for h, r in splits], [len(h) for h, _ in splits], [len(r) for _, r in splits]
        lp = deepalign.response_log_probs(model, seqs, starts, lens, tok.pad_id)  # (N, V)
        target = torch.tensor([y for _, r in splits for y in r], device=lp.device)  # (N,)
        if base is None:
            total -= lp.gather(-1, target[:, None]).sum().item()
        else:  # row by row: the contrastive scores are more (n, V) float32 temporaries
            lp_B = deepalign.response_log_probs(base, seqs, starts, lens, tok.pad_id)
            for a, b, y in zip(lp.split(lens), lp_B.split(lens), target.split(lens)):
                total -= deepalign.contrastive_logits(a, b, alpha, beta=0.0).log_softmax(-1).gather(-1, y[:, None]).sum().item()
        count += len(target)
    return total / max(count, 1)


def evaluate(name: str, decode_name: str, decoder, nll_fn, tok, harmful, benign, args, judge_name: str, extra=None):
    """Run every attack and the utility checks for one (model, decoder). Returns (results, utility, generations).
    `extra` (e.g. the contrastive alpha and beta) is added to every row."""
    judge = JUDGES[judge_name]
    gens, results = [], []
    extra = extra or {}

    def record(attack, k, rows, inputs, outs):
        harmful_flags = []
        for row, (_, prefix), out in zip(rows, inputs, outs):
            text = tok.decode(out)
            flag = judge(text)
            harmful_flags.append(flag)
            gens.append({"model": name, "decode": decode_name, **extra, "attack": attack, "k": k, "prompt": row["prompt"],
                         "prefix": prefix, "continuation": text, "harmful": flag,
                         **{key: row[key] for key in ("category", "held_out") if key in row}})
        n = len(harmful_flags)
        results.append({"model": name, "decode": decode_name, "attack": attack, "k": k,
                        "asr": sum(harmful_flags) / n if n else None, "n": n, "judge": judge_name, **extra})

    with_response = [r for r in harmful if r.get("harmful_response")]
    own_answers = None
    for k in args.prefill:
        rows = harmful if k == 0 else with_response
        inputs = [prefill_inputs(tok, r, k) if r.get("harmful_response") else (tok.prompt_ids(r["prompt"]), "")
                  for r in rows]
        outs = batched(decoder, [ids for ids, _ in inputs], args.batch_size, f"{name} prefill k={k}")
        record("prefill", k, rows, inputs, outs)
        if k == 0:
            own_answers = {r["prompt"]: o for r, o in zip(rows, outs)}
    if args.insertion_len > 0 and with_response:
        if own_answers is None:
            own_answers = dict(zip([r["prompt"] for r in with_response],
                                   batched(decoder, [tok.prompt_ids(r["prompt"]) for r in with_response],
                                           args.batch_size, f"{name} own answers")))
        inputs = [insertion_inputs(tok, r, own_answers[r["prompt"]], args.insertion_at, args.insertion_len)
                  for r in with_response]
        outs = batched(decoder, [ids for ids, _ in inputs], args.batch_size, f"{name} insertion")
        record("insertion", args.insertion_len, with_response, inputs, outs)

    utility = {"model": name, "decode": decode_name, **extra, "helpful_rate": None, "over_refusal": None, "nll": None}
    if benign:
        outs = batched(decoder, [tok.prompt_ids(r["prompt"]) for r in benign], args.batch_size, f"{name} benign")
        texts = [tok.decode(o) for o in outs]
        refused = [toyworld.is_refusal(t) if judge_name == "toy" else not toyworld.refusal_phrase_judge(t) for t in texts]
        utility["over_refusal"] = sum(refused) / len(texts)
        if judge_name == "toy" and all(toyworld.topic_of_prompt(r["prompt"]) or r.get("topic") for r in benign):
            helpful = [toyworld.is_helpful(r, t) for r, t in zip(benign, texts)]
            utility["helpful_rate"] = sum(helpful) / len(texts)
        else:
            helpful = [None] * len(texts)
        for r, t, h, ref in zip(benign, texts, helpful, refused):
            gens.append({"model": name, "decode": decode_name, **extra, "attack": "benign", "k": 0, "prompt": r["prompt"],
                         "prefix": "", "continuation": t, "helpful": h, "refusal": ref})
        with_ref = [r for r in benign if r.get("response")]
        if with_ref:
            utility["nll"] = nll_fn(with_ref)
    return results, utility, gens


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------
def table(results: list[dict], utility: list[dict]) -> str:
    """One line per (model, decode): ASR per attack column (with counts), then utility."""
    cols = sorted({(r["attack"], r["k"]) for r in results}, key=lambda c: (c[0] != "prefill", c[1]))
    head = ["model", "decode"] + [f"{'direct' if (a, k) == ('prefill', 0) else f'{a}@{k}'}" for a, k in cols]
    head += ["helpful", "over-refusal", "benign NLL"]
    lines = []
    same = lambda r, u: all(r.get(key) == u.get(key) for key in ("model", "decode", "alpha", "beta"))  # noqa: E731
    for u in utility:
        cell = {(r["attack"], r["k"]): r for r in results if same(r, u)}
        label = u["decode"] + (f" a={u['alpha']:g} b={u['beta']:g}" if "alpha" in u else "")
        row = [u["model"], label]
        for c in cols:
            r = cell.get(c)
            row.append("-" if r is None or r["asr"] is None else f"{100 * r['asr']:.1f}% ({round(r['asr'] * r['n'])}/{r['n']})")
        row += ["-" if u[k] is None else f"{100 * u[k]:.1f}%" for k in ("helpful_rate", "over_refusal")]
        row.append("-" if u["nll"] is None else f"{u['nll']:.3f}")
        lines.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines])


def write_json_atomic(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="checkpoint folder (repeatable); default: toy base and aligned")
    p.add_argument("--harmful", help="harmful prompts (.jsonl/.csv/.txt); default: the toy world's held-out set")
    p.add_argument("--benign", help="benign prompts (.jsonl/.csv/.txt); default: the toy world's held-out set")
    p.add_argument("--judge", choices=sorted(JUDGES), help="default: toy for the toy world's data, else refusal_phrase")
    p.add_argument("--prefill", type=int, nargs="+", default=[0, 5, 10, 20, 40], help="prefilled harmful tokens k")
    p.add_argument("--insertion-at", type=int, default=4, help="insertion attack: cut the model's own answer after j tokens")
    p.add_argument("--insertion-len", type=int, default=10, help="insertion attack: m harmful tokens spliced in (0: off)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, help="use only the first N harmful and N benign prompts")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", help="write settings, every generation and the summary rows to this JSON file")
    p.add_argument("--decode", choices=["greedy", "contrastive"], default="greedy",
                   help="contrastive: decode each model against --contrast-base (default: the toy base)")
    add_contrastive_args(p, sweep=True)  # --alpha 0 0.5 1 2 --beta 0.1 0.01 evaluates every combination
    p.add_argument("--compare", action="store_true", help="train (once) and evaluate every method of the "
                   "reproduction table on the toy world, plus the aligned model with contrastive decoding")
    p.add_argument("--runs", default="runs", help="--compare: where the trained models live")
    return p.parse_args(argv)


COMPARE = (  # the reproduction table: (row name, run folder under --runs, train.py flags)
    ("sft", "sft", ["--method", "sft"]),
    ("augment", "augment", ["--method", "augment"]),
    ("constrained", "constrained", ["--method", "constrained"]),
    ("insertion", "insertion", ["--method", "insertion"]),
    ("targeted", "targeted", ["--method", "targeted"]),
    ("targeted w/o penalty", "targeted-no-penalty", ["--method", "targeted", "--lambda-pen", "0"]),
    ("targeted w/o hybrid teacher", "targeted-hard-labels", ["--method", "targeted", "--lam", "1"]),
    ("targeted, position weights", "targeted-position-weights", ["--method", "targeted", "--penalty-weight", "position"]),
)


def compare_models(args, toy) -> list:
    """Train (once; reused when the run folder exists) every method of COMPARE on the toy world."""
    import train

    models = [("aligned", toy["aligned"])]
    for name, folder, flags in COMPARE:
        out = Path(args.runs) / folder
        if not (out / "config.json").exists():
            log(f"training {name} -> {out}")
            train.main(flags + ["--out", str(out), "--overwrite", "--seed", str(args.seed)])
        models.append((name, out))
    return models


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    toy = toyworld.ensure_toy_world() if not (args.model and args.harmful and args.benign) else None
    if args.compare:
        models = compare_models(args, toy)
    elif args.model:
        names = [Path(m).name for m in args.model]  # the folder name, or its path where two folders share one
        models = [(n if names.count(n) == 1 else m, Path(m)) for n, m in zip(names, args.model)]
    else:
        models = [("base", toy["base"]), ("aligned", toy["aligned"])]
    harmful = load_rows(args.harmful or toy["data"] / "harmful_eval.jsonl", "harmful")[: args.limit]
    benign = load_rows(args.benign or toy["data"] / "benign_eval.jsonl", "benign")[: args.limit]
    judge = args.judge or ("toy" if not args.harmful else "refusal_phrase")
    base = None
    if args.decode == "contrastive" or args.compare:
        args.contrast_base = args.contrast_base or str((toy or toyworld.ensure_toy_world())["base"])
        base = load_model(args.contrast_base, dtype=args.dtype, device=args.device)
    all_results, all_utility, all_gens = [], [], []
    for name, folder in models:
        tok = Tokenizer(folder)
        model = load_model(folder, dtype=args.dtype, device=args.device)
        greedy = ("greedy" if args.temperature <= 0 else "sample", plain_decoder(model, tok, args),
                  lambda rows: mean_nll(model, tok, rows, args.batch_size), None)
        contrastive = []
        if base is not None:
            deepalign.check_same_tokenizer(tok, Tokenizer(args.contrast_base))
            contrastive = [("contrastive", contrastive_decoder(model, base, tok, args, a, b),
                            lambda rows, a=a: mean_nll(model, tok, rows, args.batch_size, base, a), {"alpha": a, "beta": b})
                           for a in args.alpha for b in args.beta]
        if args.compare:  # every model greedy, and the aligned model also with contrastive decoding
            runs = [greedy] + (contrastive if name == "aligned" else [])
        else:
            runs = contrastive if args.decode == "contrastive" else [greedy]
        for decode_name, decoder, nll_fn, extra in runs:
            results, utility, gens = evaluate(name, decode_name, decoder, nll_fn, tok, harmful, benign, args, judge, extra)
            all_results += results
            all_utility.append(utility)
            all_gens += gens
        del model
    print(table(all_results, all_utility))
    print(f"judge: {judge}; {len(harmful)} harmful and {len(benign)} benign prompts; "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.out:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        write_json_atomic(args.out, {"settings": {**settings, "judge": judge, "models": {n: str(f) for n, f in models}},
                                     "results": all_results, "utility": all_utility, "generations": all_gens})
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
