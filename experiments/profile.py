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
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import deepalign as D
from infra import cli
from infra.cli import setting
from lab import plots
from lab.tables import markdown

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


PROFILE_PLOT = (  # (key, panel title) of plot_profile
    ("kl", "KL(p_A || p_B)"),
    ("bf_mass_A", "bf_mass_A (incompleteness)"),
    ("harmful_lp_A", "log p_A(h_t | x, h_<t) (harmful likelihood)"),
    ("grad", "refusal-SFT gradient signal"),
)


def plot_profile(profiles: dict, path, title: str = "") -> bool:
    """KL(p_A || p_B), bf_mass_A, the harmful likelihood and the refusal-SFT gradient signal against response
    position, one line per profile ({label: positions rows}). False (and a hint) when matplotlib, an optional
    dependency, is missing (lab/plots.py draws it)."""
    charts = []
    for key, label in PROFILE_PLOT:
        points = {
            n: [(r["t"], r[key], None, None) for r in rows if r.get(key) is not None]
            for n, rows in profiles.items()
        }
        series = tuple(plots.Series(n, pts) for n, pts in points.items() if pts)
        charts.append(plots.Chart(label, "response position t", "", series))
    return plots.write_png(charts, path, plots.color_map(profiles), title)


@dataclass(frozen=True)
class Pairs:
    """What `profile` and `tokens` read: real folders and a data file, or a toy world's (--world)."""

    base: str | None = setting(
        None, "base model folder (real models; with --aligned and --data)", shown="the world's base"
    )
    aligned: str | None = setting(None, "aligned model folder (real models)", shown="the world's aligned")
    data: str | None = setting(
        None,
        "harmful prompts with responses, any layout of docs/method.md §9",
        shown="the world's harmful_eval set",
    )
    limit: int | None = setting(None, "use N pairs, spread evenly over the data", type=int, shown="all")
    refusal: str | None = setting(
        None,
        "refusal text for the gradient signal",
        shown="the toy world's first refusal, or a generic one with real models",
    )


def pair_source(src: Pairs, world) -> tuple[Path, Path, list[dict], str]:
    """(base folder, aligned folder, harmful rows, refusal text): the real folders and data file of `src`,
    or the toy world's (world: its folder; None: the seed-0 world). Real models need all three of --base,
    --aligned and --data."""
    from data import toyworld as TW
    from data import world as W
    from infra import formats

    given = {"--base": src.base, "--aligned": src.aligned, "--data": src.data}
    if any(given.values()) and not all(given.values()):
        missing = [flag for flag, value in given.items() if not value]
        raise ValueError(
            f"{', '.join(missing)} missing: with real models pass --base DIR --aligned DIR "
            "--data FILE (harmful prompts with responses); leave all three out for the toy "
            "world"
        )
    if src.base:
        rows = formats.read_prompts(src.data, "harmful")
        return (
            Path(src.base),
            Path(src.aligned),
            rows,
            src.refusal or "I'm sorry, but I can't help with that.",
        )
    paths = TW.ensure_world(world)
    rows = TW.read_set(paths, "harmful_eval")
    return paths["base"], paths["aligned"], rows, src.refusal or W.REFUSALS[0]


def load_pair(args):
    """(base, aligned, aligned tokenizer, base tokenizer, harmful rows, refusal, (base folder, aligned
    folder)) for the command line (pair_source): the rows with a harmful response, spread over --limit."""
    from infra.cli import log
    from infra.files import spread
    from infra.hf import load_model
    from infra.tokenizer import Tokenizer

    src = cli.settings_from(Pairs, args)
    base_dir, aligned_dir, rows, refusal = pair_source(src, args.world)
    if base_dir.resolve() == aligned_dir.resolve():
        log(f"warning: --base and --aligned are the same folder ({base_dir}): every profile value is 0")
    rows = spread([r for r in rows if r.get("harmful_response")], src.limit)
    if not rows:
        raise ValueError(
            f"{src.data}: no row has a harmful response; the profile needs (prompt, response) pairs"
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
        **vars(cli.settings_from(D.BaseFavored, args)),
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
    rows = []
    for name, per_seed in per_model.items():
        for seed, summary in per_seed.items():
            if means_only and len(per_seed) > 1:
                break
            rows.append([f"{name}", f"{seed}"] + [f"{summary[c]:.3f}" for c in columns])
        if len(per_seed) > 1:
            cells = []
            for c in columns:
                values = [summary[c] for summary in per_seed.values()]
                cells.append(f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}")
            rows.append([f"{name}", "mean ± sd"] + cells)
    return markdown(["model", "seed"] + columns, rows)


def cmd_profile_seeds(args):
    """The profile of every --models entry on the worlds of --seeds, and its summary (mean ± sd over
    seeds)."""
    from infra.files import write_json_atomic

    cfg = profile_config(args)
    profiles, per_model = {}, {}
    for seed in args.seeds:
        for name, prof in profile_world(seed, args, cfg).items():
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


def profile_world(seed: int, args, cfg: D.ProfileConfig) -> dict[str, dict]:
    """{name: profile} of every --models entry (NAME=PATH, PATH with {world} and {seed} filled in) against
    the base of the world of `seed`, each with the base's refusal-SFT gradient signal per position."""
    from data import toyworld as TW
    from data import world as W
    from infra.cli import log
    from infra.files import spread
    from infra.hf import load_model
    from infra.tokenizer import Tokenizer

    paths = TW.ensure_world(seed=seed)
    tok = Tokenizer(paths["aligned"])
    rows = spread(TW.read_set(paths, "harmful_eval"), args.limit)
    base = load_model(paths["base"], args.dtype, args.device)
    refusal = args.refusal or W.REFUSALS[0]
    grads = D.gradient_signal(base, tok, rows, refusal, args.max_response_tokens, args.batch_size)
    profiles = {}
    for name, _, template in (spec.partition("=") for spec in args.models):
        folder = Path(template.format(world=paths["root"], seed=seed))
        if not folder.exists():
            raise FileNotFoundError(
                f"--models {name}={template}: {folder}: no such folder; the runs/seed-N/<row> models are "
                "trained by `make compare` (python -m experiments.compare)"
            )
        D.check_same_tokenizer(Tokenizer(folder), tok)
        log(f"profile of {name} ({folder}) against the base of world {seed}")
        prof = D.position_profile(base, load_model(folder, args.dtype, args.device), tok, rows, cfg)
        for row in prof["positions"]:
            row["grad"] = grads[row["t"]] if row["t"] < len(grads) else None
        prof["settings"].update(base=str(paths["base"]), aligned=str(folder), refusal=refusal, seed=seed)
        profiles[name] = prof
    return profiles


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
    bf = D.base_favored_mask(lp_A, lp_B, cli.settings_from(D.BaseFavored, args), valid)  # (n, V)
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


PROFILE_HELP = """A position profile (docs/method.md §3) says how deep a model's alignment reaches.
Both the aligned model A and its base B read each (prompt, harmful response) pair, teacher-forced, and at
every response position t, averaged over the pairs that reach t, the profile has: KL(p_A || p_B), how far A
has moved from B there (Qi et al. 2024's measure); bf_mass_A, the probability A still puts on the tokens B
favours (§2: the incompleteness score); bf_hit, how often the response's next token is one of them; log p_A
of that token; and grad, the gradient signal refusal training gets there (the paper's "signal decay"). A
shallow alignment has its KL at the first few positions and little after: past them, A answers much as B
does."""


def parse_args(argv=None):
    p = cli.parser(__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    prof = sub.add_parser(
        "profile",
        help="the position profile (§3) over harmful pairs",
        description=PROFILE_HELP,
        formatter_class=cli.HelpFormatter,
    )
    tokens = sub.add_parser(
        "tokens",
        help="one pair, position by position: the base-favored tokens (§2)",
        description=cmd_tokens.__doc__,
        formatter_class=cli.HelpFormatter,
    )
    for s in (prof, tokens):
        add_pair_flags(s)
    add_profile_flags(prof)
    tokens.add_argument("--example", type=int, default=0, help="index of the pair to show")
    tokens.add_argument("--show", type=int, default=5, help="base-favored tokens shown per position")
    overlay = sub.add_parser(
        "plot",
        help="overlay profile JSON files written by `profile --out`",
        description=cmd_plot.__doc__,
        formatter_class=cli.HelpFormatter,
    )
    overlay.add_argument("profiles", nargs="+", help="profile JSON files")
    overlay.add_argument("--out", required=True, help="PNG path")
    overlay.add_argument("--title", default="", help="figure title")
    return p.parse_args(argv)


def add_pair_flags(s):
    """The flags `profile` and `tokens` share: the models and pairs, the base-favored set, the device."""
    cli.add_world_flag(s)
    cli.add_settings(s, Pairs)
    cli.add_settings(s, D.BaseFavored)
    s.add_argument(
        "--max-response-tokens",
        type=int,
        default=D.ProfileConfig.max_response_tokens,
        help="response positions per pair",
    )
    s.add_argument("--batch-size", type=int, default=D.ProfileConfig.batch_size, help="pairs per forward")
    cli.add_device_flags(s)
    s.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def add_profile_flags(prof):
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
        help="with --seeds: the models profiled against each world's base; PATH may hold {world} and {seed} "
        "(e.g. targeted=runs/seed-{seed}/targeted, trained by `make compare`)",
    )
    prof.add_argument("--out", help="write the profile JSON here (and the plot beside it as .png)")
    prof.add_argument("--plot", help="PNG path for the plot (needs matplotlib)")


def main(argv=None):
    args = parse_args(argv)
    commands = {"profile": cmd_profile, "tokens": cmd_tokens, "plot": cmd_plot}
    commands[args.cmd](args)


if __name__ == "__main__":
    cli.run(main)
