"""The coordinator's checkpoint after every completed round (deployment's own, minimal format).

Written atomically (temporary file, then rename) to ``RUN/checkpoints/deploy-r<repeat>.pt``:
the round, the global weights, the aggregator's and central privacy
mechanisms' state, the server's random state, the ledger's head and which
sites took part. The site's part (accountant, control variates, generator)
stays on the site's disk, keyed by the study's run id (:class:`fedcore.plugins.deploy.site.SiteStore`).

The reliability issue brings one checkpoint format for simulation and
deployment (``fedcore.checkpoint``); this module is the deployment's
stand-in until then, and the one place to re-point.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


class CoordinatorCheckpoint:
    """Save and load the coordinator's state of one repeat."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir) / "checkpoints"

    def path(self, repeat: int) -> Path:
        return self.dir / f"deploy-r{repeat}.pt"

    def save(self, repeat: int, round_: int, run: Any) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        ledger_head = None
        if run.ledger is not None and hasattr(run.ledger, "_last_hash"):
            ledger_head = f"{run.ledger._next_seq - 1}:{run.ledger._last_hash}"
        state = {
            "format": "fedcore-deploy-checkpoint-v1",
            "repeat": repeat,
            "round": round_,
            "weights": dict(run.server.weights.arrays),
            "aggregator": run.components.aggregator.state_dict(),
            "privacy": [getattr(m, "state_dict", dict)() for m in run.server.privacy],
            "server_rng": run.server.rng.bit_generator.state,
            "ledger_head": ledger_head,
            "sites": [s.name for s in run.present],
            "absent_sites": list(run.absent),
        }
        tmp = self.path(repeat).with_name(self.path(repeat).name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path(repeat))

    def load(self, repeat: int) -> dict[str, Any] | None:
        path = self.path(repeat)
        return torch.load(path, weights_only=False) if path.exists() else None
