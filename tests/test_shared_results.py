"""fedcore.cache.shared_results: the folder a run's processes share results in (PRV calibrations)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from fedcore import cache
from fedcore.plugins.privacy import accounting

BUDGET = {"target_epsilon": 1.0, "delta": 1e-5, "sample_rate": 0.02, "steps": 300, "accountant": "rdp", "eps_error": 0.01}


def test_a_run_gets_a_private_folder_removed_after_it() -> None:
    assert cache.shared_results() is None
    with cache.run_shared_results() as folder:
        assert cache.shared_results() == folder and folder.is_dir()
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700  # nobody else can plant a calibration
        with cache.run_shared_results() as inner:
            assert inner == folder  # a run inside a run (a sweep's arm) keeps the outer folder
        assert cache.shared_results() == folder
    assert cache.shared_results() is None and not folder.exists()


def test_a_worker_reads_the_calibration_its_parent_made() -> None:
    accounting.calibrate_noise_multiplier.cache_clear()
    try:
        with cache.run_shared_results() as folder:
            fresh = accounting.calibrate_noise_multiplier(**BUDGET)
            (file,) = (folder / "calibrations").glob("calibration-*.json")
            assert json.loads(file.read_text()) == {"noise_multiplier": fresh}
            # A worker: another process (an empty in-memory cache) given the parent's folder.
            # Proven to read the file by a planted value coming back.
            file.write_text(json.dumps({"noise_multiplier": 7.5}))
            accounting.calibrate_noise_multiplier.cache_clear()
            cache.share_results_in(folder)
            assert accounting.calibrate_noise_multiplier(**BUDGET) == 7.5
    finally:
        accounting.calibrate_noise_multiplier.cache_clear()
    assert accounting.calibrate_noise_multiplier(**BUDGET) == fresh  # outside a run: searched again
    accounting.calibrate_noise_multiplier.cache_clear()


def test_outside_a_run_nothing_is_written(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    accounting.calibrate_noise_multiplier.cache_clear()
    accounting.calibrate_noise_multiplier(**BUDGET)
    accounting.calibrate_noise_multiplier.cache_clear()
    assert not list(tmp_path.iterdir())
