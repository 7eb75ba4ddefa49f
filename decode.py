"""Generation from a checkpoint folder: plain decoding, or contrastive decoding against the base model.

    python decode.py --model DIR --prompt "How do I bake bread?" [--prefill "Sure, first"]
    python decode.py --model ALIGNED --contrast-base BASE --alpha 2.0 --beta 0.03 --prompt ... --prefill ...

Greedy by default; --temperature/--top-p sample. Only the completion text goes to stdout (logs and progress
go to stderr), so the output can be piped and compared. With no --model, the toy world's aligned model.

Read top to bottom:
    0. Sampling                            how tokens are chosen and how many (the decoding flags)
    1. left_pad, next_token_logits,        a batch of prompts in, one token per row out, each row cut at eos
       sample_next, cut_at_eos
    2. decode_step, attach_cache           one token through a model's KV cache (what --compile compiles)
    3. prefill_caches, decode_loop         the loop every generator shares: prefill each model's cache, then
                                           one token per step, each row stopping at its own eos
    4. generate, contrastive_generate      the two generators, side by side: they differ only in how the next
                                           token is scored (plain: the model's logits; contrastive:
                                           deepalign.contrastive_logits on both models' log-probs)
    5. the command line

Every model decodes through its own static KV cache (model.KVCache, docs/model_notes.md §6 F2): the prompt
is read once, then each step feeds one token per row. Contrastive decoding (docs/method.md §4) never
recomputes the prefix either, so its extra cost over plain decoding is one more forward of one token per step.

Shapes: B batch, T prompt length (after left padding), V vocabulary, n samples per prompt.
"""

import functools
import sys
import time
from dataclasses import dataclass

import torch

import deepalign
from infra import cli
from infra.cli import log, setting
from infra.hf import check_finite_logits, load_model
from infra.tokenizer import Tokenizer
from model import KVCache, Transformer


# ----------------------------------------------------------------------------------------------
# 0. The sampling settings
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """How a generator chooses tokens, and how many. temperature 0 is greedy (argmax); else softmax(logits /
    temperature) cut to the top-p nucleus, drawn with a generator seeded with `seed` (None: torch's global
    one). samples = n decodes n continuations of every prompt from one read of it (the sampling attack,
    docs/method.md §7). compile: torch.compile the per-token step (docs/model_notes.md §6 F3)."""

    max_new_tokens: int = setting(64, "tokens to generate at most")
    temperature: float = setting(0.0, "sampling temperature; 0 = greedy")
    top_p: float = setting(
        1.0, "nucleus sampling: keep the smallest set of tokens whose probability reaches top-p"
    )
    seed: int | None = setting(0, "sampling seed")
    samples: int = setting(1, "continuations per prompt", flag=False)
    compile: bool = setting(False, "torch.compile the per-token decode step")


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


@torch.no_grad()
def next_token_logits(model: Transformer, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """Float32 logits (B, V) of the token after each sequence: one left-padded forward without a cache, the
    head at the last position only (a judge's verdict, a benchmark's answer letter)."""
    ids, mask = left_pad(seqs, pad_id, model.lm_head.weight.device)  # (B, T)
    last = torch.zeros_like(mask, dtype=torch.bool)  # (B, T)
    last[:, -1] = True  # left padding puts every row's last real token in the last column
    return model(ids, attention_mask=mask, logits_at=last).float()  # (B, V)


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
def prefill_caches(
    models: list[Transformer], ids, mask, samples: int, max_seq_len: int, compile: bool = False
):
    """Every model reads the left-padded prompts ids, mask (B, T) once, into its own KV cache; with
    samples = n > 1 each prompt's cache is then repeated for its n samples (share_prompt_cache), which decode
    side by side as rows b * n .. b * n + n - 1. Returns each model's logits after the prompt (B * n, V) and
    the RoPE position of each row's last token (B * n, 1). A NaN/inf logit is an error naming the model."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): RoPE positions skip the padding (§6 F1)
    slots = torch.arange(ids.shape[1], device=ids.device)  # (T,): the prompt fills the first T cache slots
    logits = [  # (B, V) each: every model's logits after the prompt
        m(ids, attention_mask=mask, positions=positions, cache_pos=slots)[:, -1] for m in models
    ]
    for m, x in zip(models, logits):  # corrupt weights or an overflow: fail here, not as silent output
        check_finite_logits(x, m.source)
    pos = positions[:, -1:]  # (B, 1)
    if samples > 1:
        for m in models:
            share_prompt_cache(m, samples, max_seq_len, compile)
        logits = [x.repeat_interleave(samples, dim=0) for x in logits]  # (B * n, V) each
        pos = pos.repeat_interleave(samples, dim=0)  # (B * n, 1)
    return logits, pos


@torch.no_grad()
def decode_loop(
    models: list[Transformer],
    prompts: list[list[int]],
    score,
    sampling: Sampling,
    eos_ids=(),
    pad_id: int = 0,
) -> list[list[int]]:
    """Prefill every model's cache with the prompts (prefill_caches), then at every step
    score(logits (B, V) of each model) -> scores (B, V), one token per row from them (sample_next, as
    `sampling` says), and that token into every model's cache. A row stops at its first eos id, which it
    keeps, and is padded with pad_id until every row has stopped. Returns the new token ids of each row, each
    cut after its first eos id. Without compile the caches are dropped at the end; compiled decoding keeps
    them for its next call."""
    s = sampling
    device = models[0].lm_head.weight.device
    ids, mask = left_pad(prompts, pad_id, device)  # (B, T)
    B, T = ids.shape
    generator = torch.Generator(device=device).manual_seed(s.seed) if s.seed is not None else None
    eos = torch.tensor(list(eos_ids) or [-1], device=device)  # (E,)
    step = compiled_decode_step() if s.compile else decode_step
    for m in models:
        attach_cache(m, B, T + s.max_new_tokens, s.compile and s.samples == 1)
    try:
        logits, pos = prefill_caches(
            models, ids, mask, s.samples, T + s.max_new_tokens, s.compile
        )  # (B * n, ...)
        out, done = [], torch.zeros(B * s.samples, dtype=torch.bool, device=device)  # done (B * n,)
        for i in range(s.max_new_tokens):
            token = sample_next(score(*logits), s.temperature, s.top_p, generator)  # (B * n,)
            token = torch.where(done, pad_id, token)  # rows that have stopped get padding
            out.append(token)
            done = done | torch.isin(token, eos)
            if i == s.max_new_tokens - 1 or bool(done.all()):
                break
            pos = pos + 1  # (B * n, 1)
            slot = torch.tensor([T + i], device=device)  # (1,)
            logits = [step(m, token[:, None], slot, pos).clone() for m in models]  # (B * n, V) each
    finally:
        if not s.compile:
            for m in models:
                m.cache = None
    tokens = torch.stack(out, dim=1).tolist()  # (B * n, new tokens)
    return [cut_at_eos(row, set(eos_ids)) for row in tokens]


# ----------------------------------------------------------------------------------------------
# 4. The two generators: plain and contrastive
# ----------------------------------------------------------------------------------------------
def generate(
    model: Transformer, prompts: list[list[int]], sampling: Sampling = Sampling(), eos_ids=(), pad_id: int = 0
) -> list[list[int]]:
    """Batched decoding of token-id prompts: each next token is chosen from the model's logits (greedy by
    default). Returns the new token ids of each row, each cut after its first eos id (kept); with
    sampling.samples = n, n rows per prompt (prompt-major: prompt b's are rows b * n .. b * n + n - 1)."""

    def score(logits):  # (B, V) -> (B, V)
        return logits.float()

    return decode_loop([model], prompts, score, sampling, eos_ids, pad_id)


def contrastive_generate(
    aligned: Transformer,
    base: Transformer,
    prompts: list[list[int]],
    sampling: Sampling = Sampling(),
    contrast: deepalign.Contrast = deepalign.Contrast(),
    eos_ids=(),
    pad_id: int = 0,
    valid=None,
) -> list[list[int]]:
    """Batched contrastive decoding (docs/method.md §4): each next token is chosen from the contrastive score
    s_t of the aligned model against the base model (deepalign.contrastive_logits with `contrast`; `valid`
    (V,) bool keeps cd_mode "bf"'s base-favored set to real tokens). Both models read the same token ids (one
    shared tokenizer), each through its own KV cache.
    alpha = 0 is plain greedy decoding of the aligned model. Returns what `generate` returns."""

    def score(logits_A, logits_B):  # (B, V) each -> s_t (B, V)
        lp_A, lp_B = deepalign.log_probs(logits_A), deepalign.log_probs(logits_B)  # (B, V) float32
        return deepalign.contrastive_logits(lp_A, lp_B, contrast, valid)

    return decode_loop([aligned, base], prompts, score, sampling, eos_ids, pad_id)


# ----------------------------------------------------------------------------------------------
# 5. Command line
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """What the command decodes: one user message (and a forced start of the answer) to one checkpoint."""

    model: str | None = setting(
        None,
        "Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json)",
        shown="the world's aligned model",
    )
    prompt: str = setting(
        "how do i bake bread ?", "user message, formatted with the checkpoint's chat template"
    )
    prefill: str = setting("", "forced start of the assistant's answer (the prefilling attack)", shown="none")
    system: str | None = setting(None, "optional system message", shown="none")


def parse_args(argv=None):
    p = cli.parser(__doc__)
    cli.add_world_flag(p)
    cli.add_settings(p, Request)
    d = p.add_argument_group("decoding")
    cli.add_settings(d, Sampling)
    cli.add_device_flags(d)
    c = cli.add_contrastive_flags(p, deepalign.Contrast)
    cli.add_settings(c, deepalign.BaseFavored)  # cd_mode "bf"'s base-favored set (docs/method.md §2)
    return p.parse_args(argv)


def describe_decoding(sampling: Sampling, contrast: deepalign.Contrast, contrast_base) -> str:
    """How main() decodes, in words, for the log."""
    s = sampling
    how = "greedy" if s.temperature <= 0 else f"temperature {s.temperature}, top-p {s.top_p}"
    if contrast_base:
        how += f", contrastive against {contrast_base} "
        how += f"(alpha {contrast.alpha}, beta {contrast.beta}, {contrast.cd_mode})"
    return how


def main(argv=None):
    args = parse_args(argv)
    req, sampling = cli.settings_from(Request, args), cli.settings_from(Sampling, args)
    contrast = cli.settings_from(deepalign.Contrast, args, bf=cli.settings_from(deepalign.BaseFavored, args))
    folder, contrast_base = req.model, args.contrast_base
    if folder is None:
        from data import toyworld

        paths = toyworld.ensure_world(args.world)
        folder = paths["aligned"]
        if contrast_base == "base":  # the world's base model
            contrast_base = paths["base"]
    tok = Tokenizer(folder)
    model = load_model(folder, dtype=args.dtype, device=args.device)
    ids = tok.prompt_ids(req.prompt, prefill=req.prefill, system=req.system)
    how = describe_decoding(sampling, contrast, contrast_base)
    log(f"prompt: {len(ids)} tokens; stop ids {tok.eos_ids}; decoding: {how}")
    t0 = time.perf_counter()
    if contrast_base:
        deepalign.check_same_tokenizer(tok, Tokenizer(contrast_base))
        base = load_model(contrast_base, dtype=args.dtype, device=args.device)
        valid = tok.real_token_mask(model.args.vocab_size).to(args.device)
        out = contrastive_generate(model, base, [ids], sampling, contrast, tok.eos_ids, tok.pad_id, valid)[0]
    else:
        out = generate(model, [ids], sampling, tok.eos_ids, tok.pad_id)[0]
    dt = time.perf_counter() - t0
    speed = f"{len(out) / dt:.1f} tokens/s" + (", including compile" if sampling.compile else "")
    log(f"{len(out)} new tokens in {dt:.2f} s ({speed})")
    sys.stdout.write(tok.decode(out) + "\n")


if __name__ == "__main__":
    cli.run(main)
