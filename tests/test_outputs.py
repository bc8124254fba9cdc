"""The committed report (outputs/) is whole and reproducible: every notebook ran, from a clean commit, and every
file REPORT.md links to is there."""
import json
import re
from pathlib import Path

from dynbatch_core.study import report

OUTPUTS = Path(__file__).resolve().parents[1] / "outputs"


def _report() -> str:
    return (OUTPUTS / "REPORT.md").read_text()


def test_the_committed_report_comes_from_a_clean_commit():
    commits = re.findall(r"git commit `([^`]+)`", _report())
    assert commits, "REPORT.md names no git commit"
    assert not [c for c in commits if c.endswith("-dirty") or c in ("unknown", "None")], commits
    for summary in (OUTPUTS / "figures").glob("*__summary.json"):
        assert not str(json.loads(summary.read_text())["git_commit"]).endswith("-dirty"), summary.name


def test_every_notebook_ran_and_every_linked_file_exists():
    text = _report()
    assert "FAILED" not in text and "*not run*" not in text and "*failed*" not in text
    for notebook in report.NOTEBOOKS:
        assert f"## {notebook}\n\nExecuted copy" in text, f"{notebook} has no executed section"
    links = re.findall(r"\]\(((?:figures|notebooks)/[^)]+)\)", text)
    assert any(link.endswith(".png") for link in links)
    missing = [link for link in links if not (OUTPUTS / link).is_file()]
    assert not missing, missing
