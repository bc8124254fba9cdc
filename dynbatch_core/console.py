"""What a run prints: one-line log messages (to stderr) and the rank-0 progress bar."""
from __future__ import annotations

import sys

from tqdm import tqdm


def log(message: str) -> None:
    print(f"[dynbatch] {message}", file=sys.stderr, flush=True)


def progress_bar(*, total: int, description: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=description, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                leave=False, mininterval=1.0)
