"""Where a run's messages go: a terminal's stderr, but a Jupyter kernel's stdout (stderr is drawn as an error)."""
from dynbatch_core import RunInterrupted
from dynbatch_core.engine import console


def test_log_lines_go_to_stderr_in_a_terminal_and_to_stdout_for_ranks_of_a_notebook(capsys, monkeypatch):
    monkeypatch.delenv(console.LOG_TO_STDOUT, raising=False)
    console.log("epoch 1/3")
    assert capsys.readouterr() == ("", "[dynbatch] epoch 1/3\n")
    monkeypatch.setenv(console.LOG_TO_STDOUT, "1")   # what the launcher sets for ranks spawned from a kernel
    console.log("epoch 2/3")
    assert capsys.readouterr() == ("[dynbatch] epoch 2/3\n", "")


def test_outside_a_kernel_a_disabled_bar_draws_nothing(capsys):
    bar = console.launcher_progress(total=10, enabled=False)
    bar.update(5)
    console.close_launcher_progress(bar)
    assert capsys.readouterr() == ("", "")


def test_an_interrupt_is_one_line_in_ipython_and_still_a_keyboard_interrupt(tmp_path):
    stopped = RunInterrupted(2, tmp_path)
    assert isinstance(stopped, KeyboardInterrupt)
    assert stopped._render_traceback_() == [f"run stopped by interrupt; 2 rank(s) ended; run folder {tmp_path}"]
