"""Generate from a checkpoint folder: plain decoding of one model.

    python decode.py --model DIR --prompt "How do I bake bread?" [--prefill "Sure, first"] [--max-new-tokens 64]

Greedy by default; --temperature/--top-p sample. Only the completion text goes to stdout (logs and progress
go to stderr), so the output can be piped and compared.
"""
import argparse
import sys
import time

import torch

from model import DTYPES, Tokenizer, generate, load_model, log


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json)")
    p.add_argument("--prompt", required=True, help="user message, formatted with the checkpoint's chat template")
    p.add_argument("--prefill", default="", help="forced start of the assistant's answer (the prefilling attack)")
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the per-token decode step")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    tok = Tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    ids = tok.prompt_ids(args.prompt, prefill=args.prefill, system=args.system)
    log(f"prompt: {len(ids)} tokens; stop ids {tok.eos_ids}; decoding: "
        f"{'greedy' if args.temperature <= 0 else f'temperature {args.temperature}, top-p {args.top_p}'}")
    t0 = time.perf_counter()
    out = generate(model, [ids], max_new_tokens=args.max_new_tokens, eos_ids=tok.eos_ids, pad_id=tok.pad_id,
                   temperature=args.temperature, top_p=args.top_p, seed=args.seed, compile=args.compile)[0]
    dt = time.perf_counter() - t0
    log(f"{len(out)} new tokens in {dt:.2f} s ({len(out) / dt:.1f} tokens/s{', including compile' if args.compile else ''})")
    sys.stdout.write(tok.decode(out) + "\n")


if __name__ == "__main__":
    main()
