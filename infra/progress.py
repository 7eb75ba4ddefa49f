"""Progress bars on stderr (stdout stays machine-readable): redrawn in place on a terminal; in a log file
(stderr not a terminal) a line at most every LOG_INTERVAL seconds, not a line per redraw."""

from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL = 60.0  # seconds between a bar's lines in a log file


def progress_bar(iterable=None, desc: str = "", rank: int = 0, disable: bool = False, **kw) -> tqdm:
    """tqdm over `iterable` on stderr, drawn by process 0 only (rank > 0: silent), sparse in a log file;
    `kw` as tqdm's (initial, total, ...)."""
    interval = 2.0 if sys.stderr.isatty() else LOG_INTERVAL
    return tqdm(iterable, desc=desc, file=sys.stderr, mininterval=interval, disable=disable or rank > 0, **kw)
