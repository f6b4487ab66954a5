"""What crosses the wire between the coordinator and a site, as Flower records.

Every message is a Flower ``RecordDict``: tensors as ``ArrayRecord`` (numpy
arrays, dtype kept, so digests of the canonical bytes are the same on both
sides), everything else as JSON text of fedcore's typed boundary models in a
``ConfigRecord``. Decoding validates against those models and the expected
tensor layout; anything else is a :class:`MalformedMessage` naming the site.

The fields that leave a site, by message (see docs/deployment.md):

========== ============================================================== ======================
message    fields                                                          privacy
========== ============================================================== ======================
hello      site name, signing-key fingerprint                               public
summary    SiteSummary (counts, sums, squares, category counts), present    released outside DP
           classes, column names and types, max rows per patient            (listed in report)
train      ClientUpdate (delta, extras, n_samples, steps, loss, seconds),  delta inside the
           PrivacySpent, site signature over the update statement          guarantee; the rest
                                                                            released outside it
evaluate   SiteEvaluation (metrics and confusion counts)                   released outside DP
========== ============================================================== ======================
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from pydantic import BaseModel, ValidationError

from fedcore.errors import RunFailure
from fedcore.types import ClientUpdate, Weights

#: The largest message a site may send (bytes, tensors and JSON together); larger is refused.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
META = "meta"
#: When set (benchmarks/deployment.py sets it), the sites and the coordinator append one JSON line per
#: message to ``<dir>/<who>.jsonl``: when it was created, each process phase, when the reply came back.
TIMINGS_ENV = "FEDCORE_DEPLOY_TIMINGS"


def note_timing(who: str, line: Mapping[str, Any]) -> None:
    """Append ``line`` to ``who``'s timing file when :data:`TIMINGS_ENV` names a folder; else nothing."""
    folder = os.environ.get(TIMINGS_ENV)
    if folder:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{who}.jsonl"), "a") as handle:
            handle.write(json.dumps(line) + "\n")


class MalformedMessage(RunFailure):
    """A site sent a message that does not decode to what the protocol expects."""


def weights_record(weights: Weights) -> ArrayRecord:
    return ArrayRecord({name: Array.from_numpy_ndarray(np.asarray(a)) for name, a in weights.arrays.items()})


def record_weights(record: ArrayRecord) -> Weights:
    return Weights(arrays={name: array.numpy() for name, array in record.items()})


def pack(meta: Mapping[str, Any], tensors: Mapping[str, Weights] | None = None) -> RecordDict:
    """A message: JSON metadata plus named tensor groups."""
    content = RecordDict({META: ConfigRecord({"json": json.dumps(meta, sort_keys=True, default=str)})})
    for name, weights in (tensors or {}).items():
        content[f"w:{name}"] = weights_record(weights)
    return content


def message_bytes(content: RecordDict) -> int:
    """Bytes of tensors and metadata in ``content`` (what the size limit counts)."""
    total = 0
    for record in content.values():
        total += record.count_bytes()
    return total


def unpack(content: RecordDict, site: str, max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[dict[str, Any], dict[str, Weights]]:
    """The metadata and tensor groups of a message from ``site``; malformed or oversized is refused."""
    try:
        size = message_bytes(content)
        if size > max_bytes:
            raise MalformedMessage(
                f"site '{site}' sent a {size}-byte message, above the {max_bytes}-byte limit: refused "
                "(check that site's fedcore version and spec)"
            )
        meta = json.loads(str(content[META]["json"]))
        if not isinstance(meta, dict):
            raise ValueError("metadata is not an object")
        tensors = {key[2:]: record_weights(rec) for key, rec in content.items() if key.startswith("w:")}
    except MalformedMessage:
        raise
    except Exception as exc:  # any decoding failure is the site's message, not our bug
        raise MalformedMessage(
            f"site '{site}' sent a malformed message ({type(exc).__name__}: {str(exc)[:120]}): refused "
            "(check that site's fedcore version)"
        ) from exc
    return meta, tensors


def parse_model(model: type[BaseModel], value: Any, site: str, what: str) -> Any:
    """``value`` validated as ``model``; a :class:`MalformedMessage` naming the site otherwise."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise MalformedMessage(
            f"site '{site}' sent a malformed {what} ({'.'.join(str(p) for p in first['loc'])}: {first['msg']}): refused "
            "(check that site's fedcore version)"
        ) from exc


def check_layout(weights: Weights, template: Weights, site: str, what: str) -> None:
    """Refuse tensors whose names, shapes or dtypes differ from ``template``'s."""
    expected = [(n, a.shape, a.dtype.str) for n, a in template.arrays.items()]
    got = [(n, a.shape, a.dtype.str) for n, a in weights.arrays.items()]
    if expected != got:
        raise MalformedMessage(
            f"site '{site}' sent a {what} whose tensors do not match the model ({len(got)} tensors, expected "
            f"{len(expected)}): refused (check that site's fedcore version and spec)"
        )
    for name, array in weights.arrays.items():
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise MalformedMessage(f"site '{site}' sent a {what} with non-finite values in '{name}': refused")


def update_message(update: ClientUpdate, extra_meta: Mapping[str, Any]) -> RecordDict:
    meta = {**update.model_dump(mode="json", exclude={"delta", "extras"}), **extra_meta}
    return pack(meta, {"delta": update.delta, **{f"extra:{k}": v for k, v in update.extras.items()}})


def parse_update(content: RecordDict, site: str, template: Weights) -> tuple[ClientUpdate, dict[str, Any]]:
    """A site's released update, checked against the model's layout, and the rest of its metadata."""
    meta, tensors = unpack(content, site)
    if "delta" not in tensors:
        raise MalformedMessage(f"site '{site}' sent an update without a delta: refused (check that site's fedcore version)")
    check_layout(tensors["delta"], template, site, "update")
    fields = {k: meta.pop(k) for k in list(meta) if k in ClientUpdate.model_fields and k not in {"delta", "extras"}}
    extras = {k[len("extra:") :]: v for k, v in tensors.items() if k.startswith("extra:")}
    update = parse_model(ClientUpdate, {**fields, "delta": tensors["delta"], "extras": extras}, site, "update")
    return update, meta
