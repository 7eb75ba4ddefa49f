"""What every command of deepalign shares: flags built from the frozen config dataclasses (each setting is
written once, as a dataclass field with its default and help: `setting`, `add_settings`, `settings_from`),
help that shows every default once, the flags that mean the same in every command, and errors in the user's
input reported as one line naming the file, flag or key and what to do (the full traceback only with --debug).

    @dataclass(frozen=True)
    class RunConfig:
        steps: int = setting(150, "optimizer steps")
        prefill: tuple = setting((0, 10), "prefill lengths k", type=int)

    p = cli.parser(__doc__)
    cli.add_settings(p.add_argument_group("optimisation"), RunConfig)   # --steps, --prefill
    run = cli.settings_from(RunConfig, p.parse_args())                  # RunConfig(steps=..., prefill=(...))
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

# What a user can cause and fix: a missing or malformed file, a bad flag value, an existing output.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout in --help and appends "(default: ...)" to a flag's help once: the
    value, or the words of a setting whose default is computed (e.g. "the world's base"); nothing for a help
    that already says its default, or a default that is None or empty (say it with `setting(shown=...)`)."""

    def _get_help_string(self, action):
        text = action.help or ""
        empty = action.default is None or action.default in ("", [])  # words them through `shown`
        if "default" in text or action.default is argparse.SUPPRESS or empty:
            return text
        if action.option_strings:
            value = action.default
            shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            return f"{text} (default: {shown})"
        return text


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
        help="a built toy world's folder (python data/toyworld.py --out DIR) "
        "(default: the seed-0 world, built on first use)",
    )


DTYPE_NAMES = ("bfloat16", "float16", "float32")  # the keys of model.DTYPES (cli imports no project module)


def add_device_flags(p, dtype: str = "float32"):
    import torch

    p.add_argument("--dtype", choices=DTYPE_NAMES, default=dtype, help="weights and activations")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")


def add_contrastive_flags(p, contrast, sweep: bool = False):
    """Contrastive decoding's flags (docs/method.md §4): --contrast-base and one per setting of `contrast`
    (deepalign.Contrast: the caller passes it, so that cli imports no project module); with sweep, --alpha
    and --beta take lists."""
    g = p.add_argument_group("contrastive decoding (docs/method.md §4)")
    g.add_argument("--contrast-base", help="base model folder: decode contrastively against it")
    add_settings(g, contrast, many=("alpha", "beta") if sweep else ())
    return g


def log(*a):
    """Progress and diagnostics go to stderr so stdout stays machine-readable."""
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Settings: a frozen dataclass's fields are the flags
# ----------------------------------------------------------------------------------------------
def setting(default, help: str, *, type=None, choices=None, shown: str = "", flag: bool = True):
    """A dataclass field that is also a command-line flag --field-name: its default, its help, and (for a
    tuple field) the type of its elements; `shown` words a default that the command computes (a default ""
    or None: "the world's base", say); flag=False keeps a field out of the command line."""
    meta = {"help": help, "type": type, "choices": choices, "shown": shown, "flag": flag}
    if isinstance(default, (list, dict, set)):
        raise TypeError("a setting's default must be immutable: use a tuple")
    return dataclasses.field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_settings(p, cls, skip=(), many=()):
    """One flag per field of the dataclass `cls` made with `setting` (those not in `skip`), with the field's
    default, help and choices; a bool is a switch (--no-NAME for one on by default), a tuple takes a list,
    and so does a field named in `many` (a sweep over its values: the list [default] by default)."""
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("flag") or f.name in skip:
            continue
        default, help = f.default, meta["help"]
        if meta["shown"]:
            help = f"{help} (default: {meta['shown']})"
        kw = dict(help=help, choices=meta["choices"])
        if isinstance(default, bool):
            kw.pop("choices")
            action = argparse.BooleanOptionalAction if default else "store_true"
            p.add_argument(flag_name(f.name), action=action, default=default, **kw)
        elif f.name in many:
            kind = meta["type"] or type(default)
            p.add_argument(flag_name(f.name), nargs="+", type=kind, default=[default], **kw)
        elif isinstance(default, tuple):
            kind = meta["type"] or (type(default[0]) if default else str)
            p.add_argument(flag_name(f.name), nargs="*", type=kind, default=list(default), **kw)
        else:
            kind = meta["type"] or (type(default) if default is not None else str)
            p.add_argument(flag_name(f.name), type=kind, default=default, **kw)


def settings_from(cls, args, **overrides):
    """The dataclass `cls` from parsed flags (its flagged fields; lists become tuples), then `overrides`."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("flag") and hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**{**values, **overrides})
