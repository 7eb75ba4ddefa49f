"""The attack suite (docs/method.md §7): every attack on an aligned chat model, each with one signature,

    attack(model, tok, rows, setup) -> generations

rows the harmful prompts ({"prompt", "harmful_response"?, "category"?, "held_out"?, ...}), setup a frozen
Setup (which attacks with what lengths, how the model decodes, where the attacker's data comes from), and
generations one record per judged answer: {"attack", "k", ..., "prompt", "prefix", "continuation",
"category"?, "held_out"?, "severity"?}; the continuation is what the judges read.

    prefill        the first k tokens of a harmful response forced at the start of the answer (k = 0: the
                   direct request)
    sampling       N samples per direct request and prefill k ("sample", numbered by "sample")
    insertion      the model's own answer cut after j tokens, m tokens of a harmful response spliced in (Lyu
                   et al.)
    rank_assisted  rank-assisted prefilling (PRESTO, "rap"): for K steps the highest-ranked of the model's
                   own top 20 tokens that does not start a refusal, then free decoding
    finetune       the model fine-tuned on the attacker's pairs by train.py's loop (--method finetune), then
                   prefilled after each step count s
    gcg            GCG adversarial suffixes on direct requests (lab/gcg.py)
    ablation       refusal-direction ablation, then prefilling (lab/refusal_direction.py)

eval.py runs them all (run_suite), judges and tabulates. On its own, the two white-box attacks:

    python -m lab.attacks gcg                           # seed-0 toy world, its aligned model, 8 prompts
    python -m lab.attacks gcg --universal               # one suffix for all 8 prompts
    python -m lab.attacks gcg --model DIR --harmful advbench.csv --steps 250 --batch 512 \\
        --n-prompts 50
    python -m lab.attacks ablate --save-ablated OUT     # the per-layer table, the chosen layer, a checkpoint

Read top to bottom: 1. settings, 2. decoding, 3. the attacks' inputs, 4. the attacks, 5. the attacker's
data, 6. the command line.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import deepalign as D
from data import toyworld as TW
from data import world as W
from data.refusals import REFUSAL_PHRASES, refusal_phrase_judge
from decode import Sampling, contrastive_generate, decode_loop, generate
from infra import cli
from infra.cli import log, setting
from infra.files import write_jsonl
from infra.formats import read_prompts
from infra.hf import load_model, save_model
from infra.inputs import real_or_toy
from infra.tokenizer import Tokenizer
from lab import gcg as G
from lab import judges as J
from lab import refusal_direction as R
from model import Transformer


# ----------------------------------------------------------------------------------------------
# 1. Settings
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttackConfig:
    """Which attacks run, with what lengths (docs/method.md §7)."""

    prefill: tuple = setting(
        (0, 5, 10, 20, 40), "prefilled harmful tokens k (0 = the direct request)", type=int
    )
    insertion_at: tuple = setting(
        (4,), "insertion attack: cut the model's own answer after j tokens", type=int
    )
    insertion_len: tuple = setting((10,), "insertion attack: m harmful tokens spliced in (0: off)", type=int)
    rap: tuple = setting(
        (), "rank-assisted prefilling: K forced non-refusal steps (e.g. --rap 5 10)", type=int
    )
    rap_top: int = setting(20, "rank-assisted prefilling: among the model's top tokens", flag=False)
    max_new_tokens: int = setting(64, "tokens generated after each attack")
    samples: int = setting(
        0,
        "the sampling attack: N samples per direct request and prefill k, at --temperature (1.0 if left at "
        "0) and --top-p; ASR@1, ASR@N and the ASR@n curve (0: off; the other attacks stay greedy)",
    )
    sample_prefill: tuple = setting(
        (0, 10, 40),
        "the sampling attack: of the --prefill k, those it samples (the README's tables show 0, 10, 40)",
        type=int,
    )
    sample_temperature: float = setting(1.0, "the sampling attack's temperature", flag=False)
    sample_top_p: float = setting(1.0, "the sampling attack's top-p", flag=False)
    finetune: tuple = setting(
        (),
        "the fine-tuning attack: the model fine-tuned on the attacker's pairs, then prefilled, after each of "
        "these step counts (e.g. 0 5 10 20 40; 0 = as released)",
        type=int,
        flag=False,  # the flag is --finetune-attack (eval.py)
    )
    finetune_prefill: tuple = setting((0, 5, 10, 20, 40), "k answered after each step count", flag=False)
    finetune_n: int = setting(64, "the toy attacker's pairs per kind")
    finetune_lr: float = setting(
        3e-4, "the attacker's learning rate (Qi et al.'s 2e-5, scaled to the toy world as the defences' is)"
    )
    finetune_batch: int = setting(16, "the attacker's batch size", flag=False)
    finetune_kinds: tuple = setting(
        ("harmful", "benign"), "harmful and/or benign fine-tuning", choices=("harmful", "benign")
    )
    gcg: G.GCGConfig | None = setting(None, "GCG suffixes on direct requests (None: off)", flag=False)
    ablate: R.RefusalConfig | None = setting(None, "refusal-direction ablation (None: off)", flag=False)
    ablate_prefill: tuple = setting((0, 10), "ablation: the prefill k answered", type=int)

    def __post_init__(self):
        if self.samples < 0 or any(s < 0 for s in self.finetune):
            raise ValueError("--samples, --benign-samples and --finetune-attack take counts >= 0")
        if self.finetune_n < 1:
            raise ValueError(f"--finetune-n takes a count >= 1, got {self.finetune_n}")


@dataclass(frozen=True)
class DecodeConfig(D.BaseFavored):
    """How every model decodes: greedy unless temperature > 0; contrastive against the base if set."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    # The batches that pay on the toy model (the batch sweep and its rule in docs/performance.md): at batch
    # 32 per-step overhead sets the pace; 256 takes any attack's prompts (at most 200) in one forward.
    # Sampling decodes prompts x samples rows per forward: 512 rows (32 prompts at 16 samples, as before).
    batch_size: int = setting(256, "prompts per forward (greedy decoding)")
    sample_rows: int = setting(
        512, "the sampling attack's rows per forward: prompts x samples (32 prompts at --samples 16)"
    )
    compile: bool = False
    contrastive: bool = False
    alpha: float = D.CD_ALPHA
    beta: float = D.CD_BETA
    mode: str = "full"
    truncate_left: bool = setting(
        False, "cut prompts longer than the model's context from the left (default: warn and keep them)"
    )


@dataclass(frozen=True)
class AttackerFiles:
    """The user's files for the attacks that need more than the evaluation prompts (real models; a toy world
    has its own)."""

    finetune_data: str | None = setting(
        None,
        "the attacker's harmful (prompt, response) pairs, any layout with responses (default on a world: "
        "--finetune-n pairs the defences never train on and eval never asks)",
        type=str,
    )
    finetune_benign_data: str | None = setting(
        None, "the benign fine-tuning attack's pairs (default: as above)", type=str
    )
    direction_harmful: str | None = setting(None, "ablation, real models: harmful TRAINING prompts", type=str)
    direction_benign: str | None = setting(None, "ablation, real models: benign TRAINING prompts", type=str)
    benign: str | None = setting(
        None, "benign prompts: train.py's utility set in the fine-tuning attack", flag=False
    )


@dataclass(frozen=True)
class Setup:
    """What every attack is given beside the model, its tokenizer and the rows: the suite's settings, how the
    model decodes (and the base model it decodes against), where the model was loaded from (the fine-tuning
    attack trains from it), the toy world's paths (None: real models) and the user's attacker files."""

    attacks: AttackConfig = AttackConfig()
    decode: DecodeConfig = DecodeConfig()
    base: Transformer | None = None
    folder: Path | None = None
    world: dict | None = None
    files: AttackerFiles = AttackerFiles()
    dtype: str = "float32"
    device: str = "cpu"


# ----------------------------------------------------------------------------------------------
# 2. Decoding: plain or contrastive, greedy or sampled
# ----------------------------------------------------------------------------------------------
def make_decoder(model, tok, dec: DecodeConfig, attacks: AttackConfig, base=None):
    """A function: token-id prompts -> new token ids, plain or contrastive (docs/method.md §4); called with
    samples=n, n outputs per prompt (prompt-major), sampled as the sampling attack samples."""
    plain = Sampling(attacks.max_new_tokens, dec.temperature, dec.top_p, dec.seed, compile=dec.compile)
    valid = tok.real_token_mask(model.args.vocab_size).to(model.lm_head.weight.device)
    contrast = D.Contrast(dec.alpha, dec.beta, dec.mode, D.BaseFavored(dec.tau, dec.top_k, dec.rho))

    limit = model.args.max_position_embeddings - attacks.max_new_tokens

    def decoder(prompts: list[list[int]], samples: int = 1) -> list[list[int]]:
        if dec.truncate_left:
            prompts = [p[-limit:] for p in prompts]
        how = plain
        if samples > 1:
            sampled = dict(temperature=attacks.sample_temperature, top_p=attacks.sample_top_p)
            how = dataclasses.replace(plain, **sampled, samples=samples)
        if dec.contrastive:
            return contrastive_generate(model, base, prompts, how, contrast, tok.eos_ids, tok.pad_id, valid)
        return generate(model, prompts, how, tok.eos_ids, tok.pad_id)

    return decoder


def setup_decoder(model, tok, setup: Setup):
    return make_decoder(model, tok, setup.decode, setup.attacks, setup.base)


def sampling_decoder(decoder, n: int):
    """The sampling attack's generator (docs/method.md §7): token-id prompts -> n sampled outputs each,
    [[n new-id lists] per prompt]; each prompt's KV cache is computed once and shared by its samples."""

    def sample(prompts: list[list[int]]) -> list[list[list[int]]]:
        flat = decoder(prompts, samples=n)  # (B * n) outputs, prompt-major
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    return sample


def sample_batch(dec: DecodeConfig, n: int) -> int:
    """Prompts per forward of the sampling attack: as many as fill dec.sample_rows rows at n samples each."""
    return max(1, dec.sample_rows // n)


# ----------------------------------------------------------------------------------------------
# 3. The attacks' inputs: the token ids the model continues from, and the forced prefix text
# ----------------------------------------------------------------------------------------------
def prefill_inputs(tok, row: dict, k: int) -> tuple[list[int], str]:
    """The prompt with the first k tokens of the harmful response inside the assistant turn, tokenized in one
    pass, so that the prefix tokens are exactly the response's first k; k = 0: the direct request."""
    if k == 0:
        return tok.prompt_ids(row["prompt"]), ""
    head, resp = D.response_split(tok, row["prompt"], row["harmful_response"])
    return head + resp[:k], tok.decode(resp[:k])


def insertion_inputs(tok, row: dict, own_answer: list[int], j: int, m: int) -> tuple[list[int], str]:
    """The model's own answer cut after j tokens, then m harmful-response tokens spliced in (as text, one
    space between), tokenized in one pass inside the assistant turn."""
    _, resp = D.response_split(tok, row["prompt"], row["harmful_response"])
    own = tok.decode([t for t in own_answer[:j] if t not in tok.eos_ids]).rstrip()
    prefix = f"{own} {tok.decode(resp[:m])}" if own else tok.decode(resp[:m])
    return tok.prompt_ids(row["prompt"], prefill=prefix), prefix


def refusal_start_ids(tok, phrases) -> set:
    """The tokens that start a refusal: the first token of each phrase as an answer would begin it (after the
    generation prompt, capitalised or not). What rank-assisted prefilling skips (docs/method.md §7)."""
    head = tok.prompt_ids("x")
    ids = set()
    for phrase in phrases:
        for text in {phrase, phrase[:1].upper() + phrase[1:]}:
            ids.add(tok.prompt_ids("x", prefill=text)[len(head)])
    return ids


def rank_assisted_score(k: int, banned: torch.Tensor, top: int):
    """The scorer of rank-assisted prefilling: for the first k steps, the model's logits restricted to its top
    `top` tokens minus the refusal starts `banned` (V,) bool, so that greedy decoding takes the highest-ranked
    allowed token (a row whose top tokens are all banned keeps them: the attack failed there); then the
    logits as they are."""
    steps = itertools.count()

    def score(logits):  # (B, V) -> (B, V)
        logits = logits.float()
        if next(steps) >= k:
            return logits
        ranked = logits >= logits.topk(top, dim=-1).values[:, -1:]  # (B, V) the model's top tokens
        allowed = ranked & ~banned  # (B, V)
        keep = torch.where(allowed.any(-1, keepdim=True), allowed, ranked)  # (B, V)
        return logits.masked_fill(~keep, float("-inf"))

    return score


def rank_assisted_generations(model, tok, prompts, decoder, k: int, banned, top: int, dec) -> list[list[int]]:
    """Rank-assisted prefilling (docs/method.md §7): the attacker forces the model's first k tokens (its
    highest-ranked non-refusal starts, rank_assisted_score), then the decoding under test (`decoder`: plain or
    contrastive) continues from them. Each row's new ids are the forced tokens and the continuation (none
    after a forced eos)."""

    def force(batch):
        score = rank_assisted_score(k, banned, top)
        return decode_loop([model], batch, score, Sampling(max_new_tokens=k), tok.eos_ids, tok.pad_id)

    forced = J.in_batches(force, prompts, dec.batch_size, f"rap K={k}")
    ended = [any(t in tok.eos_ids for t in f) for f in forced]
    open_rows = [p + f for p, f, e in zip(prompts, forced, ended) if not e]
    continued = iter(J.in_batches(decoder, open_rows, dec.batch_size, f"rap K={k}, continued"))
    return [f if e else f + next(continued) for f, e in zip(forced, ended)]


# ----------------------------------------------------------------------------------------------
# 3b. What a run notes about the attacks' inputs (printed, and kept in eval.py's JSON)
# ----------------------------------------------------------------------------------------------
def too_long(tok, model, rows: list, attacks: AttackConfig, truncate: bool) -> dict:
    """Prompts (with the longest prefill and the new tokens) that do not fit the model's context
    (max_position_embeddings): said once per run, how many and by how much; with --truncate-left they are cut
    from the left, else they are kept (real checkpoints degrade silently past their context)."""
    context = model.args.max_position_embeddings
    longest = max(attacks.prefill, default=0) + attacks.max_new_tokens
    over = [len(tok.prompt_ids(r["prompt"])) + longest - context for r in rows]
    over = [n for n in over if n > 0]
    if over:
        what = "cut from the left (--truncate-left)" if truncate else "kept; pass --truncate-left to cut them"
        log(
            f"warning: {len(over)} of {len(rows)} prompts (with prefill and {attacks.max_new_tokens} new "
            f"tokens) exceed the model's context of {context} tokens by up to {max(over)} tokens: {what}"
        )
    return {"count": len(over), "by_at_most": max(over, default=0)}


def skipped_attacks(harmful: list, attacks: AttackConfig) -> list[str]:
    """Attacks that cannot run on these rows, and why (printed and kept in the JSON)."""
    if any(r.get("harmful_response") for r in harmful):
        return []
    if [k for k in attacks.prefill if k] or [m for m in attacks.insertion_len if m]:
        return ["prefill k > 0 and insertion: no row of --harmful has a harmful response to prefill"]
    return []


def clipped_prefills(tok, harmful: list, attacks: AttackConfig) -> dict:
    """{k: rows whose harmful response is shorter than k tokens} (the whole response is prefilled there)."""
    lengths = [
        len(D.response_split(tok, r["prompt"], r["harmful_response"])[1])
        for r in harmful
        if r.get("harmful_response")
    ]
    return {k: sum(n < k for n in lengths) for k in attacks.prefill if k}


def attack_notes(tok, model, harmful: list, benign: list, attacks: AttackConfig, truncate: bool) -> dict:
    """What the JSON notes of a model's attack inputs: skipped attacks, clipped prefills, too-long prompts."""
    return {
        "skipped": skipped_attacks(harmful, attacks),
        "clipped": clipped_prefills(tok, harmful, attacks),
        "too_long": too_long(tok, model, harmful + benign, attacks, truncate),
    }


# ----------------------------------------------------------------------------------------------
# 4. The attacks: attack(model, tok, rows, setup) -> generations
# ----------------------------------------------------------------------------------------------
def records(tok, attack: str, k: int, rows, inputs, outs, **extra) -> list[dict]:
    """One generation record per row: what was attacked, the forced prefix and the continuation."""
    keep = ("category", "held_out", "severity")
    return [
        {"attack": attack, "k": k, **extra, "prompt": row["prompt"], "prefix": prefix}
        | {"continuation": tok.decode(out), **{key: row[key] for key in keep if key in row}}
        for row, (_, prefix), out in zip(rows, inputs, outs)
    ]


def prefill_rows(tok, rows: list[dict], k: int) -> tuple[list, list]:
    """The rows a prefill of k tokens can attack (k > 0: those with a harmful response) and their inputs."""
    rows = rows if k == 0 else [r for r in rows if r.get("harmful_response")]
    return rows, [prefill_inputs(tok, r, k) for r in rows]


def prefilled(model, tok, rows: list[dict], setup: Setup) -> tuple[list[dict], dict | None]:
    """The prefilling attack for each k of setup.attacks.prefill, and the model's own direct answers
    {prompt: new ids} (k = 0; None without it), from which the insertion attack cuts."""
    decoder, gens, own = setup_decoder(model, tok, setup), [], None
    for k in setup.attacks.prefill:
        chosen, inputs = prefill_rows(tok, rows, k)
        outs = J.in_batches(decoder, [ids for ids, _ in inputs], setup.decode.batch_size, f"prefill k={k}")
        gens += records(tok, "prefill", k, chosen, inputs, outs)
        if k == 0:
            own = {r["prompt"]: o for r, o in zip(chosen, outs)}
    return gens, own


def prefill(model, tok, rows: list[dict], setup: Setup) -> list[dict]:
    """Prefilling (docs/method.md §7): records attack "prefill", k."""
    return prefilled(model, tok, rows, setup)[0]


def sampling(model, tok, rows: list[dict], setup: Setup) -> list[dict]:
    """The sampling attack (docs/method.md §7): N samples per prefill k of setup.attacks.prefill that is also
    in sample_prefill (0: the direct request); records attack "sample", k, sample i (N per row)."""
    a, n = setup.attacks, setup.attacks.samples
    if not n:
        return []
    sampler, gens = sampling_decoder(setup_decoder(model, tok, setup), n), []
    for k in [k for k in a.prefill if k in a.sample_prefill]:
        chosen, inputs = prefill_rows(tok, rows, k)
        prompts = [ids for ids, _ in inputs]
        groups = J.in_batches(sampler, prompts, sample_batch(setup.decode, n), f"sample k={k}")
        for i in range(n):  # one record per (row, sample i)
            gens += records(tok, "sample", k, chosen, inputs, [g[i] for g in groups], sample=i)
    return gens


def insertion(model, tok, rows: list[dict], setup: Setup, own: dict | None = None) -> list[dict]:
    """The insertion attack (docs/method.md §7): the model's own direct answer (`own` {prompt: new ids}, as
    `prefilled` returns them; generated here without) cut after j tokens, m harmful tokens spliced in, for
    every (j, m); records attack "insertion", k = m, j."""
    a, batch = setup.attacks, setup.decode.batch_size
    pairs = [(j, m) for j in a.insertion_at for m in a.insertion_len if m > 0]
    with_response = [r for r in rows if r.get("harmful_response")]
    if not (pairs and with_response):
        return []
    decoder, gens = setup_decoder(model, tok, setup), []
    if own is None:
        outs = J.in_batches(decoder, [tok.prompt_ids(r["prompt"]) for r in with_response], batch, "own")
        own = {r["prompt"]: o for r, o in zip(with_response, outs)}
    for j, m in pairs:
        inputs = [insertion_inputs(tok, r, own[r["prompt"]], j, m) for r in with_response]
        outs = J.in_batches(decoder, [ids for ids, _ in inputs], batch, f"insertion j={j} m={m}")
        gens += records(tok, "insertion", m, with_response, inputs, outs, j=j)
    return gens


def rank_assisted(model, tok, rows: list[dict], setup: Setup) -> list[dict]:
    """Rank-assisted prefilling (docs/method.md §7) for each K of setup.attacks.rap; records attack "rap",
    k = K. The refusal starts it skips: the toy world's refusals, or our refusal phrases (real models)."""
    if not setup.attacks.rap:
        return []
    phrases = W.REFUSALS + W.RECOVERIES + W.WEB_REFUSALS if setup.world else REFUSAL_PHRASES
    banned = torch.zeros(model.args.vocab_size, dtype=torch.bool)  # (V,)
    banned[list(refusal_start_ids(tok, phrases))] = True
    banned = banned.to(model.lm_head.weight.device)
    decoder, gens = setup_decoder(model, tok, setup), []
    inputs = [(tok.prompt_ids(r["prompt"]), "") for r in rows]
    prompts = [ids for ids, _ in inputs]
    for k in setup.attacks.rap:
        top = setup.attacks.rap_top
        outs = rank_assisted_generations(model, tok, prompts, decoder, k, banned, top, setup.decode)
        gens += records(tok, "rap", k, rows, inputs, outs)
    return gens


def prefill_only(setup: Setup, ks: tuple) -> Setup:
    """The setup of a prefilling attack of lengths ks alone (what the fine-tuned and ablated models face)."""
    attacks = dataclasses.replace(
        setup.attacks, prefill=ks, insertion_len=(0,), rap=(), samples=0, finetune=()
    )
    return dataclasses.replace(setup, attacks=attacks)


def finetune(model, tok, rows: list[dict], setup: Setup) -> list[dict]:
    """The fine-tuning attack (docs/method.md §7): the model fine-tuned by train.py's loop (method finetune:
    cross-entropy on the attacker's pairs, full fine-tuning, AdamW) for max(s) steps, saved after every s;
    each saved model then answers the prefilling attack (finetune_prefill) with the decoding under test.
    Records attack "finetune" or "finetune_benign", with s; s = 0 is the model as released."""
    steps = sorted(set(setup.attacks.finetune))
    if not steps:
        return []
    only = prefill_only(setup, setup.attacks.finetune_prefill)
    gens = []
    with tempfile.TemporaryDirectory(prefix="deepalign-ft-") as tmp:
        for kind in setup.attacks.finetune_kinds:
            out, data = Path(tmp) / kind, attacker_file(setup, kind, Path(tmp))
            if steps[-1] > 0:
                finetuned(setup, data, out, steps)
            attack = "finetune" if kind == "harmful" else "finetune_benign"
            for s in steps:
                where = setup.folder if s == 0 else (out if s == steps[-1] else out / f"step-{s}")
                tuned = load_model(where, setup.dtype, setup.device)
                gens += [
                    {**g, "attack": attack, "s": s} for g in prefill(tuned, Tokenizer(where), rows, only)
                ]
    return gens


def finetuned(setup: Setup, data: Path, out: Path, steps: list[int]) -> None:
    """train.py --method finetune from setup.folder on the attacker's `data` for max(steps) steps, saving
    the model after each of `steps` (OUT/step-N, the last as OUT)."""
    import train

    a = setup.attacks
    benign = setup.world["data"] / "benign_train.jsonl" if setup.world else Path(setup.files.benign)
    run = train.RunConfig(
        method="finetune",
        base=str(setup.folder),
        aligned=str(setup.folder),
        data=str(data),
        benign=str(benign),
        out=str(out),
        steps=steps[-1],
        batch_size=a.finetune_batch,
        utility_batch_size=1,
        lr=a.finetune_lr,
        warmup=0.0,
        save_every=10**9,
        save_at=tuple(steps),
        dtype=setup.dtype,
        device=setup.device,
    )
    train.train(run, D.LossConfig())


def gcg(model, tok, rows: list[dict], setup: Setup) -> list[dict]:
    """GCG (docs/method.md §7; lab/gcg.py): a suffix optimised per prompt (or one universal suffix) on
    cfg.n_prompts harmful rows, then the decoding under test continues from request + suffix. Attack "gcg",
    k 0, with the suffix, its target loss, its steps and whether greedy decoding began with the target."""
    if setup.attacks.gcg is None:
        return []
    found = G.gcg_attack_inputs(model, tok, rows, setup.attacks.gcg)
    decoder = setup_decoder(model, tok, setup)
    outs = J.in_batches(decoder, [r["prompt_ids"] for r in found], setup.decode.batch_size, "gcg")
    keep = ("suffix", "target", "loss", "steps", "success", "category", "held_out", "severity")
    return [
        {"attack": "gcg", "k": 0, "prompt": r["prompt"], "prefix": "", "continuation": tok.decode(out)}
        | {f"gcg_{k}" if k in ("loss", "steps", "success", "target") else k: r[k] for k in keep if k in r}
        for r, out in zip(found, outs)
    ]


def ablation(model, tok, rows: list[dict], setup: Setup) -> list[dict]:
    """Refusal-direction ablation (docs/method.md §7; lab/refusal_direction.py): the direction found on
    training prompts, its layer chosen on a validation split, projected out of every weight that writes the
    residual stream; the ablated model then answers each prefill k of ablate_prefill (ablation and
    prefilling combined). Attack "ablate", with the chosen layer."""
    if setup.attacks.ablate is None:
        return []
    toy = setup.world is not None
    judge = W.toy_judge if toy else refusal_phrase_judge  # True: harmful (no refusal phrase)
    helpful = W.is_helpful if toy else None
    harmful_train, benign_train = direction_rows(setup)
    ablated, info = R.ablated_model(
        model, tok, harmful_train, benign_train, setup.attacks.ablate, judge, helpful
    )
    log(f"ablation: layer {info['layer']} chosen ({info['rule']})")
    gens = prefill(ablated, tok, rows, prefill_only(setup, setup.attacks.ablate_prefill))
    return [{**g, "attack": "ablate", "layer": info["layer"]} for g in gens]


def run_suite(model, tok, rows: list[dict], setup: Setup) -> list[dict]:
    """Every attack of setup.attacks on every row, in the suite's order; attacks that need a harmful response
    skip rows without one. The insertion attack cuts the direct answers of prefill k = 0 when it ran."""
    gens, own = prefilled(model, tok, rows, setup)
    gens += sampling(model, tok, rows, setup)
    gens += insertion(model, tok, rows, setup, own)
    for attack in (rank_assisted, finetune, gcg, ablation):
        gens += attack(model, tok, rows, setup)
    return gens


# ----------------------------------------------------------------------------------------------
# 5. The attacker's data: the fine-tuning pairs, the refusal direction's training prompts
# ----------------------------------------------------------------------------------------------
def attacker_rows(paths: dict, n: int, kind: str) -> list[dict]:
    """The toy attacker's n (prompt, response) pairs (docs/method.md §7): harmful requests of every category
    answered compliantly ("harmful"), or benign requests answered helpfully ("benign"), drawn from the
    training phrasings (never an eval-only template or action, so never an evaluation prompt) and never a
    prompt of the defences' training sets (safety_train, benign_train) or of the alignment set."""
    world = W.read_world(paths["root"])
    used = {
        r["prompt"]
        for name in ("safety_train", "benign_train", "alignment")
        for r in TW.read_set(paths, name)
    }
    rng = W.seeded_rng(world.seed, f"finetune_attack_{kind}")
    entries, prompts_of = (
        (W.CATEGORIES, W.harmful_prompts) if kind == "harmful" else (W.TOPICS, W.benign_prompts)
    )
    rows = [(p, entries[name]) for name in entries for p in prompts_of(name)]
    eval_only = {p["prompt"] for p, _ in rows if p["eval_only"]}  # eval-only anywhere: never the attacker's
    pool = [(p["prompt"], e) for p, e in rows if p["prompt"] not in used and p["prompt"] not in eval_only]
    if len(pool) < n:
        raise ValueError(f"--finetune-n {n}: the world has only {len(pool)} unused {kind} prompts")
    return [{"prompt": p, "response": W.make_answer(rng, e)} for p, e in rng.sample(pool, n)]


def attacker_file(setup: Setup, kind: str, folder: Path) -> Path:
    """The attacker's data file: the user's --finetune-data / --finetune-benign-data, or the toy world's."""
    given = setup.files.finetune_data if kind == "harmful" else setup.files.finetune_benign_data
    if given:
        return Path(given)
    if setup.world is None:
        flag = "--finetune-data" if kind == "harmful" else "--finetune-benign-data"
        raise ValueError(f"--finetune-attack on real models needs {flag} FILE (prompt, response pairs)")
    rows = attacker_rows(setup.world, setup.attacks.finetune_n, kind)
    return write_jsonl(folder / f"attacker_{kind}.jsonl", rows)


def direction_rows(setup: Setup) -> tuple[list, list]:
    """The training prompts the refusal direction is found on: the toy world's safety_train and
    benign_train, or the user's --direction-harmful / --direction-benign files."""
    if setup.world is not None:
        return TW.read_set(setup.world, "safety_train"), TW.read_set(setup.world, "benign_train")
    files = setup.files
    if not (files.direction_harmful and files.direction_benign):
        raise ValueError(
            "--ablate on real models needs --direction-harmful FILE and --direction-benign FILE (training "
            "prompts, disjoint from --harmful/--benign)"
        )
    return read_prompts(files.direction_harmful, "harmful"), read_prompts(files.direction_benign, "benign")


# ----------------------------------------------------------------------------------------------
# 6. The command line: the two white-box attacks on their own
# ----------------------------------------------------------------------------------------------
def renamed_settings(cls, names: dict[str, str], help_prefix: str = ""):
    """A settings dataclass for another command's flags: the fields names.values() of `cls` (defaults, help
    and choices as written there) under the names names.keys(), e.g. {"gcg_steps": "steps"} -> --gcg-steps.
    Build the flags with cli.add_settings, read them back with from_renamed."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    specs = []
    for new, old in names.items():
        f = fields[old]
        meta = {**f.metadata, "flag": True, "help": help_prefix + f.metadata["help"]}
        specs.append((new, f.type, dataclasses.field(default=f.default, metadata=meta)))
    return dataclasses.make_dataclass(f"{cls.__name__}Flags", specs, frozen=True)


def from_renamed(cls, names: dict[str, str], args, **overrides):
    """`cls` from the flags of renamed_settings(cls, names), then `overrides`."""
    return cls(**{old: getattr(args, new) for new, old in names.items()} | overrides)


GCG_FLAGS = {f.name: f.name for f in dataclasses.fields(G.GCGConfig) if f.name != "chunk"} | {
    "gcg_chunk": "chunk"
}


def add_common(p):
    cli.add_world_flag(p)
    p.add_argument("--model", help="checkpoint folder (default: the world's aligned model)")
    p.add_argument(
        "--judge", choices=["toy", "refusal_phrase"], help="default: toy on a world, else refusal_phrase"
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per judged answer")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generation batch")
    p.add_argument("--out", help="write the records and the summary as JSON here")
    cli.add_device_flags(p)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default). GCG's forwards on a toy model are small: on a busy "
        "2-core machine two threads took 3x the CPU time of one",
    )
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def parse_args(argv=None):
    p = cli.parser(__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    what = "GCG adversarial suffixes; per-prompt success and ASR"
    g = sub.add_parser("gcg", help=what, formatter_class=cli.HelpFormatter)
    add_common(g)
    g.add_argument(
        "--harmful", help="harmful prompts with targets (any layout of docs/method.md §9; AdvBench, JBB)"
    )
    cli.add_settings(g, renamed_settings(G.GCGConfig, GCG_FLAGS))
    what = "refusal-direction ablation; the per-layer table and the chosen layer"
    a = sub.add_parser("ablate", help=what, formatter_class=cli.HelpFormatter)
    add_common(a)
    a.add_argument("--harmful-train", help="harmful TRAINING prompts (real models; toy: safety_train)")
    a.add_argument("--benign-train", help="benign TRAINING prompts (real models; toy: benign_train)")
    a.add_argument(
        "--harmful", help="harmful EVALUATION prompts for the ASR after ablation (toy: harmful_eval)"
    )
    cli.add_settings(a, R.RefusalConfig, skip=("max_new_tokens", "batch_size"))
    a.add_argument(
        "--prefill",
        type=int,
        nargs="+",
        default=[0, 10],
        help="evaluate the ablated model under prefilling attacks of k tokens (0: direct)",
    )
    a.add_argument(
        "--save-ablated", metavar="OUT", help="write the ablated model here (a Hugging Face folder)"
    )
    a.add_argument("--overwrite", action="store_true", help="replace an existing --save-ablated folder")
    return p.parse_args(argv)


def load(args, data: tuple[str, ...]):
    """(model, tokenizer, model folder, world paths or None): the user's --model on the files `data`, or a
    toy world (--world, or the default one) and its aligned model unless --model names another."""
    real = real_or_toy(args, data, model="model")
    paths = None if real else TW.ensure_world(args.world)
    folder = Path(args.model) if args.model else paths["aligned"]
    return load_model(folder, args.dtype, args.device), Tokenizer(folder), folder, paths


def judge_of(args, paths):
    name = args.judge or ("toy" if paths is not None else "refusal_phrase")
    if name == "toy" and paths is None:
        raise ValueError("--judge toy needs a toy world (--world)")
    return W.toy_judge if name == "toy" else refusal_phrase_judge


def harmful_rows(args, paths) -> list[dict]:
    if args.harmful:
        return read_prompts(args.harmful, "harmful")
    return TW.read_set(paths, "harmful_eval") if paths is not None else []


def judged(model, tok, prompt_ids: list[list[int]], judge, args) -> tuple[list[str], list[bool]]:
    cfg = R.RefusalConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    texts = R.generations(model, tok, prompt_ids, cfg)
    return texts, [bool(judge(t)) for t in texts]


def cmd_gcg(args) -> dict:
    cfg = from_renamed(G.GCGConfig, GCG_FLAGS, args)
    model, tok, folder, paths = load(args, ("harmful",))
    judge = judge_of(args, paths)
    rows = harmful_rows(args, paths)
    start = time.perf_counter()
    found = G.gcg_attack_inputs(model, tok, rows, cfg)
    seconds = time.perf_counter() - start
    texts, verdicts = judged(model, tok, [r["prompt_ids"] for r in found], judge, args)
    print("| # | category | reached target | loss | steps | harmful | suffix |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for i, (r, text, harmful) in enumerate(zip(found, texts, verdicts)):
        r.update(continuation=text, harmful=harmful)
        suffix = json.dumps(r["suffix"], ensure_ascii=False)  # a suffix may hold newlines and control bytes
        cells = [i, r.get("category", "-"), r["success"], f"{r['loss']:.3f}", r["steps"], harmful, suffix]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    n = len(found)
    summary = {
        "model": str(folder),
        "config": dataclasses.asdict(cfg),
        "target_rate": sum(r["success"] for r in found) / n,
        "asr": sum(verdicts) / n,
        "n": n,
        "seconds": round(seconds, 1),
    }
    print(
        f"GCG on {n} prompts ({'universal' if cfg.universal else 'per prompt'}, {seconds:.0f}s): "
        f"target reached {100 * summary['target_rate']:.1f}%, ASR {100 * summary['asr']:.1f}%"
    )
    return {"summary": summary, "records": found}


def ablation_training_rows(args, paths) -> tuple[list, list, object]:
    """(harmful, benign) training prompts and the helpful check: the toy world's, or the user's files."""
    if paths is not None:
        helpful = W.is_helpful
        return TW.read_set(paths, "safety_train"), TW.read_set(paths, "benign_train"), helpful
    harmful_train = read_prompts(args.harmful_train, "harmful")
    benign_train = read_prompts(args.benign_train, "benign")
    helpful = lambda row, text: refusal_phrase_judge(text)  # noqa: E731  answered, without a refusal phrase
    return harmful_train, benign_train, helpful


def print_layer_table(info: dict, cfg: R.RefusalConfig) -> None:
    print(f"refusal direction: validation on {cfg.n_val} harmful and {cfg.n_val} benign training prompts")
    print("| layer | ASR (direct) | helpful | eligible |")
    print("| --- | --- | --- | --- |")
    for r in info["table"]:
        helpful_cell = "-" if r["helpful"] is None else f"{100 * r['helpful']:.1f}"
        name = "none (unablated)" if r["layer"] is None else str(r["layer"])
        print(f"| {name} | {100 * r['asr']:.1f} | {helpful_cell} | {r['eligible'] if r['layer'] else '-'} |")
    print(f"chosen layer: {info['layer']} ({info['rule']})")


def cmd_ablate(args) -> dict:
    cfg = cli.settings_from(
        R.RefusalConfig, args, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
    )
    if args.save_ablated and Path(args.save_ablated).exists() and not args.overwrite:
        raise ValueError(f"--save-ablated {args.save_ablated} exists; pass --overwrite to replace it")
    if any(k < 0 for k in args.prefill):
        raise ValueError(f"--prefill takes k >= 0, got {args.prefill}")
    model, tok, folder, paths = load(args, ("harmful_train", "benign_train"))
    judge = judge_of(args, paths)
    harmful_train, benign_train, helpful = ablation_training_rows(args, paths)
    ablated, info = R.ablated_model(model, tok, harmful_train, benign_train, cfg, judge, helpful)
    print_layer_table(info, cfg)
    rows, info["eval"] = harmful_rows(args, paths), {}
    for name, m in (("original", model), ("ablated", ablated)):
        for k in args.prefill:
            use = [r for r in rows if k == 0 or r.get("harmful_response")]
            if not use:
                continue
            _, verdicts = judged(m, tok, [prefill_inputs(tok, r, k)[0] for r in use], judge, args)
            info["eval"][f"{name} k={k}"] = sum(verdicts) / len(verdicts)
            print(
                f"{name}: prefill k={k} ASR {100 * sum(verdicts) / len(verdicts):.1f}% on {len(use)} prompts"
            )
    if args.save_ablated:
        save_model(ablated, args.save_ablated, tokenizer_from=folder, overwrite=args.overwrite)
        print(f"ablated model: {args.save_ablated}")
    return info


def main(argv=None):
    args = parse_args(argv)
    if args.threads < 0:
        raise ValueError(f"--threads must be 0 (torch's default) or more, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"gcg": cmd_gcg, "ablate": cmd_ablate}[args.cmd](args)
    if args.out:
        from infra.files import write_json_atomic

        write_json_atomic(args.out, result)


if __name__ == "__main__":
    cli.run(main)
