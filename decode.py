"""Generate from a checkpoint folder: plain decoding, or contrastive decoding against the base model.

    python decode.py --model DIR --prompt "How do I bake bread?" [--prefill "Sure, first"] [--max-new-tokens 64]
    python decode.py --model ALIGNED --contrast-base BASE --alpha 1.0 --beta 0.1 --prompt ... --prefill ...

Greedy by default; --temperature/--top-p sample. Only the completion text goes to stdout (logs and progress
go to stderr), so the output can be piped and compared. With no --model, the toy world's aligned model.

Contrastive decoding (METHOD §4) is written out step by step in `contrastive_generate`: both models, one
static KV cache each; at every step both next-token distributions are log-softmaxed, combined into the
contrastive score s_t (deepalign.contrastive_logits), and the next token is chosen from s_t. The prefix is
never recomputed, so the extra cost over plain decoding is one more forward of one token per step.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

import deepalign
from model import (DTYPES, Tokenizer, cut_at_eos, decoding_inputs, generate, get_decode_step, kv_caches, load_model,
                   log, sample_next)


@torch.no_grad()
def contrastive_generate(aligned, base, prompts: list[list[int]], max_new_tokens: int = 64, eos_ids=(), pad_id: int = 0,
                         alpha: float = 1.0, beta: float = 0.1, mode: str = "full", tau: float = 1.0, top_k: int = 20,
                         valid=None, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                         compile: bool = False) -> list[list[int]]:
    """Batched contrastive decoding. Both models read the same left-padded token ids (one shared tokenizer).
    Returns the new token ids of each row, each cut after its first eos id (kept)."""
    ids, mask, positions, generator, eos = decoding_inputs(prompts, pad_id, eos_ids, seed, aligned.lm_head.weight.device)
    B, T = ids.shape  # left-padded (B, T); positions skip the padding
    device = ids.device
    step = get_decode_step(compile)
    slots = torch.arange(T, device=device)
    with kv_caches([aligned, base], B, T + max_new_tokens, keep=compile):
        # Prefill: each model reads the whole prompt once and keeps its own KV cache.
        l_A = aligned(ids, attention_mask=mask, positions=positions, cache_pos=slots)[:, -1]  # (B, V)
        l_B = base(ids, attention_mask=mask, positions=positions, cache_pos=slots)[:, -1]
        pos = positions[:, -1:]  # (B, 1)
        out, done = [], torch.zeros(B, dtype=torch.bool, device=device)
        for i in range(max_new_tokens):
            lp_A, lp_B = deepalign.log_probs(l_A), deepalign.log_probs(l_B)  # (B, V) float32
            s = deepalign.contrastive_logits(lp_A, lp_B, alpha, beta, mode, tau, top_k, valid)  # (B, V)
            token = sample_next(s, temperature, top_p, generator)  # (B,)
            token = torch.where(done, pad_id, token)
            out.append(token)
            done = done | torch.isin(token, eos)
            if i == max_new_tokens - 1 or bool(done.all()):
                break
            pos = pos + 1
            slot = torch.tensor([T + i], device=device)
            l_A = step(aligned, token[:, None], slot, pos).clone()  # one new token through each cache
            l_B = step(base, token[:, None], slot, pos).clone()
    tokens = torch.stack(out, dim=1).tolist()  # (B, n)
    return [cut_at_eos(row, set(eos_ids)) for row in tokens]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json); "
                                   "default: the toy world's aligned model")
    p.add_argument("--prompt", default="how do i bake bread ?", help="user message, formatted with the checkpoint's chat template")
    p.add_argument("--prefill", default="", help="forced start of the assistant's answer (the prefilling attack)")
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the per-token decode step")
    add_contrastive_args(p)
    return p.parse_args(argv)


def add_contrastive_args(p, sweep: bool = False):
    """The contrastive-decoding flags (shared with eval.py, where --alpha and --beta take lists for a sweep)."""
    g = p.add_argument_group("contrastive decoding (METHOD §4)")
    many = dict(nargs="+") if sweep else {}
    g.add_argument("--contrast-base", help="base model folder: decode contrastively against it")
    g.add_argument("--alpha", type=float, default=[1.0] if sweep else 1.0, **many, help="contrast strength; 0 = plain aligned decoding")
    g.add_argument("--beta", type=float, default=[0.1] if sweep else 0.1, **many, help="plausibility head: keep p_A >= beta * max p_A")
    g.add_argument("--cd-mode", choices=["full", "bf"], default="full", help="contrast every head token, or base-favored ones only")
    g.add_argument("--tau", type=float, default=1.0, help="base-favored threshold (cd-mode bf)")
    g.add_argument("--top-k", type=int, default=20, help="base-favored top-k of p_B (cd-mode bf)")


def main(argv=None):
    args = parse_args(argv)
    if args.model is None:
        from data import toyworld

        args.model = toyworld.ensure_toy_world()["aligned"]
    tok = Tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    ids = tok.prompt_ids(args.prompt, prefill=args.prefill, system=args.system)
    log(f"prompt: {len(ids)} tokens; stop ids {tok.eos_ids}; decoding: "
        f"{'greedy' if args.temperature <= 0 else f'temperature {args.temperature}, top-p {args.top_p}'}"
        f"{f', contrastive against {args.contrast_base} (alpha {args.alpha}, beta {args.beta}, {args.cd_mode})' if args.contrast_base else ''}")
    kw = dict(max_new_tokens=args.max_new_tokens, eos_ids=tok.eos_ids, pad_id=tok.pad_id, temperature=args.temperature,
              top_p=args.top_p, seed=args.seed, compile=args.compile)
    t0 = time.perf_counter()
    if args.contrast_base:
        deepalign.check_same_tokenizer(tok, Tokenizer(args.contrast_base))
        base = load_model(args.contrast_base, dtype=args.dtype, device=args.device)
        valid = tok.real_token_mask(model.args.vocab_size).to(args.device)
        out = contrastive_generate(model, base, [ids], alpha=args.alpha, beta=args.beta, mode=args.cd_mode,
                                   tau=args.tau, top_k=args.top_k, valid=valid, **kw)[0]
    else:
        out = generate(model, [ids], **kw)[0]
    dt = time.perf_counter() - t0
    log(f"{len(out)} new tokens in {dt:.2f} s ({len(out) / dt:.1f} tokens/s{', including compile' if args.compile else ''})")
    sys.stdout.write(tok.decode(out) + "\n")


if __name__ == "__main__":
    main()
