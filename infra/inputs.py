"""Real folders or a toy world? Every command runs either on the user's checkpoints and data files or on a toy
world (data/toyworld.py builds one); this is the one check that decides which, and that refuses a half-given
or mixed set of flags as a one-line error naming the flags (never a silent fall-back to the toy world)."""

from __future__ import annotations

from infra.cli import flag_name


def real_or_toy(args, data: tuple[str, ...], toy: tuple[str, ...] = ("world",), model: str = "") -> bool:
    """True: the command runs on the user's files, named by the flags `data` (all of them, and the flag
    `model` where the command needs one named apart); False: on a toy world (the flags `toy`, or the default
    world). A model flag without data and without a toy world is an error too: it would silently be run on
    the toy world's data. `data`, `toy`, `model`: attribute names of the parsed args ("harmful", "world")."""
    given = [flag_name(d) for d in data if getattr(args, d, None)]
    worlds = [flag_name(t) for t in toy]
    if given:
        missing = [flag_name(d) for d in data if not getattr(args, d, None)]
        if missing:
            every = " and ".join(flag_name(d) for d in data)
            raise ValueError(
                f"{', '.join(missing)} missing: real models need {every} (leave all out for a toy world)"
            )
        if any(getattr(args, t, None) for t in toy):
            raise ValueError(
                f"{'/'.join(given)} name your data; leave out {'/'.join(worlds)} "
                "(those use a toy world's own data)"
            )
        if model and not getattr(args, model, None):
            raise ValueError(f"{'/'.join(given)} need {flag_name(model)}: the checkpoint folders to run")
        return True
    if model and getattr(args, model, None) and not any(getattr(args, t, None) for t in toy):
        files = " and ".join(f"{flag_name(d)} FILE" for d in data)
        raise ValueError(
            f"{flag_name(model)} needs data: pass {files} (real models), or {' / '.join(worlds)} to use a "
            "toy world's data"
        )
    return False
