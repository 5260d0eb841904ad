"""A short run of each fuzz harness (`make fuzz` runs 100,000 executions of each), and every input
that once made one fail, run again (docs/fuzzing.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.run import HARNESSES, run_harness

pytest.importorskip("atheris", reason="the fuzz harnesses need atheris (pip install -e '.[dev]')")

SHORT_RUNS = 20_000
SHORT_SECONDS = 15


@pytest.mark.slow
@pytest.mark.parametrize("harness", HARNESSES)
def test_a_short_fuzz_run_finds_nothing(harness: str, tmp_path: Path) -> None:
    outcome = run_harness(harness, SHORT_RUNS, str(tmp_path), seconds=SHORT_SECONDS)
    assert outcome.status == 0, "\n".join(outcome.log.splitlines()[-60:])
    assert outcome.runs >= 300, outcome.line()  # it ran, not only started


@pytest.mark.parametrize("harness", HARNESSES)
def test_every_input_that_once_failed_passes_now(harness: str, tmp_path: Path) -> None:
    outcome = run_harness(harness, 0, str(tmp_path), replay=True)
    assert outcome.status == 0, "\n".join(outcome.log.splitlines()[-60:])
