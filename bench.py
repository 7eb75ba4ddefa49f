"""Speed and memory, every figure a ratio measured side by side in one run (a script, not a test).

    python bench.py                 # CPU, float32: a Llama-shaped ~125M-parameter model with random weights
    python bench.py --size toy      # the toy world's shape (seconds)
    python bench.py --out bench.json [--compile] [--device cuda --dtype bfloat16]

Rows (ours / reference, target):
  prefill            tokens/s of one forward, our model.py vs transformers on the same weights        >= 1.0x
  decode bN          greedy tokens/s, our static KV cache vs transformers' generate (128 new tokens)   >= 1.5x
  decode bN compile  the same with --compile (compile time printed apart)                              report
  contrastive        tokens/s of contrastive decoding vs plain decoding (two forwards is 0.5x)        >= 0.45x
  profile            tokens/s of position_profile vs one teacher-forced forward                        >= 0.45x
  train step         seconds of one `targeted` step vs one plain SFT step on the same batch            <= 1.8x
Each measurement runs in its own process, so "peak MB" is that measurement's own peak resident memory.
Beside every decode figure: its fraction of the memory-bandwidth limit, weight bytes per token / the
bandwidth of a streaming mat-vec measured in the same run (batch 1 must read every weight once per token).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
SIZES = {  # Llama-shaped random models
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, vocab_size=32000),
    "toy": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1664),
}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat: int = 3) -> float:
    """Median wall time of fn() after one warm-up call."""
    return timed_pair(fn, None, repeat)[0]


def timed_pair(ours, reference, repeat: int = 3) -> tuple[float, float]:
    """Median wall times of ours() and reference(), after one warm-up call each, measured *alternately*
    (ours, reference, ours, ...) so that a slow spell of a shared machine hits both sides alike."""
    fns = [f for f in (ours, reference) if f is not None]
    times = [[] for _ in fns]
    for f in fns:
        f()
    for _ in range(repeat):
        for f, ts in zip(fns, times):
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            ts.append(time.perf_counter() - t0)
    medians = [sorted(ts)[len(ts) // 2] for ts in times]
    return (medians[0], medians[1] if len(medians) > 1 else None)


def make_checkpoint(size: str, folder: Path, seed: int = 0) -> Path:
    """Random weights in a real HF folder (written by transformers, the reference), plus the toy tokenizer."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**SIZES[size], max_position_embeddings=2048, bos_token_id=None, eos_token_id=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def bandwidth_gbs() -> float:
    """Bytes per second of a streaming float32 mat-vec over 256 MB: the decode speed limit of this machine."""
    W, x = torch.randn(8192, 8192), torch.randn(8192)
    t = timed(lambda: W @ x, repeat=5)
    return W.numel() * 4 / t / 1e9


# ----------------------------------------------------------------------------------------------
# Measurements (each runs in a child process: `bench.py --one NAME`)
# ----------------------------------------------------------------------------------------------
def m_prefill(folder, args):
    import transformers

    from model import load_model

    ours = load_model(folder, args.dtype, args.device)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    x = torch.randint(3, 1000, (4, 256), device=args.device)
    with torch.no_grad():
        t_ours, t_ref = timed_pair(lambda: ours(x), lambda: ref(x).logits)
    return x.numel() / t_ours, x.numel() / t_ref


def m_decode(folder, args, batch: int, compile: bool = False):
    import transformers

    from model import generate, load_model

    ours = load_model(folder, args.dtype, args.device)
    prompts = torch.randint(3, 1000, (batch, 32)).tolist()
    n = args.new_tokens
    extra = {}
    if compile:
        t0 = time.perf_counter()
        generate(ours, prompts, max_new_tokens=4, compile=True)
        extra["compile_s"] = round(time.perf_counter() - t0, 1)
        t_ours, t_ref = timed_pair(lambda: generate(ours, prompts, max_new_tokens=n, compile=True),
                                   lambda: generate(ours, prompts, max_new_tokens=n), repeat=2)  # reference: eager ours
        return batch * n / t_ours, batch * n / t_ref, extra
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    ids = torch.tensor(prompts, device=args.device)
    with torch.no_grad():
        t_ours, t_ref = timed_pair(lambda: generate(ours, prompts, max_new_tokens=n),
                                   lambda: ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                                        min_new_tokens=n, do_sample=False, pad_token_id=0), repeat=2)
    return batch * n / t_ours, batch * n / t_ref, extra


def m_contrastive(folder, args):
    from decode import contrastive_generate
    from model import generate, load_model

    a, b = load_model(folder, args.dtype, args.device), load_model(folder, args.dtype, args.device)
    prompts = torch.randint(3, 1000, (1, 32)).tolist()
    n = args.new_tokens
    t_cd, t_plain = timed_pair(lambda: contrastive_generate(a, b, prompts, max_new_tokens=n, alpha=1.0),
                               lambda: generate(a, prompts, max_new_tokens=n), repeat=2)
    return n / t_cd, n / t_plain, {}


def m_profile(folder, args):
    import deepalign as D
    from data import toyworld
    from model import Tokenizer, load_model

    tok = Tokenizer(toyworld.ensure_toy_world()["aligned"])  # any tokenizer whose ids fit the vocabulary
    a, b = load_model(folder, args.dtype, args.device), load_model(folder, args.dtype, args.device)
    rows = toyworld.read_jsonl(toyworld.ensure_toy_world()["data"] / "harmful_eval.jsonl", ["prompt"])[:32]
    seqs = [sum(D.response_split(tok, r["prompt"], r["harmful_response"], max_tokens=64), []) for r in rows]
    tokens = sum(len(s) for s in seqs)
    with torch.no_grad():
        t_prof, t_fwd = timed_pair(lambda: D.position_profile(b, a, tok, rows, batch_size=16, progress=False),
                                   lambda: [a(D.right_pad(seqs[i : i + 16], 0, args.device)) for i in range(0, len(seqs), 16)])
    return tokens / t_prof, tokens / t_fwd, {}


def m_train(folder, args):
    import train as T
    from data import toyworld
    from model import Tokenizer, load_model

    toy = toyworld.ensure_toy_world()
    tok = Tokenizer(toy["aligned"])
    targs = T.parse_args(["--batch-size", "8", "--utility-batch-size", "8"])
    safety = toyworld.read_jsonl(toy["data"] / "safety_train.jsonl", ["prompt"])
    benign = toyworld.read_jsonl(toy["data"] / "benign_train.jsonl", ["prompt"])
    student = load_model(folder, args.dtype, args.device)
    teacher = load_model(folder, args.dtype, args.device).requires_grad_(False)
    base = load_model(folder, args.dtype, args.device).requires_grad_(False)
    valid = tok.real_token_mask(student.args.vocab_size).to(args.device)
    batches = T.make_batches(0, tok, safety, benign, {}, student, targs, args.device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)

    def step(method):
        terms, _ = T.step_losses(method, student, teacher, base, *batches, targs, valid)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()

    # reference: plain cross-entropy on the same safety + utility batch (what `augment` computes)
    return (*timed_pair(lambda: step("targeted"), lambda: step("augment")), {})


MEASUREMENTS = {
    "prefill": (m_prefill, ">= 1.0"),
    "decode b1": (lambda f, a: m_decode(f, a, 1), ">= 1.5"),
    "decode b8": (lambda f, a: m_decode(f, a, 8), ">= 1.5"),
    "decode b1 compile": (lambda f, a: m_decode(f, a, 1, compile=True), "report"),
    "contrastive": (m_contrastive, ">= 0.45"),
    "profile": (m_profile, ">= 0.45"),
    "train step": (m_train, "<= 1.8"),
}


def run_one(name, folder, args):
    out = MEASUREMENTS[name][0](folder, args)
    ours, ref, extra = out if len(out) == 3 else (*out, {})
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
    print(json.dumps({"ours": ours, "reference": ref, "peak_mb": round(peak_mb), **extra}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="125m")
    p.add_argument("--only", nargs="+", choices=sorted(MEASUREMENTS), help="run only these rows")
    p.add_argument("--compile", action="store_true", help="also measure compiled decoding")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="write {rows: [{name, ours, reference, ratio, target}], ...} here")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one measurement in this process
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        return run_one(args.one, Path(args.folder), args)

    names = args.only or [n for n in MEASUREMENTS if args.compile or "compile" not in n]
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_checkpoint(args.size, Path(tmp) / "model")
        from model import ModelArgs, read_json

        margs = ModelArgs.from_hf_config(read_json(folder / "config.json"))
        n_params = sum(v for v in [margs.vocab_size * margs.dim * 2, margs.n_layers * (
            margs.dim * margs.head_dim * (2 * margs.n_heads + 2 * margs.n_kv_heads) + 3 * margs.dim * margs.intermediate_size)])
        bw = bandwidth_gbs()
        limit = bw * 1e9 / (n_params * 4)  # tokens/s at batch 1 if every weight is read once per token
        print(f"{args.size}: {n_params / 1e6:.0f}M parameters, float32 weights {n_params * 4 / 1e9:.2f} GB; "
              f"streaming mat-vec {bw:.1f} GB/s -> batch-1 decode limit {limit:.1f} tokens/s", file=sys.stderr)
        rows = []
        for name in names:
            cmd = [sys.executable, str(ROOT / "bench.py"), "--one", name, "--folder", str(folder), "--size", args.size,
                   "--new-tokens", str(args.new_tokens), "--dtype", args.dtype, "--device", args.device]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if res.returncode != 0:
                print(f"{name}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            row = {"name": name, "ours": r["ours"], "reference": r["reference"], "ratio": r["ours"] / r["reference"],
                   "target": MEASUREMENTS[name][1], "peak_mb": r["peak_mb"]}
            if name.startswith(("decode", "contrastive")) and " b8" not in name:
                row["fraction_of_bandwidth_limit"] = r["ours"] / limit
            row.update({k: v for k, v in r.items() if k not in ("ours", "reference", "peak_mb")})
            rows.append(row)
            print(f"{name:18s} ours {row['ours']:10.2f}  ref {row['reference']:10.2f}  ratio {row['ratio']:5.2f}x "
                  f"(target {row['target']})  peak {row['peak_mb']} MB"
                  + (f"  {100 * row['fraction_of_bandwidth_limit']:.0f}% of limit" if "fraction_of_bandwidth_limit" in row else ""),
                  file=sys.stderr)
    table = ["| measurement | ours | reference | ratio | target | peak MB |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        unit = "s" if r["name"] == "train step" else "tok/s"
        table.append(f"| {r['name']} | {r['ours']:.2f} {unit} | {r['reference']:.2f} {unit} | {r['ratio']:.2f}x | "
                     f"{r['target']} | {r['peak_mb']} |")
    print("\n".join(table))
    if args.out:
        tmp = Path(args.out).with_name(Path(args.out).name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"size": args.size, "parameters": n_params, "bandwidth_gbs": bw,
                                   "decode_limit_tokens_per_s": limit, "rows": rows}, indent=1))
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
