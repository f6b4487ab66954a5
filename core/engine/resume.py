"""Resume: what each party of a simulated run saves after a round, and restores on ``fedcore run --resume``.

The format is :mod:`fedcore.checkpoint`'s. The coordinator's side (global model,
aggregator and central-DP state, server random state, ledger head, the round's record)
is :meth:`fedcore.engine.simulation.FederatedRun.save_checkpoint`; a site's side is
here: its :class:`~fedcore.engine.site.SiteRuntime` state (every stage's state --
accountant, control variates, noise keys -- and its generator), written into the
site's own folder as it releases its update, read back by that site only.

Privacy rule (docs/reliability.md, "Resume"): a site that released an update in a
round the coordinator never completed holds a part newer than the round the run
resumes from. The site restores everything from the resume round except its
accountants, which it takes from its newest part: the abandoned round stays charged
and the redone round is charged again, so resume never under-counts.

Finished trainings are kept as ``RUN/checkpoints/<training>/result.json`` (their
records, ledger summary, audits): a resumed run reports them without training them again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from fedcore.checkpoint import CheckpointError, CheckpointLayout, load_site, save_site, site_rounds
from fedcore.rundir import atomic_write_text
from fedcore.types import RoundRecord

RESULT_FILE = "result.json"
RESULT_FORMAT = "fedcore-training-result/1"


class _Site(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def save_site_part(layout: CheckpointLayout, name: str, round: int, site: _Site) -> bool:
    """The site's own part of ``round``: its runtime's state, in its own folder, not yet flushed.

    Returns whether the part holds an accountant: it is then the site's record of privacy
    spent, and must be flushed to the disk (:func:`fedcore.checkpoint.flush_to_disk`)
    before the update leaves the site, so that no trace of a release outlives it.
    """
    state = site.state_dict()
    save_site(layout, name, round, {"runtime": state}, durable=False)
    return any(isinstance(stage, dict) and "accountant" in stage for stage in state["stages"])


def restore_site(layout: CheckpointLayout, name: str, round: int, site: _Site) -> int:
    """Restore ``site`` from its part of ``round``, charging any round it released after it (see the module).

    Returns the round whose accountants the site now holds (``round``, or a newer one).
    """
    state = load_site(layout, name, round)["runtime"]
    charged_round = round
    for newer in reversed([r for r in site_rounds(layout, name) if r > round]):
        try:
            state = charged(state, load_site(layout, name, newer)["runtime"])
        except CheckpointError:
            continue  # damaged: an older readable one is the best record left
        charged_round = newer
        break
    site.load_state_dict(state)
    return charged_round


def charged(state: dict[str, Any], newer: dict[str, Any]) -> dict[str, Any]:
    """``state`` with every stage's ``accountant`` taken from ``newer`` (the same site's later part)."""
    stages = []
    for own, later in zip(state["stages"], newer["stages"], strict=True):
        if isinstance(later, dict) and "accountant" in later and isinstance(own, dict):
            own = {**own, "accountant": later["accountant"]}
        stages.append(own)
    return {**state, "stages": stages}


# ------------------------------------------------------------ finished trainings


def save_result(layout: CheckpointLayout, result: Any) -> Path:
    """Mark a training finished: what the summary needs of it (the final weights are saved beside it)."""
    path = layout.coordinator_dir / RESULT_FILE
    payload = {
        "format": RESULT_FORMAT,
        "training": layout.key,
        "arm": result.arm,
        "repeat": result.repeat,
        "mode": result.mode,
        "records": [json.loads(r.model_dump_json()) for r in result.records],
        "wall_seconds": result.wall_seconds,
        "ledger": result.ledger,
        "stopped_reason": result.stopped_reason,
        "audits": result.audits,
    }
    atomic_write_text(path, json.dumps(payload, default=str) + "\n")
    return path


def load_result(layout: CheckpointLayout) -> Any | None:
    """A finished training's result (:func:`save_result`), or None when it did not finish."""
    from fedcore.engine.simulation import RunResult

    path = layout.coordinator_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        if saved.get("format") != RESULT_FORMAT or saved.get("training") != layout.key:
            raise ValueError("another training's or format's result")
        return RunResult(
            arm=saved["arm"],
            repeat=saved["repeat"],
            mode=saved["mode"],
            records=[RoundRecord.model_validate(r) for r in saved["records"]],
            wall_seconds=float(saved["wall_seconds"]),
            ledger=saved["ledger"],
            stopped_reason=saved["stopped_reason"],
            audits=saved["audits"],
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is unusable: {str(exc).splitlines()[0][:200]}") from None
