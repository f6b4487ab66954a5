"""The coordinator's checkpoint after every completed round, in the simulation's format (:mod:`fedcore.checkpoint`).

The coordinator's part of each round goes to ``RUN/checkpoints/federated-main-r<repeat>/round-NNNNNN.pt``,
as a simulated run's does: the global weights, the aggregator's and central privacy
mechanisms' state, the server's random state, the ledger's head and which sites took
part (and which did not). The sites' parts (accountant, control variates, generator,
their last release) stay on each hospital's own disk, keyed by the study's run id
(:class:`fedcore.plugins.deploy.site.SiteStore`): the coordinator never holds them, so
its last complete round is the last round of its own part.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedcore.checkpoint import CheckpointLayout, last_complete_round, load_coordinator, prune, save_coordinator, training_key, weights_state


class CoordinatorCheckpoint:
    """Save and load the coordinator's state of one repeat."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def layout(self, repeat: int) -> CheckpointLayout:
        return CheckpointLayout(self.run_dir, training_key("federated", "main", repeat))

    def save(self, repeat: int, round_: int, run: Any) -> None:
        layout = self.layout(repeat)
        state = {
            "weights": weights_state(run.server.weights),
            "aggregator": run.components.aggregator.state_dict(),
            "privacy": [getattr(m, "state_dict", dict)() for m in run.server.privacy],
            "server_rng": run.server.rng.bit_generator.state,
            "ledger_head": run.ledger_head,
            "sites": [s.name for s in run.present],
            "absent_sites": list(run.absent),
        }
        save_coordinator(layout, round_, state)
        prune(layout, [], keep=1)

    def load(self, repeat: int) -> dict[str, Any] | None:
        """The newest part that reads back, with its ``round``; None when there is none."""
        layout = self.layout(repeat)
        last = last_complete_round(layout, [])
        if last is None:
            return None
        return {**load_coordinator(layout, last), "round": last}
