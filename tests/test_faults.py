"""The failure-injection hook fires only in tests: DYNBATCH_FAULT alone is ignored."""
import re

import pytest

from dynbatch_core.engine.faults import InjectedFault


def test_a_fault_variable_without_the_test_switch_is_ignored_with_a_warning(monkeypatch):
    monkeypatch.delenv("DYNBATCH_TEST_HOOKS", raising=False)
    monkeypatch.setenv("DYNBATCH_FAULT", "kill:0:0")
    with pytest.warns(UserWarning, match="DYNBATCH_FAULT is set but ignored"):
        fault = InjectedFault.from_env()
    assert fault.kind is None
    fault.before_step(0, 0)  # would SIGKILL this test process if armed


def test_with_the_switch_faults_are_parsed(monkeypatch):
    monkeypatch.setenv("DYNBATCH_TEST_HOOKS", "1")
    monkeypatch.setenv("DYNBATCH_FAULT", "raise:1:3")
    assert InjectedFault.from_env() == InjectedFault("raise", 1, 3)
    monkeypatch.setenv("DYNBATCH_FAULT", "stall:0:2:1.5")
    assert InjectedFault.from_env() == InjectedFault("stall", 0, 2, 1.5)
    with pytest.raises(RuntimeError, match="injected fault at step 3 on rank 1"):
        InjectedFault("raise", 1, 3).before_step(1, 3)
    monkeypatch.setenv("DYNBATCH_FAULT", "explode:1")
    with pytest.raises(ValueError, match=re.escape("expected raise|kill|hang|nonfinite:RANK:STEP")):
        InjectedFault.from_env()
