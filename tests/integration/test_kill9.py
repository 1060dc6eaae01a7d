"""kill -9 at random points of prefix-cache create / replace / delete (bench/faults.py says what each
round checks after the restart). The long run is ``python -m bench.faults --rounds 300``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.faults import Faults

# A seed from the environment reproduces a failing run (the log prints every round's operation and delay).
SEED = int(os.environ.get("FAULTS_SEED", "2026"))
ROUNDS = 20


@pytest.mark.timeout(240)
def test_every_cache_survives_kill_9_as_its_old_or_new_version(
    tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLX_GATEWAY_MODELS_DIR", str(models_dir))  # the session's built tiny model
    lines: list[str] = []
    tally = Faults(tmp_path, SEED, log=lines.append).run(ROUNDS)
    report = "\n".join(lines)
    assert tally.problems == [], report
    assert tally.bad_caches == 0 and tally.stray_files == 0
    assert tally.rounds == tally.kills == ROUNDS
    # The kills must land mid-operation, or the test proves nothing.
    assert tally.killed_before_answer >= ROUNDS // 4, report
