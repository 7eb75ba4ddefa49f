"""The method comparison (docs/method.md §5-§6) over toy worlds: train every method on each world, evaluate
every model under every attack, and report mean ± sd over the worlds (the per-seed values are in the JSON).

    python compare.py --seeds 0 1 2 --out docs/compare.json       # the README's method table (make compare)
    python compare.py --seeds 100 101 102 --rows targeted augment --out /tmp/dev.json -- --lambda-util 4

Each world's runs live in runs/seed-N/<row>/ and are reused when finished (--retrain trains them again).
Flags after `--` go to every train.py run (for development seeds: try a setting on every method at once).
The rows: the aligned model (greedy and with contrastive decoding at its defaults, §4), every baseline of §6,
targeted completion (§5) and its ablations.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import cli
import eval as E
import train
from data import toyworld as TW
from data.files import write_json_atomic
from model import log

ROWS = {  # row name -> train.py flags ("aligned" rows are not trained)
    "sft": ["--method", "sft"],
    "augment": ["--method", "augment"],
    "constrained": ["--method", "constrained"],
    "rto": ["--method", "rto"],
    "insertion": ["--method", "insertion"],
    "targeted": ["--method", "targeted"],
    "targeted, teacher contrast": ["--method", "targeted", "--teacher", "contrast"],
    "targeted, teacher hard": ["--method", "targeted", "--teacher", "hard"],
    "targeted, no penalty": ["--method", "targeted", "--lambda-pen", "0"],
    "targeted, position weights": ["--method", "targeted", "--penalty-weight", "position"],
}


def run_folder(runs: Path, seed: int, row: str) -> Path:
    return runs / f"seed-{seed}" / row.replace(", ", "-").replace(" ", "-")


def train_row(paths: dict, folder: Path, row: str, extra: list, retrain: bool):
    """Train one row on one world, unless its run folder holds a finished model."""
    if (folder / "config.json").exists() and not retrain:
        return
    log(f"training {row} -> {folder}")
    train.main(ROWS[row] + ["--world", str(paths["root"]), "--out", str(folder), "--overwrite"] + extra)


def parse_args(argv):
    cut = argv.index("--") if "--" in argv else len(argv)
    own, extra = argv[:cut], argv[cut + 1 :]
    p = cli.parser(__doc__)
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=list(TW.REPORTING_SEEDS),
        help="the worlds to compare on (reporting seeds 0 1 2; development seeds 100 and up)",
    )
    p.add_argument(
        "--rows",
        nargs="+",
        choices=list(ROWS),
        metavar="ROW",
        default=list(ROWS),
        help=f"the trained rows to compare; of: {', '.join(ROWS)}",
    )
    p.add_argument("--runs", default="runs", help="where the trained models live (runs/seed-N/<row>)")
    p.add_argument("--retrain", action="store_true", help="train every row again even if it is finished")
    p.add_argument(
        "--no-contrastive", action="store_true", help="leave out the aligned model with contrastive decoding"
    )
    p.add_argument("--limit", type=int, help="evaluate on N harmful and N benign prompts, spread evenly")
    p.add_argument("--out", help="write the summary, the per-seed rows and every generation here")
    args = p.parse_args(own)
    args.train_flags = list(extra)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    start = time.perf_counter()
    results, utility, gens, worlds = [], [], [], []
    for seed in args.seeds:
        paths = TW.ensure_world(seed=seed)
        worlds.append({"seed": seed, "folder": str(paths["root"])})
        models = ["aligned={world}/aligned"]
        for row in args.rows:
            folder = run_folder(Path(args.runs), seed, row)
            train_row(paths, folder, row, args.train_flags, args.retrain)
            models.append(f"{row}={folder}")
        limit = ["--limit", str(args.limit)] if args.limit else []
        runs = [["--world", str(paths["root"]), "--model", *models, *limit]]
        if not args.no_contrastive:
            runs.append(
                [
                    "--world",
                    str(paths["root"]),
                    "--model",
                    "aligned={world}/aligned",
                    "--decode",
                    "contrastive",
                    *limit,
                ]
            )
        for eval_args in runs:
            parsed = E.parse_args(eval_args)
            E.check_args(parsed)
            r, u, g, _ = E.evaluate_world(parsed, seed, paths, E.AttackConfig(), {"toy": E.toy_judge()})
            results, utility, gens = results + r, utility + u, gens + g
    summary = E.summarize(results, utility)
    print(E.markdown_table(summary))
    print("\nheld-out categories only:\n" + E.markdown_table(summary, split="held_out"))
    log(f"{len(args.seeds)} worlds, {time.perf_counter() - start:.0f} s")
    if args.out:
        write_json_atomic(
            args.out,
            {
                "settings": {"seeds": args.seeds, "rows": args.rows, "train_flags": args.train_flags},
                "worlds": worlds,
                "summary": summary,
                "results": results,
                "utility": utility,
                "generations": gens,
            },
        )
        log(f"wrote {args.out}")
    return summary


if __name__ == "__main__":
    cli.run(main)
