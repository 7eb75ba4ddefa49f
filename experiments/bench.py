"""Speed and memory, every figure a ratio measured side by side in one run (a script, not a test).

    python -m experiments.bench             # CPU, float32: a Llama-shaped ~125M-parameter random model
    python -m experiments.bench --size toy      # the toy world's shape (seconds)
    python -m experiments.bench --out bench.json [--compile]
    python -m experiments.bench --gpu --compile --out results/bench_gpu.json  # GPU: real 8B / 1B shapes
    python -m experiments.bench --gpu --tiny --device cpu   # the GPU suite's code paths on CPU, tiny shapes

CPU rows (ours / reference, target):
  prefill            tokens/s of one forward, our model.py vs transformers on the same weights        >= 1.0x
  decode bN          greedy tokens/s, our static KV cache vs transformers' generate (128 new tokens)   >= 1.0x
  decode bN compile  the same with --compile, vs our eager decoding                                    report
  contrastive        tokens/s of contrastive decoding vs plain decoding (two forwards is 0.5x)        >= 0.5x
  profile            tokens/s of position_profile vs one teacher-forced forward                       >= 0.6x
  train step         seconds of one `targeted` step (default lam 1) vs a cross-entropy step            <= 1.6x
  train step, lam 0.5  the same at the stated lam (adds the clean-context teacher's forward)          report
  toy generate       toy-shaped model, eval.py's batch (32 x 64 new tokens) vs transformers' generate >= 3.0x
  toy generate sampled x16  the sampling attack's shape, 16 samples per prompt, one prompt cache  >= 3.0x
  toy generate eval batch  ours at eval.py's batch (DecodeConfig.batch_size) vs ours at batch 32       >= 3.0x
  gcg step           one GCG step (one-hot gradient + 128 candidates) vs the same step in transformers report
  train memory ...   bf16 `targeted` steps: measured peak bytes per parameter vs the README's table    report
GPU rows (random weights made on the GPU in the real shapes of Llama-3.1-8B, Qwen3-8B and Llama-3.2-1B):
  decode b1 SHAPE    batch-1 greedy tokens/s vs the bandwidth limit (the reference column)             >= 0.70
  contrastive        two 8B models vs plain decoding of one                                           >= 0.45x
  profile            position_profile with two 8B models vs one forward                               >= 0.45x
  train ...          the largest batch (powers of two) that fits at --seq-len 1024 with activation
                     checkpointing, its tokens/s and peak memory; ratio: targeted vs cross-entropy    >= 0.56x
Each measurement runs in its own process, so "peak MB" is its own peak (CPU: resident memory, Python and torch
included; GPU: torch.cuda.max_memory_allocated). Every pair of timings is taken alternately (see timed_pair).
The decode limit is memory bandwidth: batch 1 reads every weight once per token (the embedding table only one
row), so limit = bandwidth / weight bytes, the bandwidth measured in the same run (CPU: a streaming mat-vec;
GPU: a 1 GiB device copy, bytes read + written).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from infra import cli
from infra.cli import setting
from infra.files import write_json_atomic
from lab.tables import markdown
from model import DTYPES

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # Llama-shaped random models
    "125m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "toy": dict(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1792,  # the toy worlds' (1.7k words, padded to a multiple of 64)
    ),
}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat: int = 3) -> float:
    """Best wall time of fn() over `repeat` calls, after one warm-up call."""
    return timed_pair(fn, None, repeat)[0]


def timed_pair(ours, reference, repeat: int = 3) -> tuple[float, float]:
    """Best wall times of ours() and reference() after one warm-up call each, measured *alternately* (ours,
    reference, ours, ...) so that a slow spell of a shared machine hits both sides alike. The best of several
    runs, not the mean: on a shared machine noise only ever adds time."""
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
    best = [min(ts) for ts in times]
    return (best[0], best[1] if len(best) > 1 else None)


def make_checkpoint(size: str, folder: Path, seed: int = 0) -> Path:
    """Random weights in a real HF folder (written by transformers, the reference), plus the toy tokenizer."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        **SIZES[size], max_position_embeddings=2048, bos_token_id=None, eos_token_id=2
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def bandwidth_gbs() -> float:
    """Bytes per second of a streaming float32 mat-vec over 256 MB: the decode speed limit of this machine."""
    W, x = torch.randn(8192, 8192), torch.randn(8192)
    t = timed(lambda: W @ x, repeat=5)
    return W.numel() * 4 / t / 1e9


# ----------------------------------------------------------------------------------------------
# Measurements (each runs in a child process: `python -m experiments.bench --one NAME`)
# ----------------------------------------------------------------------------------------------
def m_prefill(folder, args):
    import transformers

    from infra.hf import load_model

    ours = load_model(folder, args.dtype, args.device)
    ref = (
        transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype))
        .to(args.device)
        .eval()
    )
    x = torch.randint(3, 1000, (4, 256), device=args.device)
    with torch.no_grad():
        t_ours, t_ref = timed_pair(lambda: ours(x), lambda: ref(x).logits)
    return x.numel() / t_ours, x.numel() / t_ref


def matvec_tokens_per_s(model) -> float:
    """Batch-1 tokens/s of a decode step that did nothing but its mat-vecs: every weight matrix of the model
    (distinct tensors, so each is read from memory) times one vector, back to back. A tighter ceiling than the
    streaming limit: these matrices are narrower than the bandwidth probe's and stream slower."""
    import torch.nn.functional as F

    mats = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(1, W.shape[1], dtype=W.dtype, device=W.device) for W in mats]
    with torch.no_grad():
        return 1.0 / timed(lambda: [F.linear(x, W) for x, W in zip(xs, mats)], repeat=10)


def m_decode(folder, args, batch: int, compile: bool = False):
    import transformers

    from decode import Sampling, generate
    from infra.hf import load_model

    ours = load_model(folder, args.dtype, args.device)
    prompts = torch.randint(3, 1000, (batch, 32)).tolist()
    n = args.new_tokens
    extra = {"matvec_tokens_per_s": matvec_tokens_per_s(ours)} if batch == 1 else {}
    if compile:
        t0 = time.perf_counter()
        generate(ours, prompts, Sampling(max_new_tokens=4, compile=True))
        extra["compile_s"] = round(time.perf_counter() - t0, 1)
        t_ours, t_ref = timed_pair(
            lambda: generate(ours, prompts, Sampling(max_new_tokens=n, compile=True)),
            lambda: generate(ours, prompts, Sampling(max_new_tokens=n)),
        )  # reference: eager ours
        return batch * n / t_ours, batch * n / t_ref, extra
    ref = (
        transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype))
        .to(args.device)
        .eval()
    )
    ids = torch.tensor(prompts, device=args.device)
    with torch.no_grad():
        t_ours, t_ref = timed_pair(
            lambda: generate(ours, prompts, Sampling(max_new_tokens=n)),
            lambda: ref.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            ),
        )
    return batch * n / t_ours, batch * n / t_ref, extra


def toy_pair(tmp: str, args):
    """A random toy-world-shaped checkpoint (SIZES["toy"]), as ours and as transformers' model."""
    import transformers

    from infra.hf import load_model

    folder = make_checkpoint("toy", Path(tmp) / "toy")
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype))
    return load_model(folder, args.dtype, args.device), ref.to(args.device).eval()


def m_toy_generate(folder, args, batch: int = 32, samples: int = 1):
    """Toy-model generation at eval.py's batch size (32 prompts of 30 tokens, 64 new tokens): ours vs
    transformers' generate on the same weights and batch. With samples = n: the sampling attack's shape, n
    samples per prompt from one shared prompt cache (ours) vs num_return_sequences = n (transformers)."""
    from decode import Sampling, generate

    with tempfile.TemporaryDirectory() as tmp:
        ours, ref = toy_pair(tmp, args)
        prompts = torch.randint(3, 1000, (batch, 30)).tolist()
        ids = torch.tensor(prompts, device=args.device)
        n, how = 64, dict(temperature=1.0, seed=0, samples=samples) if samples > 1 else {}
        hf = (
            dict(do_sample=True, num_return_sequences=samples, top_k=0)
            if samples > 1
            else dict(do_sample=False)
        )
        with torch.no_grad():
            t_ours, t_ref = timed_pair(
                lambda: generate(ours, prompts, Sampling(max_new_tokens=n, **how)),
                lambda: ref.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    pad_token_id=0,
                    **hf,
                ),
            )
    tokens = batch * samples * n
    return tokens / t_ours, tokens / t_ref


def m_toy_batch(folder, args):
    """Our toy-model greedy generation (prompts of 30 tokens, 64 new tokens) at eval.py's batch
    (lab.attacks.DecodeConfig.batch_size) vs at batch 32, tokens/s, timed alternately: what the larger batch
    buys (docs/performance.md, the batch sweep)."""
    from decode import Sampling, generate
    from lab.attacks import DecodeConfig

    big, n = DecodeConfig().batch_size, 64
    with tempfile.TemporaryDirectory() as tmp:
        ours = toy_pair(tmp, args)[0]
        prompts = torch.randint(3, 1000, (big, 30)).tolist()  # the first 32 are the batch-32 side's
        t_big, t_32 = timed_pair(
            lambda: generate(ours, prompts, Sampling(max_new_tokens=n)),
            lambda: generate(ours, prompts[:32], Sampling(max_new_tokens=n)),
        )
    return big * n / t_big, 32 * n / t_32, {"batch": big}


def m_gcg_step(folder, args, L: int = 20, B: int = 128):
    """One GCG step on the toy shape (docs/method.md §7): the one-hot gradient of a 4-token target after a
    40-token prompt with an L-token suffix, then B candidate suffixes scored in one batched forward. Ours
    (lab/gcg.py: one_hot_grad, candidate_losses) vs the same step written with transformers
    (inputs_embeds, autograd, one batched forward); steps per second."""
    import torch.nn.functional as F

    from lab import gcg as G

    with tempfile.TemporaryDirectory() as tmp:
        ours, ref = toy_pair(tmp, args)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 1000, (40 + L + 6 + 4,), generator=g).tolist()
        slot = G.Slot("x", tuple(ids[:40]), tuple(ids[40 + L : 46 + L]), tuple(ids[46 + L :]))
        suffix = ids[40 : 40 + L]
        cands = torch.randint(3, 1000, (B, L), generator=g)

        def our_step():
            G.one_hot_grad(ours, [slot], suffix)
            G.candidate_losses(ours, slot, cands)

        def ref_step():
            W = ref.get_input_embeddings().weight  # (V, d)
            x = torch.tensor([slot.ids(suffix)])  # (1, T)
            one_hot = F.one_hot(torch.tensor(suffix), W.shape[0]).float().requires_grad_(True)  # (L, V)
            with torch.no_grad():
                fixed = ref.get_input_embeddings()(x)  # (1, T, d)
            embeds = torch.cat([fixed[:, :40], (one_hot @ W)[None], fixed[:, 40 + L :]], dim=1)
            s = slot.target_start(L)
            logits = ref(inputs_embeds=embeds).logits[0, s - 1 : s + 3]  # (4, V)
            loss = F.cross_entropy(logits.float(), x[0, s : s + 4])
            torch.autograd.grad(loss, one_hot)
            rows = torch.cat([x[:, :40].expand(B, -1), cands, x[:, 40 + L :].expand(B, -1)], dim=1)  # (B, T)
            with torch.no_grad():
                out = ref(rows).logits[:, s - 1 : s + 3].float()  # (B, 4, V)
                F.cross_entropy(out.reshape(-1, out.shape[-1]), x[0, s : s + 4].repeat(B), reduction="none")

        t_ours, t_ref = timed_pair(our_step, ref_step)
    return 1 / t_ours, 1 / t_ref


def m_contrastive(folder, args):
    import deepalign as D
    from decode import Sampling, contrastive_generate, generate
    from infra.hf import load_model

    a, b = load_model(folder, args.dtype, args.device), load_model(folder, args.dtype, args.device)
    prompts = torch.randint(3, 1000, (1, 32)).tolist()
    n = args.new_tokens
    t_cd, t_plain = timed_pair(
        lambda: contrastive_generate(a, b, prompts, Sampling(max_new_tokens=n), D.Contrast(alpha=1.0)),
        lambda: generate(a, prompts, Sampling(max_new_tokens=n)),
    )
    return n / t_cd, n / t_plain, {}


def profile_vs_forward(aligned, base, n_pairs: int, batch_size: int, device):
    """Tokens/s of position_profile (both models, all statistics) and of one teacher-forced forward of the
    aligned model over the same (prompt, harmful response) token sequences."""
    import deepalign as D

    with tempfile.TemporaryDirectory() as tmp:
        tok, pairs = bench_tokenizer_and_pairs(Path(tmp))  # any tokenizer whose ids fit the vocabulary
    pairs = pairs[:n_pairs]
    seqs = [sum(D.response_split(tok, r["prompt"], r["harmful_response"], max_tokens=64), []) for r in pairs]
    tokens = sum(len(s) for s in seqs)
    with torch.no_grad():
        t_prof, t_fwd = timed_pair(
            lambda: D.position_profile(
                base, aligned, tok, pairs, D.ProfileConfig(batch_size=batch_size), progress=False
            ),
            lambda: [
                aligned(D.right_pad(seqs[i : i + batch_size], 0, device))
                for i in range(0, len(seqs), batch_size)
            ],
        )
    return tokens / t_prof, tokens / t_fwd, {}


def m_profile(folder, args):
    from infra.hf import load_model

    a, b = load_model(folder, args.dtype, args.device), load_model(folder, args.dtype, args.device)
    return profile_vs_forward(a, b, 32, 16, args.device)


def m_train(folder, args, lam: float | None = None):
    """One `targeted` step (dense and recovery contexts; at lam < 1 also the clean-context teacher's forward)
    vs one cross-entropy step on the same harmful and utility batch (what `rto` and `augment` compute), on
    the seed-0 toy world's data."""
    import deepalign as D
    import train as T
    from data import examples as E
    from data import toyworld as TW
    from infra.hf import load_model
    from infra.tokenizer import Tokenizer

    paths = TW.ensure_world()
    tok = Tokenizer(paths["aligned"])
    safety, benign = TW.read_set(paths, "safety_train"), TW.read_set(paths, "benign_train")
    student, step, frozen = targeted_training(
        lambda seed: load_model(folder, args.dtype, args.device), 0, tok, lam
    )
    run = T.RunConfig(batch_size=8, utility_batch_size=8, device=args.device)
    loss = D.LossConfig() if lam is None else D.LossConfig(lam=lam)
    batches = T.make_batches(0, E.Data(tok, safety, benign, {}), student, run, loss)
    t_tgt, t_ce = timed_pair(lambda: step("targeted", batches), lambda: step("rto", batches))
    # Where the difference goes: the frozen models' forwards the targeted step adds (A and B on the harmful
    # batch, A on the utility batch, and at lam < 1 A on the clean contexts), timed alone; the rest is the
    # teacher, the base-favored mask, the penalty and the KL terms.
    A, B = frozen.aligned, frozen.base
    reads = [(A, batches.safety), (B, batches.safety), (A, batches.utility)]
    if D.uses_clean_teacher(loss):
        reads.append((A, batches.teacher.clean))

    @torch.no_grad()
    def frozen_forwards():
        for model, batch in reads:
            E.loss_log_probs(model, batch)

    t_frozen = timed(frozen_forwards)
    parts = {"cross_entropy_step_s": t_ce, "frozen_forwards_s": t_frozen, "frozen_forwards": len(reads)}
    parts["teacher_mask_losses_s"] = max(0.0, t_tgt - t_ce - t_frozen)
    return t_tgt, t_ce, {"parts": parts}


def m_build(folder, args):
    """The toy world build's pretraining step (the default BuildConfig's model and batch: 8 rows x 256 tokens,
    float32) in tokens/s, vs the same step of transformers' LlamaForCausalLM on the same weights and
    tokens."""
    import transformers

    from data import toyworld as TW
    from infra.hf import save_model
    from model import Transformer

    torch.manual_seed(0)
    cfg = TW.BuildConfig()
    with tempfile.TemporaryDirectory() as tmp:
        tok, _ = bench_tokenizer_and_pairs(Path(tmp) / "tok")
        ours = Transformer(TW.model_args(tok, cfg))
        save_model(ours, Path(tmp) / "m")
        ref = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "m", dtype=torch.float32)
    ids = torch.randint(3, tok.vocab_size, (cfg.pretrain_rows, cfg.seq_len + 1))  # (8, 257)
    weight = torch.ones(cfg.pretrain_rows, cfg.seq_len)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (ours, ref)]

    def step_ours():
        loss, _ = TW.masked_lm_loss(ours, ids, weight)
        opts[0].zero_grad()
        loss.backward()
        opts[0].step()

    def step_ref():
        loss = ref(ids[:, :-1], labels=ids[:, :-1]).loss
        opts[1].zero_grad()
        loss.backward()
        opts[1].step()

    t_ours, t_ref = timed_pair(step_ours, step_ref)
    tokens = cfg.pretrain_rows * cfg.seq_len
    return tokens / t_ours, tokens / t_ref, {}


# ----------------------------------------------------------------------------------------------
# GPU suite (--gpu): real model shapes with random weights made directly on the device (no download)
# ----------------------------------------------------------------------------------------------
LLAMA31_8B = dict(
    model_type="llama",
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)
SHAPES = {  # config.json dicts, as the released checkpoints have them
    "llama3.1-8b": LLAMA31_8B,
    "qwen3-8b": dict(
        model_type="qwen3",
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
    ),
    "llama3.2-1b": {
        **LLAMA31_8B,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "head_dim": 64,
        "tie_word_embeddings": True,
        "rope_scaling": {**LLAMA31_8B["rope_scaling"], "factor": 32.0},
    },
    # --tiny stands these in for the three above: the same code paths in seconds, on CPU (tests/test_bench.py)
    "tiny-llama": {
        **LLAMA31_8B,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 2048,
    },
    "tiny-qwen3": dict(
        model_type="qwen3",
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=2048,
    ),
}
SHAPES["tiny-llama-tied"] = {**SHAPES["tiny-llama"], "tie_word_embeddings": True}
TINY = {"llama3.1-8b": "tiny-llama", "qwen3-8b": "tiny-qwen3", "llama3.2-1b": "tiny-llama-tied"}


def shape_args(shape: str, args):
    from model import ModelArgs

    return ModelArgs.from_hf_config(
        SHAPES[TINY[shape] if args.tiny else shape], source=f"bench.py SHAPES[{shape!r}]"
    )


def random_model(margs, dtype, device, seed: int = 0):
    """A Transformer with N(0, 0.02) weights (norms 1, biases 0) allocated straight on `device` in `dtype`."""
    from model import Transformer

    with torch.device("meta"):
        model = Transformer(margs).to(dtype)  # (to_empty keeps the dtype: no float32 copy is ever allocated)
    model = model.to_empty(device=device)
    if margs.tie_word_embeddings:  # to_empty makes a fresh tensor per module: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def weight_bytes(model) -> int:
    """Bytes a batch-1 decode step must read: every weight once, except the embedding table, of which the
    lookup reads one row (a tied embedding is read whole, as the head). Works on the meta device."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied tensor is listed once
    if not model.args.tie_word_embeddings:
        emb = model.model.embed_tokens.weight
        total -= emb.numel() * emb.element_size()
    return total


def copy_bandwidth_gbs(device) -> float:
    """Device memory bandwidth: bytes read + written per second by a 1 GiB copy (CPU: the streaming mat-
    vec)."""
    if str(device) == "cpu":
        return bandwidth_gbs()
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), repeat=10)
    return 2 * x.numel() / t / 1e9


def gpu_name(device) -> str:
    """The GPU's name, asked in a child process: CUDA in this parent would hold ~0.5 GB of the GPU all
    along."""
    if not str(device).startswith("cuda"):
        return str(device)
    res = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.get_device_name())"],
        capture_output=True,
        text=True,
    )
    return res.stdout.strip() or f"{device} (name unavailable: {res.stderr.strip()[-200:]})"


def reset_peak_memory(device):
    """Count the peak from here (after the models are built)."""
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(device) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def g_decode(args, shape):
    """Batch-1 greedy decoding at a real shape vs the bandwidth limit (reference = the limit, in tokens/s)."""
    from decode import Sampling, generate

    model = random_model(shape_args(shape, args), DTYPES[args.dtype], args.device)
    limit = copy_bandwidth_gbs(args.device) * 1e9 / weight_bytes(model)
    reset_peak_memory(args.device)
    prompts = torch.randint(3, 1000, (1, 32)).tolist()
    # the first call compiles (and records CUDA graphs); the same length, so it is reused
    t0 = time.perf_counter()
    how = Sampling(max_new_tokens=args.new_tokens, compile=args.compile)
    generate(model, prompts, how)
    first_call_s = time.perf_counter() - t0
    t = timed(lambda: generate(model, prompts, how))
    return (
        args.new_tokens / t,
        limit,
        {
            "compiled": args.compile,
            "first_call_s": round(first_call_s, 1),
            "matvec_tokens_per_s": matvec_tokens_per_s(model),
            "weight_gb": round(weight_bytes(model) / 1e9, 2),
        },
    )


def g_contrastive(args, shape):
    """Contrastive decoding with two real-shape models vs plain decoding of one (both compiled with
    --compile)."""
    from decode import Sampling, contrastive_generate, generate

    margs = shape_args(shape, args)
    a, b = (
        random_model(margs, DTYPES[args.dtype], args.device, 0),
        random_model(margs, DTYPES[args.dtype], args.device, 1),
    )
    reset_peak_memory(args.device)
    prompts = torch.randint(3, 1000, (1, 32)).tolist()
    n = args.new_tokens
    t_cd, t_plain = timed_pair(
        lambda: contrastive_generate(a, b, prompts, Sampling(max_new_tokens=n, compile=args.compile)),
        lambda: generate(a, prompts, Sampling(max_new_tokens=n, compile=args.compile)),
    )
    return n / t_cd, n / t_plain, {"compiled": args.compile}


def bench_tokenizer_and_pairs(folder: Path):
    """A BPE tokenizer and harmful (prompt, response) pairs from the toy world's generator (no model
    build)."""
    from data import world as W
    from infra.files import write_text_atomic
    from infra.tokenizer import Tokenizer

    sets = W.make_data_sets(
        W.World(0),
        n_pretrain=400,
        n_alignment=200,
        n_safety=50,
        n_benign_train=50,
        harmful_eval_per_category=8,
    )
    for name, text in W.tokenizer_files(W.train_tokenizer(W.tokenizer_texts(sets))).items():
        write_text_atomic(folder / name, text)
    return Tokenizer(folder), sets["harmful_eval"]  # 64 pairs


def g_profile(args, shape):
    """position_profile tokens/s with two real-shape models vs one teacher-forced forward over the same
    tokens."""
    margs = shape_args(shape, args)
    a, b = (
        random_model(margs, DTYPES[args.dtype], args.device, 0),
        random_model(margs, DTYPES[args.dtype], args.device, 1),
    )
    reset_peak_memory(args.device)
    return profile_vs_forward(a, b, 64, 32, args.device)


def targeted_training(make_model, lora_rank: int, tok=None, lam: float | None = None):
    """train.py's pieces for timing and measuring steps: the student (with LoRA adapters if lora_rank), the
    frozen base and aligned teacher (the student with adapters off under LoRA), float32 masters and AdamW, and
    step(method, batches), one optimizer step as train.py takes it. make_model(seed) builds one model; lam
    the teacher's hard-label weight (None: the default; below 1 adds the clean-context teacher's forward)."""
    import deepalign as D
    import train as T
    from data.examples import word_start_ids
    from infra.lora import FrozenAligned, add_lora
    from infra.optim import fp32_masters, optimizer_step

    student, base = make_model(0), make_model(1).requires_grad_(False)
    if lora_rank:
        add_lora(student, lora_rank, 2.0 * lora_rank)
        aligned = FrozenAligned(student, adapters_off=True)
    else:
        aligned = FrozenAligned(make_model(2).requires_grad_(False), adapters_off=False)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    masters = fp32_masters(params)
    opt = torch.optim.AdamW(masters, lr=1e-5)
    device = student.lm_head.weight.device
    V = student.args.vocab_size
    valid = torch.ones(V, dtype=torch.bool, device=device)
    word_start = word_start_ids(tok, V).to(device) if tok is not None else torch.arange(V, device=device)
    frozen = T.Frozen(base, aligned, valid, word_start)
    loss = D.LossConfig() if lam is None else D.LossConfig(lam=lam)

    def step(method, batches):
        # as train.py: the masters' float32 gradients are freed before each step
        opt.zero_grad(set_to_none=True)
        terms = T.step_losses(method, student, frozen, batches, loss)
        terms["loss"].backward()
        optimizer_step(params, masters, opt, 1.0)

    return student, step, frozen


def synthetic_batches(batch: int, seq: int, vocab: int, device, seed: int, K: int = 40):
    """train.py's batches of `targeted` with random tokens, `seq` tokens per sequence: per example, the dense
    harmful contexts (the last K + 1 positions of a sequence), a recovery (loss on its last 128 positions), a
    clean sequence for the teacher, and a benign example (loss on its last seq/2 positions). Both methods read
    the same harmful batch (dense and recovery contexts) and utility batch."""
    from data import examples as E

    g = torch.Generator().manual_seed(seed)
    K = min(K, seq // 2)

    def example(n_loss, dense):
        ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
        start = seq - n_loss
        return E.Example(ids, list(range(start - 1, seq - 1)), ids[start:], list(range(n_loss)), dense)

    harmful, cleans, index = [], [], []
    for b in range(batch):
        harmful += [example(K + 1, True), example(min(128, seq // 2), False)]
        cleans.append(example(min(128, seq // 2), False))
        offset = b * len(cleans[0].cols)
        index += [offset] * (K + 1) + [offset + j for j in range(min(128, seq // 2))]
    n = len(index)
    flags = torch.zeros(n, dtype=torch.bool, device=device)
    teacher = E.TeacherIndex(E.collate(cleans, 0, device), torch.tensor(index, device=device), flags, ~flags)
    utility = E.collate([example(seq // 2, False) for _ in range(batch)], 0, device)
    shares = {name: 1.0 for name in ("kd", "util", "ce", "safety")}
    return E.Batches(E.collate(harmful, 0, device), utility, teacher, shares)


def g_train(args, shape, lora_rank: int):
    """train.py's `targeted` step at sequence length --seq-len, --checkpointing: the largest batch (powers of
    two up to --max-batch) that fits, its tokens/s (student tokens, safety + utility) and peak memory;
    reference: a plain cross-entropy step (`augment`) at the same batch."""
    margs = shape_args(shape, args)
    student, step, _ = targeted_training(
        lambda seed: random_model(margs, DTYPES[args.dtype], args.device, seed), lora_rank
    )
    student.checkpointing = True

    def fits(batch) -> bool:
        try:
            step("targeted", synthetic_batches(batch, args.seq_len, margs.vocab_size, args.device, batch))
            sync()
            return True
        except (torch.OutOfMemoryError, RuntimeError) as e:  # cuBLAS reports some OOMs as RuntimeError
            if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e).lower():
                raise
            return False
        finally:
            student.zero_grad(set_to_none=True)  # (the masters' gradients are freed by the next step)
            if str(args.device).startswith("cuda"):
                torch.cuda.empty_cache()

    largest, batch = 0, 1
    while batch <= args.max_batch and fits(batch):  # one step decides; only the largest is timed
        largest, batch = batch, batch * 2
    if not largest:
        raise RuntimeError(f"{shape}: even batch 1 at sequence length {args.seq_len} does not fit")
    batches = synthetic_batches(largest, args.seq_len, margs.vocab_size, args.device, largest)
    reset_peak_memory(args.device)
    t_tgt, t_ce = timed_pair(lambda: step("targeted", batches), lambda: step("rto", batches))
    # the student reads a dense, a recovery and a benign sequence per example
    tokens = 3 * largest * args.seq_len
    return (
        tokens / t_tgt,
        tokens / t_ce,
        {
            "largest_batch": largest,
            "fits_up_to_max_batch": batch > args.max_batch,
            "seq_len": args.seq_len,
            "lora_rank": lora_rank,
            "checkpointing": True,
            "peak_mb": round(peak_memory_mb(args.device)),
        },
    )


GPU_MEASUREMENTS = {  # (function, target); decode rows: "reference" is the bandwidth limit in tokens/s
    "decode b1 llama3.1-8b": (lambda f, a: g_decode(a, "llama3.1-8b"), ">= 0.70 of limit"),
    "decode b1 qwen3-8b": (lambda f, a: g_decode(a, "qwen3-8b"), ">= 0.70 of limit"),
    "contrastive llama3.1-8b x2": (lambda f, a: g_contrastive(a, "llama3.1-8b"), ">= 0.45"),
    "profile llama3.1-8b x2": (lambda f, a: g_profile(a, "llama3.1-8b"), ">= 0.45"),
    # training rows: tokens/s of a targeted step vs a cross-entropy step (1 / 1.8 = the CPU row's time target)
    "train targeted lora16 llama3.1-8b": (lambda f, a: g_train(a, "llama3.1-8b", 16), ">= 0.56"),
    "train targeted full llama3.2-1b": (lambda f, a: g_train(a, "llama3.2-1b", 0), ">= 0.56"),
}


def m_train_memory(folder, args, lora_rank: int):
    """Peak resident memory of `targeted` training steps in bf16 (batch 1 x 32 tokens, so activations are
    negligible), in bytes per model parameter over the process's baseline: checks the README's memory table,
    whose held bytes per parameter are the reference (22 full, 4 with LoRA)."""
    from infra.hf import load_model

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    student, step, _ = targeted_training(lambda seed: load_model(folder, "bfloat16", "cpu"), lora_rank)
    n = sum(p.numel() for n, p in student.named_parameters() if "lora_" not in n)
    batches = synthetic_batches(1, 32, student.args.vocab_size, "cpu", 0)
    for _ in range(2):
        step("targeted", batches)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return (peak - baseline) / n, 4.0 if lora_rank else 22.0, {}


MEASUREMENTS = {
    "prefill": (m_prefill, ">= 1.0"),
    "decode b1": (lambda f, a: m_decode(f, a, 1), ">= 1.0"),
    "decode b8": (lambda f, a: m_decode(f, a, 8), ">= 1.0"),
    "decode b1 compile": (lambda f, a: m_decode(f, a, 1, compile=True), "report"),
    "contrastive": (m_contrastive, ">= 0.5"),
    "profile": (m_profile, ">= 0.6"),
    "train step": (m_train, "<= 1.6"),
    "train step, lam 0.5": (lambda f, a: m_train(f, a, 0.5), "report"),
    "build pretrain step": (m_build, "report"),
    "toy generate": (m_toy_generate, ">= 3.0"),
    "toy generate sampled x16": (lambda f, a: m_toy_generate(f, a, samples=16), ">= 3.0"),
    "toy generate eval batch": (m_toy_batch, ">= 3.0"),
    "gcg step": (m_gcg_step, "report"),
    "train memory full": (lambda f, a: m_train_memory(f, a, 0), "report"),
    "train memory lora16": (lambda f, a: m_train_memory(f, a, 16), "report"),
}


def run_one(name, folder, args):
    table = GPU_MEASUREMENTS if args.gpu else MEASUREMENTS
    out = table[name][0](folder, args)
    ours, ref, extra = out if len(out) == 3 else (*out, {})
    # a training row: at its largest batch
    peak_mb = extra.pop("peak_mb", None) or round(peak_memory_mb(args.device))
    print(json.dumps({"ours": ours, "reference": ref, "peak_mb": peak_mb, **extra}))


def cpu_header(size: str, folder: Path) -> dict:
    """Parameters, weight bytes per decoded token and this machine's bandwidth limit for the CPU suite's
    model."""
    from infra.hf import read_json
    from model import ModelArgs, Transformer

    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf_config(read_json(folder / "config.json")))
    n_params, nbytes = sum(p.numel() for p in model.parameters()), weight_bytes(model)
    bw = bandwidth_gbs()
    limit = bw * 1e9 / nbytes  # tokens/s at batch 1 if every weight is read once per token
    print(
        f"{size}: {n_params / 1e6:.0f}M parameters, {nbytes / 1e9:.2f} GB of float32 weights read per "
        f"token "
        f"(all but the embedding table); streaming mat-vec {bw:.1f} GB/s -> batch-1 decode limit "
        f"{limit:.1f} tokens/s",
        file=sys.stderr,
    )
    return {
        "size": size,
        "parameters": n_params,
        "weight_bytes_per_token": nbytes,
        "bandwidth_gbs": bw,
        "decode_limit_tokens_per_s": limit,
    }


def suite_description(args) -> str:
    """What the GPU suite runs, in words, for the log."""
    what = [f"GPU suite, {args.dtype}"]
    if args.compile:
        what.append("compiled decoding")
    if args.tiny:
        what.append("TINY stand-in shapes (a code-path check, not a measurement)")
    return "; ".join(what)


def row_summary(row: dict) -> str:
    """One measured row, for the log: the two sides, the ratio, the target, and the limits it is measured
    against."""
    text = (
        f"{row['name']:34s} ours {row['ours']:10.2f}  ref {row['reference']:10.2f}  ratio "
        f"{row['ratio']:5.2f}x "
        f"(target {row['target']})  peak {row['peak_mb']} MB"
    )
    if "fraction_of_bandwidth_limit" in row:
        text += f"  {100 * row['fraction_of_bandwidth_limit']:.0f}% of limit"
    if "parts" in row:
        p = row["parts"]
        text += (
            f"  = cross-entropy step {p['cross_entropy_step_s']:.2f} s + {p['frozen_forwards']} frozen "
            f"forwards {p['frozen_forwards_s']:.2f} s + teacher, mask, losses "
            f"{p['teacher_mask_losses_s']:.2f} s"
        )
    if "fraction_of_matvec_limit" in row:
        text += (
            f", {100 * row['fraction_of_matvec_limit']:.0f}% of mat-vecs alone "
            f"({row['matvec_tokens_per_s']:.1f} tok/s)"
        )
    return text


UNITS = {
    "gcg step": "steps/s",
    "train memory full": "B/param",
    "train memory lora16": "B/param",
}


def markdown_rows(rows: list[dict]) -> str:
    cells = []
    for r in rows:
        unit = "s" if r["name"].startswith("train step") else UNITS.get(r["name"], "tok/s")
        ours, reference = f"{r['ours']:.2f} {unit}", f"{r['reference']:.2f} {unit}"
        cells.append([r["name"], ours, reference, f"{r['ratio']:.2f}x", f"{r['target']}", f"{r['peak_mb']}"])
    return markdown(["measurement", "ours", "reference", "ratio", "target", "peak MB"], cells)


def child_command(name: str, folder, args) -> list[str]:
    """The command line that runs one measurement in a process of its own, with this run's settings."""
    cmd = [sys.executable, "-m", "experiments.bench", "--one", name]
    cmd += ["--folder", str(folder)] if folder else []
    for f in fields(BenchConfig):
        value = getattr(args, f.name)
        if f.name in PARENT_ONLY or value is None or value is False:
            continue
        cmd += [cli.flag_name(f.name)] + ([] if value is True else [str(value)])
    return cmd


def measure(name: str, folder, header: dict, table: dict, args) -> dict | None:
    """Run one row in its own process (its own peak memory); the row, or None if it failed."""
    res = subprocess.run(child_command(name, folder, args), capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        print(f"{name}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
        return None
    r = json.loads(res.stdout.strip().splitlines()[-1])
    row = {
        "name": name,
        "ours": r["ours"],
        "reference": r["reference"],
        "ratio": r["ours"] / r["reference"],
        "target": table[name][1],
        "peak_mb": r["peak_mb"],
    }
    if not args.gpu and name.startswith(("decode", "contrastive")) and " b8" not in name:
        row["fraction_of_bandwidth_limit"] = r["ours"] / header["decode_limit_tokens_per_s"]
    if args.gpu and name.startswith("decode"):
        row["fraction_of_bandwidth_limit"] = row["ratio"]
    row.update({k: v for k, v in r.items() if k not in ("ours", "reference", "peak_mb")})
    if "matvec_tokens_per_s" in row:
        row["fraction_of_matvec_limit"] = row["ours"] / row["matvec_tokens_per_s"]
    return row


def suite_header(args, tmp: str) -> tuple[Path | None, dict]:
    """(the CPU suite's random checkpoint, written under tmp, or None for the GPU suite, whose models are
    made on the device; what the JSON records of the suite and the machine)."""
    if not args.gpu:
        folder = make_checkpoint(args.size, Path(tmp) / "model")
        return folder, {"suite": "cpu", **cpu_header(args.size, folder)}
    header = {
        "suite": "gpu",
        "tiny": args.tiny,
        "dtype": args.dtype,
        "compiled": args.compile,
        "device": gpu_name(args.device),
    }
    print(f"{suite_description(args)} on {header['device']}", file=sys.stderr)
    return None, header


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    """The settings of a bench run, each a flag."""

    gpu: bool = setting(False, "the GPU suite: real 8B/1B shapes, random weights")
    tiny: bool = setting(False, "GPU suite with tiny stand-in shapes (to try it on CPU)")
    size: str = setting("125m", "CPU suite: the model size", choices=tuple(sorted(SIZES)))
    only: tuple = setting((), "run only these rows (names as printed)")
    compile: bool = setting(False, "CPU: also measure compiled decoding; GPU: compile it")
    new_tokens: int = setting(128, "tokens generated per decode measurement")
    seq_len: int = setting(1024, "GPU training rows: tokens per example")
    max_batch: int = setting(64, "GPU training rows: the largest batch tried")
    dtype: str | None = setting(
        None,
        "weights and activations",
        type=str,
        choices=tuple(sorted(DTYPES)),
        shown="float32 (CPU suite) or bfloat16 (GPU suite)",
    )
    device: str | None = setting(None, "torch device", type=str, shown="cpu (CPU suite) or cuda (GPU suite)")
    out: str | None = setting(
        None, "write {rows: [{name, ours, reference, ratio, target}], ...} here", type=str
    )
    one: str | None = setting(None, argparse.SUPPRESS, type=str)  # internal: run one measurement here
    folder: str | None = setting(None, argparse.SUPPRESS, type=str)  # internal: its model's folder


PARENT_ONLY = ("only", "out", "one", "folder")  # the flags a measurement's own process is not given


def parse_args(argv=None) -> BenchConfig:
    p = cli.parser(__doc__)
    cli.add_settings(p, BenchConfig)
    args = p.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.gpu else "float32")
    return cli.settings_from(
        BenchConfig, args, dtype=dtype, device=args.device or ("cuda" if args.gpu else "cpu")
    )


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        return run_one(args.one, Path(args.folder) if args.folder else None, args)
    table = GPU_MEASUREMENTS if args.gpu else MEASUREMENTS
    unknown = sorted(set(args.only) - set(table))
    if unknown:
        raise ValueError(f"--only: unknown rows {unknown}; this suite has: {', '.join(table)}")
    names = args.only or [n for n in table if args.gpu or args.compile or "compile" not in n]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder, header = suite_header(args, tmp)
        for name in names:
            row = measure(name, folder, header, table, args)
            if row is None:
                continue
            rows.append(row)
            if args.out:  # after every row, so that a run cut short keeps what it measured
                write_json_atomic(args.out, {**header, "rows": rows})
            print(row_summary(row), file=sys.stderr)
    print(markdown_rows(rows))


if __name__ == "__main__":
    cli.run(main)
