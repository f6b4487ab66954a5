"""``csv``: every round's metrics as one CSV row (the plugin guide's minimal observer)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel, ConfigDict, Field

from fedcore.components import Observer
from fedcore.types import RoundRecord


class CsvSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field("rounds.csv", description="the CSV file; a relative path is inside the run directory")


class CsvObserver(Observer[CsvSettings]):
    """Writes ``arm, repeat, mode, round, epoch, train_loss``, then ``<split>_<metric>`` for the
    validation and test splits (``evaluation.metrics`` included; undefined: empty) and the
    largest ε accounted so far (empty without DP)."""

    name = "csv"
    Settings = CsvSettings
    description = "every round's metrics as a CSV row"

    def __init__(self, settings: BaseModel | None = None) -> None:
        super().__init__(settings)
        self._file: TextIO | None = None
        self._writer: csv.DictWriter[str] | None = None

    def run_start(self, spec: Any, run_dir: Path, n_runs: int) -> None:
        path = Path(self.settings.path)
        self._file = (path if path.is_absolute() else run_dir / path).open("w", newline="")

    def round_end(self, record: RoundRecord) -> None:
        row: dict[str, Any] = {
            "arm": record.arm, "repeat": record.repeat, "mode": record.mode,
            "round": record.round, "epoch": record.epoch, "train_loss": record.train_loss,
        }
        for split in ("validation", "test"):
            metrics = getattr(record, split)
            row |= {f"{split}_{m}": getattr(metrics, m) for m in ("loss", "accuracy", "precision", "recall", "f1")}
            row |= {f"{split}_{k}": ("" if v is None else v) for k, v in metrics.scores.items()}
        row["epsilon"] = max((p.epsilon for p in record.privacy), default="")
        if self._file is None:
            return
        if self._writer is None:  # the columns of the first record (every record of a run has the same metrics)
            self._writer = csv.DictWriter(self._file, fieldnames=list(row), restval="", extrasaction="ignore")
            self._writer.writeheader()
        self._writer.writerow(row)
        self._file.flush()

    def run_end(self, summary: dict[str, Any], run_dir: Path) -> None:
        self._close()

    def run_failed(self, run_dir: Path, status: dict[str, Any]) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
