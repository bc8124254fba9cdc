"""What a run prints: one-line log messages, the rank-0 progress bar (a terminal run) and the launcher's progress
bar (a widget in Jupyter).

Log lines go to stderr in a terminal (stdout carries the run folder the CLI prints) and to stdout inside a Jupyter
kernel, which draws stderr as an error block. Spawned ranks write to the kernel's own stdout and stderr, so the
launcher tells them which through their environment (LOG_TO_STDOUT).
"""
from __future__ import annotations

import importlib.util
import os
import sys

from tqdm import tqdm

LOG_TO_STDOUT = "DYNBATCH_LOG_TO_STDOUT"


def in_jupyter_kernel() -> bool:
    if "IPython" not in sys.modules:
        return False
    from IPython import get_ipython
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def log(message: str) -> None:
    to_stdout = os.environ.get(LOG_TO_STDOUT) == "1" or in_jupyter_kernel()
    print(f"[dynbatch] {message}", file=sys.stdout if to_stdout else sys.stderr, flush=True)


def progress_bar(*, total: int, description: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=description, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                leave=False, mininterval=1.0)


def launcher_progress(*, total: int, enabled: bool) -> tqdm:
    """The launcher's bar: a widget in a Jupyter kernel (it stays, full or red, when the run ends), text on stderr
    elsewhere, nothing when disabled or when the kernel lacks ipywidgets (the `notebooks` extra installs it).
    The report command strips the widgets from the notebooks it executes (report.strip_widgets)."""
    in_kernel = in_jupyter_kernel()
    if not enabled or (in_kernel and importlib.util.find_spec("ipywidgets") is None):
        return tqdm(total=total, disable=True)
    if not in_kernel:
        return tqdm(total=total, desc="starting ranks", unit="step", file=sys.stderr, dynamic_ncols=True)
    from IPython.display import display
    from tqdm.notebook import tqdm as notebook_tqdm
    bar = notebook_tqdm(total=total, desc="starting ranks", unit="step", display=False, dynamic_ncols=True)
    bar.display_handle = display(bar.container, display_id=True)
    return bar


def close_launcher_progress(bar: tqdm) -> None:
    """Close the bar; a widget's display is sent again, so that a notebook saved without widget support (papermill)
    holds the final state as its text line rather than the first."""
    bar.close()
    handle = getattr(bar, "display_handle", None)
    if handle is not None:
        handle.update(bar.container)
