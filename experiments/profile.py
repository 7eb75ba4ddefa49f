"""The position profile of docs/method.md §3 as a command: per response position, over a data set of harmful
pairs, the KL between the aligned and the base model, the aligned model's mass on base-favored tokens, and the
gradient signal of refusal training (deepalign.position_profile computes them; this file reads the models and
data, prints, plots and writes the JSON).

    python -m experiments.profile profile                      # the seed-0 world's base and aligned
    python -m experiments.profile profile --seeds 0 1 2 --out results/profile_aligned.json
    python -m experiments.profile tokens --example 3            # one pair, position by position (§2)
    python -m experiments.profile profile --base DIR --aligned DIR --data harmful.csv
    python -m experiments.profile plot a.json b.json --out both.png
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch

import deepalign as D
from infra import cli

PROFILE_COLUMNS = ("t", "n", "kl", "bf_mass_A", "bf_mass_B", "bf_count", "bf_hit", "harmful_lp_A", "grad")


def profile_table(rows: list[dict]) -> str:
    lines = ["  ".join(f"{c:>9s}" for c in PROFILE_COLUMNS)]
    for r in rows:
        cells = []
        for c in PROFILE_COLUMNS:
            if c in ("t", "n"):
                cells.append(f"{r[c]:9d}")
            elif r.get(c) is None:
                cells.append(f"{'-':>9s}")
            else:
                cells.append(f"{r[c]:9.4f}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def plot_profile(profiles: dict, path, title: str = "") -> bool:
    """KL(p_A || p_B), bf_mass_A, the harmful likelihood and the refusal-SFT gradient signal against response
    position, one line per profile ({label: positions rows}). False (and a hint) when matplotlib, an optional
    dependency, is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "matplotlib is not installed: `pip install matplotlib` for the plot (the table and JSON are "
            "complete)",
            file=sys.stderr,
        )
        return False
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    series = [
        ("kl", "KL(p_A || p_B)"),
        ("bf_mass_A", "bf_mass_A (incompleteness)"),
        ("harmful_lp_A", "log p_A(h_t | x, h_<t) (harmful likelihood)"),
        ("grad", "refusal-SFT gradient signal"),
    ]
    for ax, (key, label) in zip(axes, series):
        for name, rows in profiles.items():
            points = [(r["t"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker=".", label=name)
        ax.set_title(label)
        ax.set_xlabel("response position t")
        ax.grid(alpha=0.3)
    if len(profiles) > 1:
        axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)
    return True


def load_pair(args):
    """(base, aligned, aligned tokenizer, base tokenizer, harmful rows, refusal) for the command line: the
    given folders and data file, or a toy world's (--world, default the seed-0 world)."""
    from data import toyworld as TW
    from data import world as W
    from infra import formats
    from infra.cli import log
    from infra.files import spread
    from infra.hf import load_model
    from infra.tokenizer import Tokenizer

    real = args.base or args.aligned or args.data
    if real and not (args.base and args.aligned and args.data):
        missing = [
            flag
            for flag, value in (("--base", args.base), ("--aligned", args.aligned), ("--data", args.data))
            if not value
        ]
        raise ValueError(
            f"{', '.join(missing)} missing: with real models pass --base DIR --aligned DIR "
            "--data FILE (harmful prompts with responses); leave all three out for the toy "
            "world"
        )
    if real:
        base_dir, aligned_dir = Path(args.base), Path(args.aligned)
        rows = formats.read_prompts(args.data, "harmful")
        refusal = args.refusal or "I'm sorry, but I can't help with that."
    else:
        paths = TW.ensure_world(args.world)
        base_dir, aligned_dir = paths["base"], paths["aligned"]
        rows = TW.read_set(paths, "harmful_eval")
        refusal = args.refusal or W.REFUSALS[0]
    if base_dir.resolve() == aligned_dir.resolve():
        log(f"warning: --base and --aligned are the same folder ({base_dir}): every profile value is 0")
    rows = spread([r for r in rows if r.get("harmful_response")], args.limit)
    if not rows:
        raise ValueError(
            f"{args.data}: no row has a harmful response; the profile needs (prompt, response) pairs"
        )
    tok, base_tok = Tokenizer(aligned_dir), Tokenizer(base_dir)
    D.check_same_tokenizer(tok, base_tok)
    base, aligned = (
        load_model(base_dir, args.dtype, args.device),
        load_model(aligned_dir, args.dtype, args.device),
    )
    return base, aligned, tok, base_tok, rows, refusal, (str(base_dir), str(aligned_dir))


def profile_config(args) -> D.ProfileConfig:
    return D.ProfileConfig(
        tau=args.tau,
        top_k=args.top_k,
        rho=args.rho,
        max_response_tokens=args.max_response_tokens,
        batch_size=args.batch_size,
        base_format=getattr(args, "base_format", "chat"),
    )


PROFILE_SUMMARY = (  # (column, key, first position, last position or None: to the end)
    ("KL t=0", "kl", 0, 0),
    ("KL t=1-4", "kl", 1, 4),
    ("KL t>=5", "kl", 5, None),
    ("bf_mass_A t>=5", "bf_mass_A", 5, None),
    ("bf_hit t>=5", "bf_hit", 5, None),
    ("harmful log p_A t>=5", "harmful_lp_A", 5, None),
)


def profile_summary(positions: list[dict]) -> dict:
    """The position profile in a few numbers: each PROFILE_SUMMARY column's mean over its positions, weighted
    by the contexts that reach each position, and the ratio of KL at t = 0 to the mean KL over t >= 5."""
    summary = {}
    for column, key, first, last in PROFILE_SUMMARY:
        rows = [r for r in positions if r["t"] >= first and (last is None or r["t"] <= last) and key in r]
        if not rows:  # a profile written before the key existed
            continue
        summary[column] = sum(r[key] * r["n"] for r in rows) / sum(r["n"] for r in rows)
    summary["KL ratio"] = summary["KL t=0"] / summary["KL t>=5"]
    return summary


def profile_summary_table(per_model: dict, means_only: bool = False) -> str:
    """Markdown: one row per (model, seed) and, with several seeds, a mean ± sd row per model (with
    means_only, that row alone). per_model {name: {seed: summary}}."""
    import statistics

    columns = [c for c, *_ in PROFILE_SUMMARY] + ["KL ratio"]
    columns = [
        c for c in columns if all(c in s for per_seed in per_model.values() for s in per_seed.values())
    ]
    lines = ["| model | seed | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 2)]
    for name, per_seed in per_model.items():
        for seed, summary in per_seed.items():
            if means_only and len(per_seed) > 1:
                break
            lines.append(f"| {name} | {seed} | " + " | ".join(f"{summary[c]:.3f}" for c in columns) + " |")
        if len(per_seed) > 1:
            cells = []
            for c in columns:
                values = [summary[c] for summary in per_seed.values()]
                cells.append(f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}")
            lines.append(f"| {name} | mean ± sd | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cmd_profile_seeds(args):
    """The profile of every --models entry on the worlds of --seeds, and its summary (mean ± sd over
    seeds)."""
    from data import toyworld as TW
    from data import world as W
    from infra.cli import log
    from infra.files import spread, write_json_atomic
    from infra.hf import load_model
    from infra.tokenizer import Tokenizer

    cfg = profile_config(args)
    specs = [spec.partition("=") for spec in args.models]
    profiles, per_model = {}, {}
    for seed in args.seeds:
        paths = TW.ensure_world(seed=seed)
        tok = Tokenizer(paths["aligned"])
        rows = spread(TW.read_set(paths, "harmful_eval"), args.limit)
        base = load_model(paths["base"], args.dtype, args.device)
        refusal = args.refusal or W.REFUSALS[0]
        grads = D.gradient_signal(base, tok, rows, refusal, args.max_response_tokens, args.batch_size)
        for name, _, template in specs:
            folder = Path(template.format(world=paths["root"], seed=seed))
            D.check_same_tokenizer(Tokenizer(folder), tok)
            log(f"profile of {name} ({folder}) against the base of world {seed}")
            prof = D.position_profile(base, load_model(folder, args.dtype, args.device), tok, rows, cfg)
            for row in prof["positions"]:
                row["grad"] = grads[row["t"]] if row["t"] < len(grads) else None
            prof["settings"].update(base=str(paths["base"]), aligned=str(folder), refusal=refusal, seed=seed)
            profiles.setdefault(name, {})[str(seed)] = prof
            per_model.setdefault(name, {})[str(seed)] = profile_summary(prof["positions"])
    print(profile_summary_table(per_model))
    if args.out:
        write_json_atomic(
            args.out,
            {
                "settings": {"seeds": args.seeds, "models": args.models, **asdict(cfg)},
                "summary": per_model,
                "profiles": profiles,
            },
        )
    if args.plot:
        curves = {
            name: mean_positions([p["positions"] for p in per_seed.values()])
            for name, per_seed in profiles.items()
        }
        seeds = ", ".join(str(seed) for seed in args.seeds)
        if plot_profile(curves, args.plot, f"position profiles against the base (mean over worlds {seeds})"):
            print(f"plot: {args.plot}", file=sys.stderr)


def mean_positions(profiles: list[list[dict]]) -> list[dict]:
    """The mean over profiles (one per world) of kl, bf_mass_A and grad at each response position t, over
    the profiles that reach t."""
    by_t = {}
    for positions in profiles:
        for row in positions:
            by_t.setdefault(row["t"], []).append(row)
    means = []
    for t, rows in sorted(by_t.items()):
        mean = {"t": t}
        for key in ("kl", "bf_mass_A", "grad"):
            values = [r[key] for r in rows if r.get(key) is not None]
            mean[key] = sum(values) / len(values) if values else None
        means.append(mean)
    return means


def cmd_profile(args):
    from infra.files import write_json_atomic

    if args.seeds:
        return cmd_profile_seeds(args)
    base, aligned, tok, base_tok, rows, refusal, folders = load_pair(args)
    prof = D.position_profile(base, aligned, tok, rows, profile_config(args), base_tok)
    grad_model = {"base": base, "aligned": aligned}[args.grad_model]
    grads = D.gradient_signal(grad_model, tok, rows, refusal, args.max_response_tokens, args.batch_size)
    for row in prof["positions"]:
        row["grad"] = grads[row["t"]] if row["t"] < len(grads) else None
    prof["settings"].update(base=folders[0], aligned=folders[1], refusal=refusal, grad_model=args.grad_model)
    print(profile_table(prof["positions"]))
    formats_read = "their own formats"
    if args.base_format == "chat":
        formats_read = "the identical token sequence (the aligned chat format)"
    print(
        f"{len(rows)} pairs ({prof['settings']['skipped_pairs']} skipped); both models read {formats_read}",
        file=sys.stderr,
    )
    if args.out:
        write_json_atomic(args.out, prof)
    plot = args.plot or (Path(args.out).with_suffix(".png") if args.out else None)
    if plot and plot_profile({"A": prof["positions"]}, plot, f"A = {folders[1]}, B = {folders[0]}"):
        print(f"plot: {plot}", file=sys.stderr)


@torch.no_grad()
def cmd_tokens(args):
    """For one harmful example: at each response position, the actual token and the top base-favored
    tokens."""
    base, aligned, tok, _, rows, _, _ = load_pair(args)
    if not 0 <= args.example < len(rows):
        raise ValueError(f"--example {args.example}: the data has {len(rows)} pairs (0..{len(rows) - 1})")
    row = rows[args.example]
    head, resp = D.response_split(
        tok, row["prompt"], row["harmful_response"], max_tokens=args.max_response_tokens
    )
    lp_A = D.response_log_probs(aligned, [head + resp], [len(head)], [len(resp)], tok.pad_id)  # (n, V)
    lp_B = D.response_log_probs(base, [head + resp], [len(head)], [len(resp)], tok.pad_id)  # (n, V)
    valid = tok.real_token_mask(aligned.args.vocab_size).to(lp_A.device)
    bf = D.base_favored_mask(lp_A, lp_B, args.tau, args.top_k, args.rho, valid)  # (n, V)
    print(f"prompt: {row['prompt']}")
    print("  t  actual token        p_A    p_B   |  top base-favored tokens (p_A -> p_B)")
    for t, y in enumerate(resp):
        ids = bf[t].nonzero().squeeze(-1)
        ids = ids[lp_B[t, ids].argsort(descending=True)][: args.show]
        favored = ", ".join(
            f"{tok.decode([i])!r} {lp_A[t, i].exp():.2f}->{lp_B[t, i].exp():.2f}" for i in ids.tolist()
        )
        actual = repr(tok.decode([y]))
        print(f"{t:3d}  {actual:16s} {lp_A[t, y].exp():6.3f} {lp_B[t, y].exp():6.3f}  |  {favored or '-'}")


def cmd_plot(args):
    """Overlay saved profiles (e.g. before and after training) in one figure."""
    profiles = {}
    for f in args.profiles:
        profiles[Path(f).stem.removeprefix("profile_")] = json.loads(Path(f).read_text())["positions"]
    if plot_profile(profiles, args.out, args.title):
        print(f"plot: {args.out}", file=sys.stderr)


def parse_args(argv=None):
    p = cli.parser(__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    overlay = sub.add_parser(
        "plot",
        help="overlay profile JSON files written by `profile --out`",
        formatter_class=cli.HelpFormatter,
    )
    overlay.add_argument("profiles", nargs="+", help="profile JSON files")
    overlay.add_argument("--out", required=True, help="PNG path")
    overlay.add_argument("--title", default="", help="figure title")
    for name, text in (
        ("profile", "the position profile (§3) over harmful pairs"),
        ("tokens", "one pair, position by position: the base-favored tokens (§2)"),
    ):
        s = sub.add_parser(name, help=text, formatter_class=cli.HelpFormatter)
        cli.add_world_flag(s)
        s.add_argument("--base", help="base model folder (real models; with --aligned and --data)")
        s.add_argument("--aligned", help="aligned model folder (real models)")
        s.add_argument("--data", help="harmful prompts with responses, any layout of docs/method.md §9")
        cli.add_base_favored_flags(s)
        s.add_argument("--max-response-tokens", type=int, default=64, help="response positions per pair")
        s.add_argument("--limit", type=int, help="use N pairs, spread evenly over the data")
        s.add_argument(
            "--refusal",
            help="refusal text for the gradient signal (default: the toy world's first "
            "refusal, or a generic one with real models)",
        )
        s.add_argument("--batch-size", type=int, default=16, help="pairs per forward")
        cli.add_device_flags(s)
        s.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    prof = sub.choices["profile"]
    prof.add_argument(
        "--base-format",
        choices=["chat", "plain"],
        default="chat",
        help="chat: both models read the aligned chat format; plain: the base reads plain text",
    )
    prof.add_argument(
        "--grad-model",
        choices=["base", "aligned"],
        default="base",
        help="the model under which the refusal-SFT gradient signal is measured",
    )
    prof.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="profile on the worlds of these seeds (0 1 2 are "
        "the reporting seeds) and report a summary, mean ± sd over seeds",
    )
    prof.add_argument(
        "--models",
        nargs="+",
        metavar="NAME=PATH",
        default=["aligned={world}/aligned"],
        help="with --seeds: the models profiled against each world's base; PATH may hold "
        "{world} and {seed} (e.g. targeted=runs/seed-{seed}/targeted)",
    )
    prof.add_argument("--out", help="write the profile JSON here (and the plot beside it as .png)")
    prof.add_argument("--plot", help="PNG path for the plot (needs matplotlib)")
    tokens = sub.choices["tokens"]
    tokens.add_argument("--example", type=int, default=0, help="index of the pair to show")
    tokens.add_argument("--show", type=int, default=5, help="base-favored tokens shown per position")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    commands = {"profile": cmd_profile, "tokens": cmd_tokens, "plot": cmd_plot}
    commands[args.cmd](args)


if __name__ == "__main__":
    cli.run(main)
