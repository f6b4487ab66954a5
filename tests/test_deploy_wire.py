"""Deployment wire format: tensor groups as one compressed buffer each, rebuilt bit for bit; bad buffers refused."""

from __future__ import annotations

import json
import lzma

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the deploy extra (flwr) is not installed")

from flwr.app import ArrayRecord, ConfigRecord, RecordDict  # noqa: E402

from fedcore.plugins.deploy.wire import (  # noqa: E402
    LZMA_FILTERS,
    META,
    MalformedMessage,
    encode_weights,
    message_bytes,
    pack,
    parse_update,
    plain_bytes,
    unpack,
    update_message,
)
from fedcore.types import ClientUpdate, Weights  # noqa: E402


def _paper_mlp(seed: int = 0) -> Weights:
    """The paper MLP's layout (13 features, hidden 128-64-32, 2 classes: 15,427 float32), trained-looking values."""
    rng = np.random.default_rng(seed)
    sizes = [13, 128, 64, 32, 2]
    arrays = {}
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        arrays[f"net.{2 * i}.weight"] = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
        arrays[f"net.{2 * i}.bias"] = (rng.standard_normal(n_out) * 0.05).astype(np.float32)
    return Weights(arrays=arrays)


def _update(delta: Weights) -> ClientUpdate:
    return ClientUpdate(site=1, round=2, delta=delta, n_samples=40, local_steps=3, train_loss=0.5)


def test_tensor_groups_round_trip_bit_for_bit() -> None:
    rng = np.random.default_rng(7)
    odd = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -3.4e38, 1.0], dtype=np.float32)  # signed zero, subnormal
    groups = {
        "f32": Weights(arrays={"w": rng.standard_normal((5, 3)).astype(np.float32), "odd": odd}),
        "f64": Weights(arrays={"w": rng.standard_normal(7), "scalar": np.array(2.5)}),
        "ints": Weights(arrays={"i64": np.arange(-4, 5, dtype=np.int64), "i32": np.array([[1, -2]], dtype=np.int32),
                                "u8": np.array([0, 255], dtype=np.uint8), "flag": np.array([True, False])}),
        "empty-array": Weights(arrays={"none": np.zeros((0, 3), dtype=np.float32)}),
        "empty": Weights(arrays={}),
        "big-endian-in": Weights(arrays={"w": np.arange(4, dtype=">f4")}),  # sent little-endian, same canonical bytes
    }
    meta, decoded = unpack(pack({"round": 3}, groups), "hospital-0")
    assert meta == {"round": 3} and list(decoded) == list(groups)
    for name, weights in groups.items():
        got = decoded[name]
        assert got.to_bytes() == weights.to_bytes(), name  # names, dtypes, shapes and every bit
        assert got.sha256() == weights.sha256()
        for key, array in weights.arrays.items():
            assert got[key].shape == array.shape and got[key].dtype == array.dtype.newbyteorder("<")


def test_a_message_is_one_record_and_the_model_is_smaller_on_the_wire() -> None:
    model = _paper_mlp()
    content = pack({"round": 1}, {"global": model})
    assert list(content) == [META] and isinstance(content[META], ConfigRecord)  # message, record dict, one record
    assert message_bytes(content) < 0.95 * model.nbytes()  # the exponent plane compresses; the rest is kept exactly
    update = _update(_paper_mlp(1) - model)
    decoded, rest = parse_update(update_message(update, {"signature": "s"}), "hospital-1", model)
    assert decoded.digest() == update.digest() and rest == {"signature": "s"}


def _tampered(update: ClientUpdate, **fields: object) -> RecordDict:
    content = update_message(update, {})
    record = content[META]
    for key, value in fields.items():
        record[key.replace("__", ":")] = value  # type: ignore[assignment]
    return content


def _layout(content: RecordDict) -> dict:
    return json.loads(str(content[META]["layout"]))


def test_layout_mismatch_and_non_finite_values_are_refused_naming_the_site() -> None:
    model = _paper_mlp()
    update = _update(model.scale(0.01))
    other = Weights(arrays={k: v for k, v in list(model.arrays.items())[:-1]})
    with pytest.raises(MalformedMessage, match="site 'hospital-1'.*do not match"):
        parse_update(update_message(update, {}), "hospital-1", other)
    reshaped = Weights(arrays={k: (v.reshape(-1) if k.endswith("0.weight") else v) for k, v in model.arrays.items()})
    with pytest.raises(MalformedMessage, match="site 'hospital-1'.*do not match"):
        parse_update(update_message(_update(reshaped), {}), "hospital-1", model)
    as64 = model.map(lambda a: a.astype(np.float64))
    with pytest.raises(MalformedMessage, match="site 'hospital-1'.*do not match"):
        parse_update(update_message(_update(as64), {}), "hospital-1", model)
    poisoned = {k: v.copy() for k, v in model.arrays.items()}
    poisoned["net.4.weight"][3, 5] = np.inf
    nan = _update(Weights(arrays=poisoned))
    with pytest.raises(MalformedMessage, match="site 'hospital-1'.*non-finite"):
        parse_update(update_message(nan, {}), "hospital-1", model)


def test_bad_compressed_bytes_are_refused_naming_the_site() -> None:
    model = _paper_mlp()
    update = _update(model.scale(0.01))
    blob = bytes(update_message(update, {})[META]["w:delta"])  # type: ignore[arg-type]
    for bad in (blob[:-9], blob[: len(blob) // 2], b"not an lzma stream", b"", blob + b"trailing", blob[:2] + bytes(50) + blob[52:]):
        with pytest.raises(MalformedMessage, match="site 'hospital-1' sent a malformed message"):
            parse_update(_tampered(update, w__delta=bad), "hospital-1", model)


def test_a_declared_size_lie_is_refused_naming_the_site() -> None:
    model = _paper_mlp()
    update = _update(model.scale(0.01))
    content = update_message(update, {})
    for change in (+1, -1):  # the layout declares one row more (or fewer) than the buffer inflates to
        layout = _layout(content)
        layout["delta"][0][2][0] += change
        with pytest.raises(MalformedMessage, match="site 'hospital-1'.*do not inflate to the"):
            unpack(_tampered(update, layout=json.dumps(layout)), "hospital-1")
    for field, value in (("dtype", "|O"), ("dtype", ">f4"), ("dtype", "<U4"), ("shape", [-1, 13]), ("shape", [1.5])):
        layout = _layout(content)
        layout["delta"][0][1 if field == "dtype" else 2] = value
        with pytest.raises(MalformedMessage, match="site 'hospital-1' sent a malformed message"):
            unpack(_tampered(update, layout=json.dumps(layout)), "hospital-1")
    layout = _layout(content)
    layout["delta"][1][0] = layout["delta"][0][0]
    with pytest.raises(MalformedMessage, match="site 'hospital-1'.*declared twice"):
        unpack(_tampered(update, layout=json.dumps(layout)), "hospital-1")
    with pytest.raises(MalformedMessage, match="site 'hospital-1'.*unexpected fields"):
        unpack(_tampered(update, w__ghost=b"x"), "hospital-1")
    extra = update_message(update, {})
    extra["more"] = ArrayRecord()
    with pytest.raises(MalformedMessage, match="site 'hospital-1'.*records"):
        unpack(extra, "hospital-1")


def test_a_compression_bomb_or_an_oversized_declaration_is_refused_without_inflating_it() -> None:
    update = _update(Weights(arrays={"w": np.zeros(6, dtype=np.float32)}))
    # 100 MiB of zeros (above MAX_MESSAGE_BYTES) squeezed into 15 KB, declared as the 24 bytes it claims to be: inflation stops at 25 bytes
    bomb = lzma.compress(bytes(100 * 1024 * 1024), format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
    with pytest.raises(MalformedMessage, match="site 'hospital-1'.*do not inflate to the 24 bytes"):
        unpack(_tampered(update, w__delta=bomb), "hospital-1")
    # ... or declared as what it inflates to: above the limit on the decoded size, refused before inflating
    huge = {"delta": [["w", "<f4", [64 * 1024 * 1024]]]}
    with pytest.raises(MalformedMessage, match="site 'hospital-1' sent a [0-9]+-byte message once decoded, above the 1000000-byte limit"):
        unpack(_tampered(update, w__delta=bomb, layout=json.dumps(huge)), "hospital-1", max_bytes=1_000_000)
    # the limit still applies to the bytes as sent
    with pytest.raises(MalformedMessage, match="site 'hospital-1' sent a [0-9]+-byte message, above the 100-byte limit"):
        unpack(update_message(_update(_paper_mlp()), {}), "hospital-1", max_bytes=100)


def test_the_site_audit_sees_through_the_compression() -> None:
    """The audit a hospital keeps of what it sent holds each tensor group's decoded canonical bytes
    (a planted value would not show inside a compressed buffer)."""
    canary = np.float32(98765.4321)
    delta = Weights(arrays={"w": np.full(64, canary, dtype=np.float32)})
    content = update_message(_update(delta), {"note": "x"})
    assert canary.tobytes() not in bytes(content[META]["w:delta"])  # type: ignore[arg-type]
    audit = plain_bytes(content)
    assert delta.to_bytes() in audit and b'"note\\": \\"x\\"' in audit
    layout, _ = encode_weights(delta)
    assert layout == [["w", "<f4", [64]]]


def test_a_secagg_round_carries_fedcore_s_groups_in_the_fitins_config_and_replies_the_update_as_parameters() -> None:
    """The site half of a SecAgg+ round on a ``FitIns`` built as the coordinator's strategy builds it
    (Flower's mod, which masks the reply's parameters, is not run here: tests/test_deploy_e2e.py runs it)."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import Message
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.supercore.task_identity import TaskIdentity

    from fedcore.plugins.deploy.secagg import secure_train_reply
    from fedcore.plugins.deploy.wire import encode_items

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    model, extra = _paper_mlp(), Weights(arrays={"c": np.arange(3.0)})
    config = encode_items({"round": 2, "global_sha256": model.sha256()}, {"global": model, "extra:cv": extra})
    message = Message(compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters([]), config), True), dst_node_id=5, message_type="train")
    message.metadata.__dict__["_message_id"] = "m1"  # as Flower's grid does when it pushes
    seen: dict = {}
    update = _update(model.scale(0.5))

    def train(meta: dict, tensors: dict) -> tuple[dict, ClientUpdate]:
        seen.update(meta=meta, tensors=tensors)
        return {"signature": "s"}, update

    reply = compat.recorddict_to_fitres(secure_train_reply(message, train).content, True)
    assert seen["meta"] == {"round": 2, "global_sha256": model.sha256()}
    assert {k: v.to_bytes() for k, v in seen["tensors"].items()} == {"global": model.to_bytes(), "extra:cv": extra.to_bytes()}
    sent = parameters_to_ndarrays(reply.parameters)
    assert [a.tobytes() for a in sent] == [a.tobytes() for a in update.delta.arrays.values()]
    assert json.loads(str(reply.metrics["fedcore"]))["signature"] == "s"
    # a site that holds the model gets the round without it; a corrupt group is refused naming the coordinator
    held = encode_items({"round": 2}, {"extra:cv": extra})
    assert "w:global" not in held and "w:extra:cv" in held
    broken = {**config, "w:global": b"\x00" * 10}
    message = Message(compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters([]), broken), True), dst_node_id=5, message_type="train")
    with pytest.raises(MalformedMessage, match="site 'coordinator' sent a malformed message"):
        secure_train_reply(message, train)
