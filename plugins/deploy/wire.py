"""What crosses the wire between the coordinator and a site, as Flower records.

Every message is a Flower ``RecordDict`` holding one ``ConfigRecord``: the
metadata as JSON text of fedcore's typed boundary models, and each tensor group
(a :class:`~fedcore.types.Weights`: the global model, an update's delta, extras)
as one losslessly compressed buffer with its layout (names, dtypes, shapes) as
JSON. The receiver rebuilds the arrays bit for bit, so digests of their
canonical bytes are the same on both sides. One record keeps Flower's object
tree, and so its requests, to three per message. Decoding validates against the
typed models and the expected tensor layout; anything else (a buffer that does
not inflate to its declared size included) is a :class:`MalformedMessage`
naming the site.

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
import lzma
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
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


#: How a tensor group's buffer is compressed: each array's bytes grouped by byte plane (byte-shuffle), then
#: LZMA2 as a raw stream (no container: the layout gives the size; the digests that matter are over the
#: decoded arrays). ``lc=lp=pb=0``: shuffled floats have no structure by byte position. On the paper MLP this
#: is 0.86 of the raw size (zlib: 0.89); only the exponent planes compress. The 1 MiB dictionary bounds the
#: memory a decoder needs.
LZMA_FILTERS = ({"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": 1 << 20, "lc": 0, "lp": 0, "pb": 0},)
#: Numpy kinds a tensor group may declare (bool, signed and unsigned integers, floats); anything else is refused.
_KINDS = frozenset("biuf")


def _planes(raw: bytes, itemsize: int) -> bytes:
    """``raw``'s bytes grouped by plane: byte 0 of every item, then byte 1, ... (lossless; the exponent planes then compress)."""
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize).T.tobytes()


def _unplanes(planes: bytes, itemsize: int) -> bytes:
    return np.frombuffer(planes, dtype=np.uint8).reshape(itemsize, -1).T.tobytes()


def encode_weights(weights: Weights) -> tuple[list[list[Any]], bytes]:
    """A tensor group as one compressed buffer and its layout (``[name, dtype, shape]`` per array, in order).

    The buffer is LZMA2 (:data:`LZMA_FILTERS`) over the byte planes of each array's little-endian
    C-order bytes; :func:`decode_weights` rebuilds the arrays bit for bit, so digests of their
    canonical bytes are the same on both sides.
    """
    layout: list[list[Any]] = []
    planes: list[bytes] = []
    for name, array in weights.arrays.items():
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))  # 0-d arrays come back 1-d
        layout.append([name, little.dtype.str, list(np.shape(array))])
        planes.append(_planes(little.tobytes(), little.dtype.itemsize))
    return layout, lzma.compress(b"".join(planes), format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)


def _declared(layout: Any) -> list[tuple[str, np.dtype, tuple[int, ...], int]]:
    """``layout`` checked: names, numeric little-endian dtypes, non-negative shapes; each array's byte size."""
    if not isinstance(layout, list):
        raise ValueError("tensor layout is not a list")
    out = []
    names: set[str] = set()
    for entry in layout:
        name, dtype_str, shape = entry
        if name in names:
            raise ValueError(f"tensor {name!r} declared twice")
        names.add(name)
        dtype = np.dtype(str(dtype_str))
        if not isinstance(name, str) or dtype.kind not in _KINDS or dtype.byteorder == ">" or dtype.itemsize > 8:
            raise ValueError(f"tensor {name!r} declares dtype {dtype_str!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError(f"tensor {name!r} declares shape {shape!r}")
        out.append((name, dtype, tuple(shape), int(np.prod(shape, dtype=object)) * dtype.itemsize))
    return out


def declared_bytes(layout: Any) -> int:
    """Decoded size a layout declares (bytes); raises ``ValueError`` for a malformed layout."""
    return sum(size for *_, size in _declared(layout))


def decode_weights(layout: Any, blob: bytes) -> Weights:
    """The tensor group :func:`encode_weights` made; ``blob`` must inflate to exactly the declared size.

    Decompression stops one byte past the declared size, so a stream that would inflate further
    (a compression bomb) costs no more memory than the layout declares; it, a short or corrupt stream and
    trailing bytes all raise ``ValueError``.
    """
    arrays = _declared(layout)
    size = sum(n for *_, n in arrays)
    inflater = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
    planes = inflater.decompress(blob, size + 1)
    if len(planes) != size or not inflater.eof or inflater.unused_data:
        raise ValueError(f"tensor bytes do not inflate to the {size} bytes their layout declares")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, dtype, shape, n in arrays:
        raw = _unplanes(planes[offset : offset + n], dtype.itemsize)
        out[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
        offset += n
    return Weights(arrays=out)


def encode_items(meta: Mapping[str, Any], tensors: Mapping[str, Weights] | None = None) -> dict[str, Any]:
    """The fields of a message's one record: ``json`` (the metadata), ``layout`` and ``w:<group>`` per tensor group.

    Each tensor group is one compressed buffer (:func:`encode_weights`); ``layout`` holds every group's
    layout as JSON. Also the config of a SecAgg+ round's ``FitIns`` (:mod:`fedcore.plugins.deploy.secagg`).
    """
    items: dict[str, Any] = {"json": json.dumps(meta, sort_keys=True, default=str)}
    layouts: dict[str, list[list[Any]]] = {}
    for name, weights in (tensors or {}).items():
        layouts[name], items[f"w:{name}"] = encode_weights(weights)
    if layouts:
        items["layout"] = json.dumps(layouts, separators=(",", ":"))
    return items


def pack(meta: Mapping[str, Any], tensors: Mapping[str, Weights] | None = None) -> RecordDict:
    """A message: JSON metadata plus named tensor groups, all in one ``ConfigRecord`` (:func:`encode_items`).

    One record keeps Flower's object tree at three objects (message, record dict, record): Flower's
    transport moves each object with its own HTTP request, about 1.3 KB of headers each.
    """
    return RecordDict({META: ConfigRecord(encode_items(meta, tensors))})


def message_bytes(content: RecordDict) -> int:
    """Bytes of tensors and metadata in ``content`` as sent (what the size limit counts before decoding)."""
    total = 0
    for record in content.values():
        total += record.count_bytes()
    return total


def _too_big(site: str, size: int, max_bytes: int, how: str = "") -> MalformedMessage:
    return MalformedMessage(
        f"site '{site}' sent a {size}-byte message{how}, above the {max_bytes}-byte limit: refused "
        "(check that site's fedcore version and spec)"
    )


def _malformed(site: str, exc: Exception) -> MalformedMessage:
    return MalformedMessage(
        f"site '{site}' sent a malformed message ({type(exc).__name__}: {str(exc)[:120]}): refused "
        "(check that site's fedcore version)"
    )


def decode_items(
    items: Mapping[str, Any], site: str, max_bytes: int = MAX_MESSAGE_BYTES
) -> tuple[dict[str, Any], dict[str, Weights]]:
    """The metadata and tensor groups :func:`encode_items` made; the decoded size (from the layout, before
    anything is inflated) must stay within ``max_bytes``. Anything else is a :class:`MalformedMessage`."""
    try:
        meta = json.loads(str(items["json"]))
        if not isinstance(meta, dict):
            raise ValueError("metadata is not an object")
        layouts = json.loads(str(items["layout"])) if "layout" in items else {}
        if not isinstance(layouts, dict):
            raise ValueError("tensor layout is not an object")
        unknown = set(items) - {"json", "layout", *(f"w:{name}" for name in layouts)}
        if unknown:
            raise ValueError(f"unexpected fields {sorted(unknown)}")
        decoded = len(str(items["json"])) + sum(declared_bytes(layout) for layout in layouts.values())
        if decoded > max_bytes:
            raise _too_big(site, decoded, max_bytes, " once decoded")
        tensors = {name: decode_weights(layout, bytes(items[f"w:{name}"])) for name, layout in layouts.items()}
    except MalformedMessage:
        raise
    except Exception as exc:  # any decoding failure is the site's message, not our bug
        raise _malformed(site, exc) from exc
    return meta, tensors


def unpack(content: RecordDict, site: str, max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[dict[str, Any], dict[str, Weights]]:
    """The metadata and tensor groups of a message from ``site``; malformed or oversized is refused.

    The limit applies to the message as sent and again to its decoded size (:func:`decode_items`).
    """
    try:
        size = message_bytes(content)
        if list(content) != [META] or not isinstance(content[META], ConfigRecord):
            raise ValueError(f"records {sorted(content)}, expected one ConfigRecord '{META}'")
    except Exception as exc:  # Flower's own accounting refuses some values (an empty bytes field)
        raise _malformed(site, exc) from exc
    if size > max_bytes:
        raise _too_big(site, size, max_bytes)
    return decode_items(content[META], site, max_bytes)


def plain_bytes(content: RecordDict) -> bytes:
    """What ``content`` says, decoded: each record's fields as JSON and each tensor group's canonical
    bytes (fedcore's compressed groups inflated, Flower's arrays as they are): what a site's audit keeps."""
    chunks = []
    for record in content.values():
        if isinstance(record, ConfigRecord):
            chunks.append(json.dumps({k: v.hex() if isinstance(v, bytes) else v for k, v in record.items()}, default=str).encode())
            if "layout" in record:  # one of fedcore's records (encode_items)
                chunks += [weights.to_bytes() for weights in decode_items(record, "this site")[1].values()]
        elif isinstance(record, ArrayRecord):
            chunks += [array.numpy().tobytes() for array in record.values()]
    return b"".join(chunks)


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
