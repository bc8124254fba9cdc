"""The notebooks as JupyterLab shows them, checked through nbclient (a real kernel): a progress widget while a run
trains, its log as ordinary output (no stderr block, no IProgress warning), and an interrupt as one line with no rank
left behind. ../shared/tools/jupyterlab_check.py shows the same in a browser."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import nbformat
import psutil
import pytest
from nbclient import NotebookClient

from conftest import rank_processes
from dynbatch_core.study import report

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
WIDGET_VIEW = report.WIDGET_VIEW


class RecordingClient(NotebookClient):
    """Keeps every output message of every cell, as the kernel sent it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent: list[tuple[int, str, dict]] = []

    def output(self, outs, msg, display_id, cell_index):
        self.sent.append((cell_index, msg["msg_type"], msg["content"]))
        return super().output(outs, msg, display_id, cell_index)


def kernel_environment() -> dict:
    """This environment without PYTEST_CURRENT_TEST: under pytest, ipykernel does not forward what subprocesses
    (the ranks) write to its stdout, which a kernel in JupyterLab does."""
    return {name: value for name, value in os.environ.items() if name != "PYTEST_CURRENT_TEST"}


def spawned_ranks() -> list[psutil.Process]:
    """The ranks of every kernel this test started."""
    return [rank for kernel in psutil.Process().children() for rank in rank_processes(kernel.pid)]


def test_a_notebook_run_shows_a_progress_widget_and_its_log_as_output_not_as_errors(tmp_path, shared_data):
    import papermill   # only to inject parameters (prepare_only): the kernel is nbclient's
    notebook = papermill.execute_notebook(str(REPO / "notebooks" / "2gpu.ipynb"), str(tmp_path / "2gpu.ipynb"),
                                          parameters={"train_samples": 256, "test_samples": 100, "epochs": 2,
                                                      "data_dir": str(shared_data),
                                                      "output_dir": str(tmp_path / "figures"),
                                                      "runs_dir": str(tmp_path / "runs")},
                                          prepare_only=True, progress_bar=False)
    client = RecordingClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    client.execute(env=kernel_environment())
    training = next(i for i, cell in enumerate(notebook.cells) if "run(nb.config(" in cell.source)
    sent = [(kind, content) for index, kind, content in client.sent if index == training]
    bars = [content for kind, content in sent if kind == "display_data" and WIDGET_VIEW in content["data"]]
    assert len(bars) == 2   # one live bar per run (static, loss-plateau)
    streams = [content for kind, content in sent if kind == "stream"]
    assert {content["name"] for content in streams} == {"stdout"}   # no stderr block
    text = "".join(content["text"] for content in streams)
    assert "[dynbatch] epoch 2/2" in text and "IProgress" not in text and "Warning" not in text
    # the bars stay in the notebook (as in JupyterLab); the report strips them from the notebooks it executes
    kept = notebook.cells[training].outputs
    assert sum(WIDGET_VIEW in output.get("data", {}) for output in kept) == 2 and notebook.metadata.get("widgets")
    stripped = report.strip_widgets(notebook)
    assert not any(WIDGET_VIEW in output.get("data", {}) for output in stripped.cells[training].outputs)
    assert "widgets" not in stripped.metadata and any(o.output_type == "stream" for o in stripped.cells[training].outputs)


def test_an_interrupted_run_is_one_line_and_leaves_no_rank_behind(tmp_path):
    run_dir = tmp_path / "run"
    code = ("from dynbatch_core import RunConfig, run\n"
            f"run(RunConfig(dataset='synthetic', model='resnet8', world_size=2, epochs=200, train_samples=512, "
            f"test_samples=32, out={str(run_dir)!r}))")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code), nbformat.v4.new_code_cell("1 + 1")])
    left = {}

    def ranks_after_the_cell(cell, cell_index, execute_reply):
        if cell_index == 0:
            left["ranks"] = [rank for rank in spawned_ranks() if rank.status() != psutil.STATUS_ZOMBIE]

    client = NotebookClient(notebook, timeout=180, kernel_name="python3", allow_errors=True,
                            on_cell_executed=ranks_after_the_cell)

    def interrupt_once_training():
        deadline = time.monotonic() + 120
        while not (run_dir / "steps.csv").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(client.km.provisioner.process.pid, signal.SIGINT)   # what Kernel -> Interrupt sends an ipykernel

    interrupter = threading.Thread(target=interrupt_once_training, daemon=True)
    interrupter.start()
    client.execute(env=kernel_environment())
    interrupter.join(timeout=5)
    errors = [output for output in notebook.cells[0].outputs if output.output_type == "error"]
    assert len(errors) == 1 and errors[0].ename == "RunInterrupted"
    assert len(errors[0].traceback) == 1, errors[0].traceback   # one line, no traceback through multiprocessing
    assert errors[0].traceback[0].startswith(f"run stopped by interrupt; 2 rank(s) ended; run folder {run_dir}")
    assert left["ranks"] == []
    assert notebook.cells[1].outputs[0]["data"]["text/plain"] == "2"   # the kernel goes on
