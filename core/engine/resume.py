"""Resume: what each party of a simulated run saves after a round, and restores on ``fedcore run --resume``.

The format is :mod:`fedcore.checkpoint`'s. The coordinator's side (global model,
aggregator and central-DP state, server random state, ledger head, the round's record)
is :meth:`fedcore.engine.simulation.FederatedRun.save_checkpoint`; a site's side is
here: its :class:`~fedcore.engine.site.SiteRuntime` state (every stage's state --
accountant, control variates, noise keys -- and its generator), written into the
site's own folder as it releases its update, read back by that site only.

Privacy rule (docs/reliability.md, "Resume"): a site that released an update in a
round the coordinator never completed holds a part newer than the round the run
resumes from. Asked again for that round with the same request (the coordinator
restored the same state), it sends the same update again (:class:`Replay`: free under
DP, as in a deployment). Otherwise it keeps its newest part's accountants
(:func:`charged`): the lost round stays charged and a redone round is charged again.
Either way resume never under-counts.

Finished trainings are kept as ``RUN/checkpoints/<training>/result.json`` (their
records, ledger summary, audits): a resumed run reports them without training them again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fedcore.checkpoint import (
    CheckpointError,
    CheckpointLayout,
    load_site,
    save_site,
    site_rounds,
    weights_from_state,
    weights_state,
)
from fedcore.rundir import atomic_write_text
from fedcore.types import ClientUpdate, GlobalModel, RoundRecord, Weights

RESULT_FILE = "result.json"
RESULT_FORMAT = "fedcore-training-result/1"


class _Site(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def request_digest(message: GlobalModel, extras: Mapping[str, Weights]) -> str:
    """SHA-256 of a training request: the round, the global weights and every extra by name."""
    digest = hashlib.sha256(str(message.round).encode() + message.weights.to_bytes())
    for name in sorted(extras):
        digest.update(name.encode() + extras[name].to_bytes())
    return digest.hexdigest()


def save_site_part(
    layout: CheckpointLayout, name: str, round: int, site: _Site, released: tuple[str, ClientUpdate] | None = None
) -> bool:
    """The site's own part of ``round``: its runtime's state and what it released, in its own folder, not yet flushed.

    :param released: the round's request digest (:func:`request_digest`) and the update the
        site released for it (a resumed run that asks again for that round gets it again).

    Returns whether the part holds an accountant: it is then the site's record of privacy
    spent, and must be flushed to the disk (:func:`fedcore.checkpoint.flush_to_disk`)
    before the update leaves the site, so that no trace of a release outlives it.
    """
    state = site.state_dict()
    part: dict[str, Any] = {"runtime": state}
    if released is not None:
        request, update = released
        part["released"] = {
            "round": update.round,
            "request_sha256": request,
            "update": update.model_dump(mode="python", exclude={"delta", "extras"}),
            "delta": weights_state(update.delta),
            "extras": {key: weights_state(w) for key, w in update.extras.items()},
        }
    save_site(layout, name, round, part, durable=False)
    return any(isinstance(stage, dict) and "accountant" in stage for stage in state["stages"])


@dataclass(frozen=True)
class Replay:
    """What a site released in the round after the one a run resumes from (the coordinator lost it).

    Asked again for that round with the same request, the site sends the same update and
    takes the state it had after it: a replay of a release is free under DP
    (post-processing), where training anew would spend the round's budget twice.
    """

    round: int
    request_sha256: str
    state: dict[str, Any]
    released: dict[str, Any]

    def update(self) -> ClientUpdate:
        r = self.released
        delta = weights_from_state(r["delta"])
        extras = {key: weights_from_state(w) for key, w in r["extras"].items()}
        return ClientUpdate(**r["update"], delta=delta, extras=extras)


def restore_site(layout: CheckpointLayout, name: str, round: int, site: _Site) -> Replay | None:
    """Restore ``site`` from its part of ``round``; what it released after, to replay or to charge.

    The site's newest readable part after ``round``: of ``round + 1`` with its release, a
    :class:`Replay` (the site stays at ``round``'s state until it is asked again); of a
    later round (the parts between were damaged), its accountants are taken now
    (:func:`charged`): that release stays charged and the redone rounds are charged again.
    """
    state = load_site(layout, name, round)["runtime"]
    replay = None
    for newer in reversed([r for r in site_rounds(layout, name) if r > round]):
        try:
            part = load_site(layout, name, newer)
        except CheckpointError:
            continue  # damaged: an older readable one is the best record left
        released = part.get("released")
        if newer == round + 1 and released is not None:
            replay = Replay(newer, released["request_sha256"], part["runtime"], released)
        else:
            state = charged(state, part["runtime"])
        break
    site.load_state_dict(state)
    return replay


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
