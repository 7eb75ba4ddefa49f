"""What every command of deepalign shares: help that shows every default, the flags that mean the same in
every command (defined once, here), and errors in the user's input reported as one line naming the file, flag
or key and what to do (the full traceback only with --debug)."""

from __future__ import annotations

import argparse
import sys

# What a user can cause and fix: a missing or malformed file, a bad flag value, an existing output.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout in --help and appends "(default: ...)" to every flag's help."""


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p


def run(main, argv=None):
    """Run main(argv). A user error prints one line, `error: <message>`, and exits with status 2; with --debug
    it raises as usual."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return main(argv)
    except USER_ERRORS as e:
        if "--debug" in argv:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def add_world_flag(p):
    p.add_argument(
        "--world",
        help="a built toy world's folder (python data/toyworld.py --out DIR); "
        "default: the seed-0 world, built on first use",
    )


DTYPE_NAMES = ("bfloat16", "float16", "float32")  # the keys of model.DTYPES (cli imports no project module)


def add_device_flags(p, dtype: str = "float32"):
    import torch

    p.add_argument("--dtype", choices=DTYPE_NAMES, default=dtype, help="weights and activations")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")


def add_base_favored_flags(p):
    """tau, top-k and rho of the base-favored set (docs/method.md §2)."""
    p.add_argument("--tau", type=float, default=1.0, help="base-favored: lp_B - lp_A > log(tau)")
    p.add_argument("--top-k", type=int, default=20, help="base-favored tokens are in the base's top-k")
    p.add_argument("--rho", type=float, default=0.01, help="base-favored tokens have p_B >= rho * max p_B")


def add_sampling_flags(p):
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="nucleus sampling: keep the smallest set of tokens whose probability reaches top-p",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--compile", action="store_true", help="torch.compile the per-token decode step")


def add_contrastive_flags(p, alpha: float, beta: float, sweep: bool = False):
    """Contrastive decoding's flags (docs/method.md §4), defaults `alpha` and `beta` (deepalign.CD_ALPHA,
    CD_BETA: the caller passes them, so that cli imports no project module); with sweep, --alpha and --beta
    take lists."""
    g = p.add_argument_group("contrastive decoding (docs/method.md §4)")
    many = dict(nargs="+") if sweep else {}
    g.add_argument("--contrast-base", help="base model folder: decode contrastively against it")
    g.add_argument(
        "--alpha",
        type=float,
        default=[alpha] if sweep else alpha,
        **many,
        help="contrast strength; 0 = plain aligned decoding",
    )
    g.add_argument(
        "--beta",
        type=float,
        default=[beta] if sweep else beta,
        **many,
        help="plausibility head: keep p_A >= beta * max p_A",
    )
    g.add_argument(
        "--cd-mode",
        choices=["full", "bf"],
        default="full",
        help="contrast every head token, or base-favored ones only (§2: --tau, --top-k, --rho)",
    )
    return g
