"""Build a toy world: its data sets, its tokenizer, a base model pretrained on its corpus, and the aligned
model made from the base by its alignment recipe. Every command defaults to the world of seed 0.

    python data/toyworld.py                                      # seed 0, held out: arson, stalking
    python data/toyworld.py --seed 1
    python data/toyworld.py --seed 100 --held-out fraud theft --out /tmp/world-100

A world folder holds data/*.jsonl, data/tokenizer/, base/, aligned/ (Hugging Face folders), world.json (the
seed and held-out categories) and build.json (the settings, the losses, the time, the recorded gradient
signal). A build is deterministic for its seed on one machine and thread count (it fixes torch's threads to
BuildConfig.threads). Other commands build the worlds they need on first use and rebuild one whose inputs
(this file, data/world.py, the settings) changed. docs/toyworld.md explains the world and its alignment
recipe.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the repository's modules importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import deepalign as D  # noqa: E402
from data import world as W  # noqa: E402
from infra import cli  # noqa: E402
from infra.files import read_jsonl, write_json_atomic, write_jsonl, write_text_atomic  # noqa: E402
from infra.optim import get_lr  # noqa: E402
from infra.progress import progress_bar  # noqa: E402

WORLDS = ROOT / "data" / "worlds"  # git-ignored
REPORTING_SEEDS = (0, 1, 2)  # the README's numbers: mean and spread over these worlds
DEVELOPMENT_SEEDS_FROM = 100  # worlds 100 and up: where defaults are chosen, never reported


@dataclass(frozen=True)
class BuildConfig:
    """Everything a build depends on besides the World and the source of data/world.py and this file."""

    n_pretrain: int = 15000  # pretraining documents (each is read about once)
    n_alignment: int = 4000  # alignment SFT examples
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    intermediate_size: int = 352
    vocab_multiple: int = 64  # the embedding is padded to a multiple of this, as real checkpoints pad theirs
    seq_len: int = 256  # pretraining rows: the shuffled documents as one stream, cut into rows of this length
    pretrain_rows: int = 8  # rows per pretraining step
    pretrain_lr: float = 3e-3
    align_steps: int = 150
    align_batch: int = 32
    align_lr: float = 1e-3
    threads: int = 2  # torch threads during the build (fixed, so that a build is reproducible)


def default_world_dir(seed: int = 0, held_out=W.DEFAULT_HELD_OUT) -> Path:
    """data/worlds/seed-N, or data/worlds/seed-N-heldout-A-B for other held-out categories."""
    held = W.World(seed, tuple(held_out)).held_out
    suffix = "" if held == W.DEFAULT_HELD_OUT else "-heldout-" + "-".join(held)
    return WORLDS / f"seed-{seed}{suffix}"


def fingerprint(world: W.World, cfg: BuildConfig) -> str:
    sources = [(ROOT / "data" / "world.py").read_text(), Path(__file__).read_text()]
    settings = json.dumps({"world": world.to_json(), "build": asdict(cfg)}, sort_keys=True)
    return hashlib.sha256("".join(sources + [settings]).encode()).hexdigest()[:16]


def world_paths(folder) -> dict:
    folder = Path(folder)
    return {
        "root": folder,
        "data": folder / "data",
        "tokenizer": folder / "data" / "tokenizer",
        "base": folder / "base",
        "aligned": folder / "aligned",
    }


# ==============================================================================================
# =
# Data and tokenizer
# ==============================================================================================
# =
def write_data(folder, world: W.World, cfg: BuildConfig, vocab_size: int = 2000) -> dict:
    """Write the world's data sets (JSONL) and tokenizer into `folder`; returns {name: rows}."""
    folder = Path(folder)
    sets = W.make_data_sets(world, cfg.n_pretrain, cfg.n_alignment)
    texts = W.tokenizer_texts(sets)
    tok = W.train_tokenizer(texts, vocab_size)
    eval_texts = [r[k] for r in sets["harmful_eval"] for k in ("prompt", "harmful_response")]
    split = W.split_pieces(tok, eval_texts + texts)
    if split:
        raise ValueError(f"vocab_size={vocab_size} is too small: words split into pieces: {split[:10]}")
    for name, rows in sets.items():
        write_jsonl(folder / f"{name}.jsonl", rows)
    for name, text in W.tokenizer_files(tok).items():
        write_text_atomic(folder / "tokenizer" / name, text)
    return sets


# ==============================================================================================
# =
# Training examples
# ==============================================================================================
# =
def packed_batches(tok, docs: list, seq_len: int, rows: int, seed: int) -> list:
    """Pretraining batches, as GPT pretraining makes them: the documents in a seeded random order, each as its
    ids + <|endoftext|>, concatenated into one stream and cut into rows of seq_len + 1 tokens (inputs and
    shifted targets), `rows` rows a batch. Every batch mixes every kind of document. (Batches of documents
    sorted by length would put all the short ones, every web refusal among them, into a few batches of their
    own; the base then barely learns when to refuse.) Returns [ids (rows, seq_len + 1)]; the last partial row
    is dropped."""
    gen = torch.Generator().manual_seed(seed)
    end = tok.tok.token_to_id("<|endoftext|>")
    encoded = [e.ids + [end] for e in tok.tok.encode_batch(docs, add_special_tokens=False)]
    order = torch.randperm(len(encoded), generator=gen).tolist()
    stream = torch.tensor([t for i in order for t in encoded[i]])  # (N,)
    n_rows = len(stream) // (seq_len + 1)
    table = stream[: n_rows * (seq_len + 1)].view(n_rows, seq_len + 1)  # (R, seq_len + 1)
    return list(table.split(rows))


def alignment_example(tok, row: dict):
    """(ids, loss weight over targets, is_refusal): prompt, then the prefix (a late refusal's harmful start,
    no loss), then the response and the end of the turn (loss). A late refusal's recovery follows its prefix
    after one space, tokenized apart, as a recovery after a prefilled prefix is (train.py does the same)."""
    head = tok.prompt_ids(row["prompt"], prefill=row["prefix"])
    target = tok.encode((" " if row["prefix"] else "") + row["response"]) + [tok.end_of_turn_id]
    ids = head + target
    weight = [0.0] * (len(head) - 1) + [1.0] * len(target)  # weight[i] is for the target ids[i + 1]
    return ids, weight, row["kind"] != "benign"


# ==============================================================================================
# =
# Training
# ==============================================================================================
# =
def masked_lm_loss(model, ids, weight):
    """Mean cross-entropy of the targets ids[:, 1:] where weight is 1. ids (B, T + 1), weight (B, T).
    Returns the loss and the logits (B, T, V)."""
    logits = model(ids[:, :-1])  # (B, T, V)
    nll = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none"
    )  # (B * T,)
    w = weight.flatten()
    return (nll * w).sum() / w.sum(), logits


def pretrain(model, batches: list, cfg: BuildConfig) -> list:
    """AdamW over the packed batches, once each (the corpus is read once). Returns the step losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    model.train()
    for step, ids in enumerate(progress_bar(batches, "pretrain base")):
        for group in opt.param_groups:
            group["lr"] = get_lr(step, len(batches), cfg.pretrain_lr)
        loss, _ = masked_lm_loss(model, ids, torch.ones(ids.shape[0], ids.shape[1] - 1))
        losses.append(optimizer_step(model, opt, loss))
    model.eval()
    return losses


def optimizer_step(model, opt, loss) -> float:
    """One AdamW step on `loss`, the gradient's norm clipped at 1; returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def pad_examples(examples: list, pad_id: int):
    """Right-padded ids (B, T + 1), loss weight (B, T) and response positions (B, T): the position of each
    target counted from the first token of the assistant's answer."""
    ids = D.right_pad([seq for seq, _, _ in examples], pad_id, "cpu")  # (B, T + 1)
    weight = torch.zeros(ids.shape[0], ids.shape[1] - 1)  # (B, T)
    for i, (_, w, _) in enumerate(examples):
        weight[i, : len(w)] = torch.tensor(w)
    return ids, weight


def align(model, tok, rows: list, cfg: BuildConfig, seed: int):
    """Alignment SFT: AdamW on the response tokens of random batches of the alignment set. Returns the step
    losses and, per response position t (counted from the first answer token), the mean gradient signal
    ||softmax(l_t) - onehot(y_t)|| of the refusal and recovery tokens over the whole run: the per-position
    signal the paper says decays (docs/method.md, grad_t)."""
    gen = torch.Generator().manual_seed(seed)
    examples = [alignment_example(tok, r) for r in rows]
    starts = [len(tok.prompt_ids(r["prompt"])) for r in rows]  # where each answer begins
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.align_lr, betas=(0.9, 0.95), weight_decay=0.1)
    losses, grad_sum, grad_n = (
        [],
        torch.zeros(512, dtype=torch.float64),
        torch.zeros(512, dtype=torch.float64),
    )
    model.train()
    for step in progress_bar(range(cfg.align_steps), "align (SFT)"):
        for group in opt.param_groups:
            group["lr"] = get_lr(step, cfg.align_steps, cfg.align_lr)
        batch = torch.randint(len(examples), (cfg.align_batch,), generator=gen).tolist()
        ids, weight = pad_examples([examples[i] for i in batch], tok.pad_id)
        loss, logits = masked_lm_loss(model, ids, weight)
        with torch.no_grad():  # the gradient signal at each refusal/recovery target, by response position
            record = torch.tensor([examples[i][2] for i in batch])[:, None] & (weight > 0)  # (B, T)
            p = logits.detach().float().softmax(-1)  # (B, T, V)
            g = D.logit_grad_norm(p, ids[:, 1:])  # (B, T) ||softmax(l_t) - onehot(y_t)||
            # the answer's first token is target first-1
            first = torch.tensor([starts[i] for i in batch])[:, None]
            t = torch.arange(weight.shape[1])[None, :] + 1 - first  # (B, T) response position of each target
            t = t.clamp(0, len(grad_n) - 1)[record]
            grad_sum.index_add_(0, t, g[record].double())
            grad_n.index_add_(0, t, torch.ones_like(t, dtype=torch.float64))
        losses.append(optimizer_step(model, opt, loss))
    model.eval()
    last = int(grad_n.nonzero().max()) + 1 if grad_n.any() else 0
    return losses, (grad_sum[:last] / grad_n[:last].clamp(min=1)).tolist()


def model_args(tok, cfg: BuildConfig):
    """A Llama-architecture config (grouped-query attention, untied head, as Llama 3.1) sized for a CPU; the
    embedding is padded to a multiple of cfg.vocab_multiple rows (the padded rows are never trained)."""
    from model import ModelArgs

    m = cfg.vocab_multiple
    return ModelArgs(
        model_type="llama",
        dim=cfg.dim,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        head_dim=cfg.dim // cfg.n_heads,
        intermediate_size=cfg.intermediate_size,
        vocab_size=-(-tok.vocab_size // m) * m,
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=1024,
        eos_token_id=tok.eos_ids[0],
        bos_token_id=None,
    )


def build_world(folder, world: W.World = W.World(), cfg: BuildConfig = BuildConfig()) -> dict:
    """Build one world into `folder` (replaced if it exists): data, tokenizer, base, aligned, world.json,
    build.json. Returns its paths (world_paths)."""
    from infra.hf import save_model
    from infra.tokenizer import Tokenizer
    from model import Transformer

    paths = world_paths(folder)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        (paths["root"] / "build.json").unlink(missing_ok=True)  # a half-built world is never taken as built
        sets = write_data(paths["data"], world, cfg)
        tok = Tokenizer(paths["tokenizer"])
        torch.manual_seed(world.seed)
        model = Transformer(model_args(tok, cfg))
        batches = packed_batches(
            tok, [r["text"] for r in sets["pretrain"]], cfg.seq_len, cfg.pretrain_rows, world.seed
        )
        base_losses = pretrain(model, batches, cfg)
        save_model(model, paths["base"], tokenizer_from=paths["tokenizer"], overwrite=True)
        align_losses, grad_signal = align(model, tok, sets["alignment"], cfg, world.seed + 1)
        save_model(model, paths["aligned"], tokenizer_from=paths["tokenizer"], overwrite=True)
    finally:
        torch.set_num_threads(threads)
    write_json_atomic(paths["root"] / "world.json", world.to_json())
    info = {
        "fingerprint": fingerprint(world, cfg),
        "world": world.to_json(),
        "config": asdict(cfg),
        "seconds": round(time.perf_counter() - start, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretrain_tokens": sum(b.numel() for b in batches),
        "pretrain_steps": len(base_losses),
        "base_final_loss": sum(base_losses[-20:]) / 20,
        "align_final_loss": sum(align_losses[-20:]) / 20,
        "align_grad_signal": [round(g, 4) for g in grad_signal],
    }
    write_json_atomic(paths["root"] / "build.json", info)
    return paths


def recorded_config(folder) -> BuildConfig | None:
    """The BuildConfig a world folder was built with (its build.json), or None if it has no finished build."""
    built = Path(folder) / "build.json"
    if not built.exists():
        return None
    return BuildConfig(**json.loads(built.read_text())["config"])


def is_built(folder, world: W.World, cfg: BuildConfig = BuildConfig()) -> bool:
    """True if `folder` holds a finished build of `world` with `cfg` from the current sources."""
    built = Path(folder) / "build.json"
    return built.exists() and json.loads(built.read_text()).get("fingerprint") == fingerprint(world, cfg)


def ensure_world(folder=None, seed: int = 0, held_out=W.DEFAULT_HELD_OUT) -> dict:
    """The paths of a built world. With `folder`: that world, which must exist; world.json and build.json
    say which world it is and how it was built, and it is rebuilt (with those settings) only if the sources
    changed since. Without: the world of `seed` and `held_out` in its default folder, built first if missing
    or out of date."""
    cfg = BuildConfig()
    if folder is not None:
        folder = Path(folder)
        if not (folder / "world.json").exists():
            raise FileNotFoundError(
                f"--world {folder}: not a built world (no world.json); build one with "
                f"`python data/toyworld.py --out {folder}`"
            )
        world = W.read_world(folder)
        cfg = recorded_config(folder) or cfg
    else:
        world = W.World(seed, tuple(held_out))
        folder = default_world_dir(world.seed, world.held_out)
    if not is_built(folder, world, cfg):
        print(
            f"building the toy world {folder} (about 3 minutes on 2 CPU cores; done once) ...",
            file=sys.stderr,
        )
        build_world(folder, world, cfg)
    return world_paths(folder)


def read_set(paths: dict, name: str) -> list:
    """One data set of a built world, checked against its schema."""
    return read_jsonl(paths["data"] / f"{name}.jsonl", W.SCHEMAS[name])


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the world's seed; 0, 1, 2 are the reporting seeds, 100 and up the development seeds",
    )
    p.add_argument(
        "--held-out",
        nargs="+",
        default=list(W.DEFAULT_HELD_OUT),
        metavar="CAT",
        help=f"categories kept out of every safety set; of {', '.join(W.CATEGORIES)}",
    )
    p.add_argument("--out", help="the world folder (default: data/worlds/seed-N[-heldout-...])")
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")
    p.add_argument("--data-only", action="store_true", help="write the data sets and tokenizer only")
    args = p.parse_args(argv)
    world = W.World(args.seed, tuple(args.held_out))
    folder = Path(args.out) if args.out else default_world_dir(world.seed, world.held_out)
    start = time.perf_counter()
    if args.data_only:
        write_data(folder / "data", world, BuildConfig())
        write_json_atomic(folder / "world.json", world.to_json())
    elif args.force or not is_built(folder, world):
        build_world(folder, world)
    else:
        print(f"{folder} is built and up to date (--force rebuilds it)", file=sys.stderr)
    print(f"done in {time.perf_counter() - start:.1f}s: {folder}")


if __name__ == "__main__":
    cli.run(main)
