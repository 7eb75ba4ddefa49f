"""Generation from a checkpoint folder: plain decoding, or contrastive decoding against the base model.

    python decode.py --model DIR --prompt "How do I bake bread?" [--prefill "Sure, first"]
    python decode.py --model ALIGNED --contrast-base BASE --alpha 2.0 --beta 0.03 --prompt ... --prefill ...

Greedy by default; --temperature/--top-p sample. Only the completion text goes to stdout (logs and progress
go to stderr), so the output can be piped and compared. With no --model, the toy world's aligned model.

Read top to bottom:
    1. left_pad, sample_next, cut_at_eos   a batch of prompts in, one token per row out, each row cut at eos
    2. decode_step, attach_cache           one token through a model's KV cache (what --compile compiles)
    3. decode_loop                         the loop every generator shares: prefill each model's cache, then
                                           one token per step, each row stopping at its own eos
    4. generate, contrastive_generate      the two generators, side by side: they differ only in how the next
                                           token is scored (plain: the model's logits; contrastive:
                                           deepalign.contrastive_logits on both models' log-probs)
    5. the command line

Every model decodes through its own static KV cache (model.KVCache, docs/model_notes.md §6 F2): the prompt
is read once, then each step feeds one token per row. Contrastive decoding (docs/method.md §4) never
recomputes the prefix either, so its extra cost over plain decoding is one more forward of one token per step.

Shapes: B batch, T prompt length (after left padding), V vocabulary.
"""

import functools
import sys
import time

import torch

import deepalign
from infra import cli
from infra.cli import log
from infra.hf import check_finite_logits, load_model
from infra.tokenizer import Tokenizer
from model import KVCache, Transformer


# ----------------------------------------------------------------------------------------------
# 1. A batch in, one token per row out
# ----------------------------------------------------------------------------------------------
def left_pad(seqs: list[list[int]], pad_id: int, device="cpu"):
    """Token lists -> ids (B, T) left-padded with pad_id, and attention mask (B, T) with 1 on real tokens."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s) :] = torch.tensor(s)
            mask[i, T - len(s) :] = 1
    return ids.to(device), mask.to(device)


def sample_next(
    logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator=None
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy (argmax); else softmax(logits / T)
    truncated to the smallest set of tokens whose probability reaches top_p (nucleus sampling)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V) float32
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # (B, V)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # (B, V): tokens after the nucleus is already full
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def cut_at_eos(row: list[int], eos: set) -> list[int]:
    """The row up to and including its first eos id (all of it if it has none)."""
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1]
    return row


# ----------------------------------------------------------------------------------------------
# 2. One step through the KV cache
# ----------------------------------------------------------------------------------------------
def decode_step(model: Transformer, token: torch.Tensor, cache_pos: torch.Tensor, positions: torch.Tensor):
    """One token per row through the model's cache: token (B, 1), cache_pos (1,) the slot it fills, positions
    (B, 1) its RoPE positions -> logits (B, V). Fixed shapes, positions as tensors, no host syncs: this is the
    function --compile compiles."""
    return model(token, positions=positions, cache_pos=cache_pos)[:, -1]  # (B, V)


@functools.cache
def compiled_decode_step():
    """decode_step, compiled once per process (docs/model_notes.md §6 F3). fullgraph=True turns a graph break
    into an error. On a GPU, mode="reduce-overhead" replays the step as a CUDA graph, whose outputs the next
    replay overwrites: callers clone them."""
    mode = "reduce-overhead" if torch.cuda.is_available() else None  # CUDA graphs only pay off on a GPU
    return torch.compile(decode_step, fullgraph=True, mode=mode)


def attach_cache(model: Transformer, batch_size: int, max_seq_len: int, compile: bool = False):
    """Give `model` an empty KVCache with max_seq_len slots per row, on its device and in its dtype (compile:
    for a compiled step, see KVCache). A cache kept from an earlier compiled call is reused when it fits (same
    batch size, enough slots), as gpt-fast does: the compiled step then sees the same shapes and tensors, so
    it neither recompiles nor re-records its CUDA graph. Slots past the current token are masked, so what an
    earlier call left there is never read."""
    p = model.lm_head.weight
    if model.cache is None or not model.cache.fits(batch_size, max_seq_len, p.dtype, p.device):
        model.cache = None  # free the old cache before allocating the new one
        model.cache = KVCache(model.args, batch_size, max_seq_len, p.dtype, p.device, compile=compile)
    model.cache.reset()


def share_prompt_cache(model: Transformer, samples: int, max_seq_len: int, compile: bool = False):
    """Repeat every row of the model's cache `samples` times, in place of the cache: rows (B,) -> (B * n,),
    row b's copies at b * n .. b * n + n - 1. The prompt is read once and its keys and values serve all of
    its samples (the sampling attack, docs/method.md §7)."""
    old = model.cache
    model.cache = None  # attach_cache allocates the larger cache; `old` keeps the prompt's entries
    attach_cache(model, old.valid.shape[0] * samples, max_seq_len, compile)
    new = model.cache
    for src, dst in zip(old.k + old.v, new.k + new.v):
        dst.copy_(src.repeat_interleave(samples, dim=0))  # (B * n, Hkv, S, hd)
    new.valid.copy_(old.valid.repeat_interleave(samples, dim=0))  # (B * n, S)


# ----------------------------------------------------------------------------------------------
# 3. The decoding loop every generator shares
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def decode_loop(
    models: list[Transformer],
    prompts: list[list[int]],
    score,
    max_new_tokens: int,
    eos_ids,
    pad_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    compile: bool = False,
    samples: int = 1,
) -> list[list[int]]:
    """Prefill: every model reads the left-padded prompts once, into its own KV cache; with samples = n > 1
    each prompt's cache is then repeated for its n samples (share_prompt_cache), which decode side by side
    as rows b * n .. b * n + n - 1. Then at every step,
    score(logits (B, V) of each model) -> scores (B, V), one token per row from them (sample_next), and that
    token into every model's cache. A row stops at its first eos id, which it keeps, and is padded with pad_id
    until every row has stopped. Returns the new token ids of each row, each cut after its first eos id.
    Without compile the caches are dropped at the end; compiled decoding keeps them for its next call."""
    device = models[0].lm_head.weight.device
    ids, mask = left_pad(prompts, pad_id, device)  # (B, T)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): RoPE positions skip the padding (§6 F1)
    B, T = ids.shape
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    eos = torch.tensor(list(eos_ids) or [-1], device=device)  # (E,)
    step = compiled_decode_step() if compile else decode_step
    for m in models:
        attach_cache(m, B, T + max_new_tokens, compile and samples == 1)
    try:
        slots = torch.arange(T, device=device)  # (T,): the prompt fills the first T cache slots
        logits = [m(ids, attention_mask=mask, positions=positions, cache_pos=slots)[:, -1] for m in models]
        for m, x in zip(models, logits):  # corrupt weights or an overflow: fail here, not as silent output
            check_finite_logits(x, m.source)
        pos = positions[:, -1:]  # (B, 1)
        if samples > 1:
            for m in models:
                share_prompt_cache(m, samples, T + max_new_tokens, compile)
            logits = [x.repeat_interleave(samples, dim=0) for x in logits]  # (B * n, V) each
            pos = pos.repeat_interleave(samples, dim=0)  # (B * n, 1)
            B = B * samples
        out, done = [], torch.zeros(B, dtype=torch.bool, device=device)  # done (B,)
        for i in range(max_new_tokens):
            token = sample_next(score(*logits), temperature, top_p, generator)  # (B,)
            token = torch.where(done, pad_id, token)  # rows that have stopped get padding
            out.append(token)
            done = done | torch.isin(token, eos)
            if i == max_new_tokens - 1 or bool(done.all()):
                break
            pos = pos + 1  # (B, 1)
            slot = torch.tensor([T + i], device=device)  # (1,)
            logits = [step(m, token[:, None], slot, pos).clone() for m in models]  # (B, V) each
    finally:
        if not compile:
            for m in models:
                m.cache = None
    tokens = torch.stack(out, dim=1).tolist()  # (B, n)
    return [cut_at_eos(row, set(eos_ids)) for row in tokens]


# ----------------------------------------------------------------------------------------------
# 4. The two generators: plain and contrastive
# ----------------------------------------------------------------------------------------------
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
    eos_ids=(),
    pad_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    compile: bool = False,
    samples: int = 1,
) -> list[list[int]]:
    """Batched decoding of token-id prompts: each next token is chosen from the model's logits (greedy by
    default). Returns the new token ids of each row, each cut after its first eos id (kept); with samples = n,
    n rows per prompt (prompt-major: prompt b's samples are rows b * n .. b * n + n - 1)."""

    def score(logits):  # (B, V) -> (B, V)
        return logits.float()

    return decode_loop(
        [model], prompts, score, max_new_tokens, eos_ids, pad_id, temperature, top_p, seed, compile, samples
    )


def contrastive_generate(
    aligned: Transformer,
    base: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
    eos_ids=(),
    pad_id: int = 0,
    alpha: float = deepalign.CD_ALPHA,
    beta: float = deepalign.CD_BETA,
    mode: str = "full",
    tau: float = 1.0,
    top_k: int = 20,
    valid=None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    compile: bool = False,
    rho: float = 0.01,
    samples: int = 1,
) -> list[list[int]]:
    """Batched contrastive decoding (docs/method.md §4): each next token is chosen from the contrastive score
    s_t of the aligned model against the base model (deepalign.contrastive_logits: alpha, beta, mode, and for
    mode "bf" the base-favored set's tau, top_k, rho, valid). Both models read the same token ids (one shared
    tokenizer), each through its own KV cache.
    alpha = 0 is plain greedy decoding of the aligned model. Returns what `generate` returns."""

    def score(logits_A, logits_B):  # (B, V) each -> s_t (B, V)
        lp_A, lp_B = deepalign.log_probs(logits_A), deepalign.log_probs(logits_B)  # (B, V) float32
        return deepalign.contrastive_logits(lp_A, lp_B, alpha, beta, mode, tau, top_k, valid, rho)

    return decode_loop(
        [aligned, base],
        prompts,
        score,
        max_new_tokens,
        eos_ids,
        pad_id,
        temperature,
        top_p,
        seed,
        compile,
        samples,
    )


# ----------------------------------------------------------------------------------------------
# 5. Command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = cli.parser(__doc__)
    cli.add_world_flag(p)
    p.add_argument(
        "--model",
        help="Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json); "
        "default: the world's aligned model",
    )
    p.add_argument(
        "--prompt",
        default="how do i bake bread ?",
        help="user message, formatted with the checkpoint's chat template",
    )
    p.add_argument(
        "--prefill",
        default="",
        help="forced start of the assistant's answer (the prefilling attack); empty: none",
    )
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    cli.add_sampling_flags(p)
    cli.add_device_flags(p)
    cli.add_contrastive_flags(p, deepalign.CD_ALPHA, deepalign.CD_BETA)
    cli.add_base_favored_flags(p)
    return p.parse_args(argv)


def describe_decoding(args) -> str:
    """How main() decodes, in words, for the log."""
    how = "greedy" if args.temperature <= 0 else f"temperature {args.temperature}, top-p {args.top_p}"
    if args.contrast_base:
        contrast = f"alpha {args.alpha}, beta {args.beta}, {args.cd_mode}"
        how += f", contrastive against {args.contrast_base} ({contrast})"
    return how


def main(argv=None):
    args = parse_args(argv)
    if args.model is None:
        from data import toyworld

        paths = toyworld.ensure_world(args.world)
        args.model = paths["aligned"]
        if args.contrast_base == "base":  # the world's base model
            args.contrast_base = paths["base"]
    tok = Tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    ids = tok.prompt_ids(args.prompt, prefill=args.prefill, system=args.system)
    log(f"prompt: {len(ids)} tokens; stop ids {tok.eos_ids}; decoding: {describe_decoding(args)}")
    kw = dict(
        max_new_tokens=args.max_new_tokens,
        eos_ids=tok.eos_ids,
        pad_id=tok.pad_id,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        compile=args.compile,
    )
    t0 = time.perf_counter()
    if args.contrast_base:
        deepalign.check_same_tokenizer(tok, Tokenizer(args.contrast_base))
        base = load_model(args.contrast_base, dtype=args.dtype, device=args.device)
        valid = tok.real_token_mask(model.args.vocab_size).to(args.device)
        out = contrastive_generate(
            model,
            base,
            [ids],
            alpha=args.alpha,
            beta=args.beta,
            mode=args.cd_mode,
            tau=args.tau,
            top_k=args.top_k,
            rho=args.rho,
            valid=valid,
            **kw,
        )[0]
    else:
        out = generate(model, [ids], **kw)[0]
    dt = time.perf_counter() - t0
    speed = f"{len(out) / dt:.1f} tokens/s"
    if args.compile:
        speed += ", including compile"
    log(f"{len(out)} new tokens in {dt:.2f} s ({speed})")
    sys.stdout.write(tok.decode(out) + "\n")


if __name__ == "__main__":
    cli.run(main)
