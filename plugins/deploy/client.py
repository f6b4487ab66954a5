"""fedcore's ClientApp: what a hospital's SuperNode runs for each coordinator message.

Every message runs in a fresh ClientApp process (forked from fedcore's warm
executor, :mod:`fedcore.plugins.deploy.executor`, or started by Flower's own
SuperExec), so every handler reads the site's state from the site's own disk and
writes it back (atomically) before it replies. The site's data file comes from the SuperNode's ``--node-config
data=...``; nothing in it is ever sent. A user error at the site (bad file,
missing column) is replied as one line naming the site and the fix.
"""

from __future__ import annotations

import time

_IMPORT_STARTED = time.time()  # this module's imports (torch, Opacus, fedcore) start here: the timeline's first mark

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.client.mod import secaggplus_mod

from fedcore.plugins.deploy import site as site_mod
from fedcore.plugins.deploy.secagg import secure_train_reply
from fedcore.plugins.deploy.wire import note_timing, pack, plain_bytes, unpack, update_message
from fedcore.errors import FedcoreUserError
from fedcore.plugins.datasets.preprocessing import FederatedStatistics
from fedcore.plugins.privacy.accounting import calibrations_kept_in
from fedcore.registry import PluginManager
from fedcore.spec import ExperimentSpec, build_components, instantiate
from fedcore.types import GlobalModel

app = ClientApp()
_IMPORTED = time.time()


class _Timeline:
    """Wall-clock marks of one message at this site, written only when
    :data:`~fedcore.plugins.deploy.wire.TIMINGS_ENV` names a folder (benchmarks/deployment.py)."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []

    def start(self) -> None:
        self.marks = [("handler", time.time())]

    def mark(self, name: str) -> None:
        self.marks.append((name, time.time()))

    def write(self, site: str, kind: str, message: Message) -> None:
        note_timing(site, {
            "kind": kind, "pid": os.getpid(), "created": message.metadata.created_at,
            "process_start": _process_start(), "import_start": _IMPORT_STARTED, "imported": _IMPORTED,
            "marks": self.marks, "cpu_s": time.process_time(),
        })


def forked() -> None:
    """In a ClientApp process forked from fedcore's warm executor: this message imported nothing, its timeline starts now."""
    global _IMPORT_STARTED, _IMPORTED
    _IMPORT_STARTED = _IMPORTED = time.time()


def _process_start() -> float | None:
    """This process's start (epoch seconds, to the kernel's 10 ms tick; from /proc, None elsewhere)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # since boot
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


TIMELINE = _Timeline()

Handler = Callable[[site_mod.LoadedSite, dict[str, Any], dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]]


def _site_of(context: Context) -> site_mod.LoadedSite:
    path = context.node_config.get("data")
    if not path:
        raise FedcoreUserError(
            "the SuperNode was started without its site file", hint="start it with 'fedcore site start --data site.yaml'"
        )
    return site_mod.load_site_config(Path(str(path)))


#: When set, every reply this site sends is also written under this directory, decoded (JSON, and each tensor
#: group as its canonical bytes): a hospital's own audit of what leaves it (the tests look in it for planted canaries).
AUDIT_ENV = "FEDCORE_SITE_AUDIT_DIR"


def _audit(name: str, reply: Message) -> Message:
    folder = os.environ.get(AUDIT_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with open(Path(folder) / f"{name}-{os.getpid()}.bin", "ab") as handle:
            handle.write(plain_bytes(reply.content))  # decoded: a canary inside compressed tensors would not show
    return reply


def _handle(message: Message, context: Context, handler: Handler) -> Message:
    name = str(context.node_config.get("site", "?"))
    TIMELINE.start()
    try:
        return _reply(message, context, handler, name)
    finally:
        TIMELINE.mark("replied")
        TIMELINE.write(name, message.metadata.message_type, message)


def _reply(message: Message, context: Context, handler: Handler, name: str) -> Message:
    """The handler's reply to ``message``; ``name`` (the node's configured site) until the site is loaded."""
    try:
        site = _site_of(context)
        name = site.name
        meta, tensors = unpack(message.content, "coordinator")
        reply_meta, reply_tensors = handler(site, meta, tensors)
    except FedcoreUserError as exc:
        return _audit(name, Message(pack({"error": f"site '{name}': {exc}", "user_error": True}), reply_to=message))
    if "update" in reply_tensors:
        return _audit(name, Message(update_message(reply_tensors["update"], reply_meta), reply_to=message))
    return _audit(name, Message(pack(reply_meta, reply_tensors), reply_to=message))


def _hello(site: site_mod.LoadedSite, meta: dict[str, Any], tensors: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    return {"site": site.name, "signing_fingerprint": site.key_fingerprint()}, {}


def _summary(site: site_mod.LoadedSite, meta: dict[str, Any], tensors: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    prepared, roles, classes = site_mod.prepare(site, meta["options"], int(meta["seed"]), int(meta["index"]))
    rows = None
    if roles.patient_id is not None:
        rows = int(prepared.parts["train"]["__patient__"].value_counts().max())
    return {
        "site": site.name,
        "summary": prepared.summary.model_dump(mode="json"),
        "classes": classes,
        "continuous": list(roles.continuous),
        "categorical": list(roles.categorical),
        "max_rows_per_patient": rows,
    }, {}


def _preprocess(site: site_mod.LoadedSite, meta: dict[str, Any], tensors: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    stats = FederatedStatistics.model_validate(meta["statistics"])
    data, _ = site_mod.preprocess(site, meta["options"], int(meta["seed"]), int(meta["index"]), stats, list(meta["classes"]))
    store = site_mod.SiteStore(site, str(meta["study"]))
    store.save_data(data, {"seed": int(meta["seed"])})
    spec = ExperimentSpec.model_validate_json(meta["spec"])
    store.save_spec(spec.model_dump_json())
    return {"site": site.name, "n_train": data.n_train, "n_features": int(data.x_train.shape[1])}, {}


def _study_inputs(
    site: site_mod.LoadedSite, meta: dict[str, Any]
) -> tuple[site_mod.SiteStore, Any, ExperimentSpec, site_mod.StudyShape]:
    """The study's store, this site's prepared data, the spec and the study's shape, read from the site's disk."""
    store = site_mod.SiteStore(site, str(meta["study"]))
    data, _ = store.load_data()
    spec = store.load_spec(str(meta["spec_sha256"]))
    torch.set_num_threads(spec.execution.torch_threads())
    TIMELINE.mark("data+spec loaded")
    return store, data, spec, site_mod.StudyShape(**meta["shape"])


def _study_site(site: site_mod.LoadedSite, meta: dict[str, Any]) -> tuple[site_mod.SiteStore, ExperimentSpec, Any]:
    store, data, spec, shape = _study_inputs(site, meta)
    components = build_components(spec, PluginManager())
    TIMELINE.mark("components built")
    # Each message is a fresh process: a budget calibrated for an earlier message is read back, not searched again.
    with calibrations_kept_in(site.state_dir / "calibrations"):
        runtime = site_mod.build_site(spec, components, data, shape, str(meta.get("arm", "main")))
    TIMELINE.mark("site built (stages, DP calibration)")
    return store, spec, runtime


def _train(site: site_mod.LoadedSite, meta: dict[str, Any], tensors: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    store, spec, runtime = _study_site(site, meta)
    arm, repeat, round_ = str(meta["arm"]), int(meta["repeat"]), int(meta["round"])
    extras = {k[len("extra:") :]: v for k, v in tensors.items() if k.startswith("extra:")}
    message = GlobalModel(round=round_, weights=store.global_model(tensors.get("global"), str(meta["global_sha256"])))
    previous = store.load_state(arm, repeat)
    TIMELINE.mark("state loaded")
    update, privacy, state = site_mod.train_site_round(runtime, previous, message, extras)
    TIMELINE.mark("trained")
    released = state["released"]
    if "commitment" not in released:  # a replayed release keeps the commitment it was sent with
        committer = store.committer(spec, arm, repeat, int(meta["shape"]["seed"]))
        released["commitment"], released["salt"] = committer.open_commit(
            site.name, "site-update", round_, update.canonical_bytes()
        )
    store.save_state(arm, repeat, state)
    TIMELINE.mark("state saved")
    statement = site_mod.statement(str(meta["study"]), arm, repeat, round_, site.name, released["commitment"], update.n_samples)
    return {
        "privacy": [p.model_dump(mode="json") for p in privacy],
        "signature": site_mod.sign_statement(site.signing_key(), statement),
        "site_name": site.name,
        "commitment": released["commitment"],
        # The coordinator holds this update anyway; with the salt it checks that the signed
        # commitment opens to it. Under secure aggregation the salt is withheld (secure_train).
        "salt": released["salt"].hex(),
    }, {"update": update}


def _evaluate(site: site_mod.LoadedSite, meta: dict[str, Any], tensors: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    # Evaluation needs the model and the site's splits only: no training stages, no DP calibration, no state.
    store, data, spec, shape = _study_inputs(site, meta)
    weights = store.global_model(tensors["global"], str(meta["global_sha256"]))
    model = instantiate(spec.model, "model", PluginManager())
    evaluation = site_mod.evaluate_model(spec, model.build(shape.n_features, shape.n_classes), data, shape.n_classes, weights)
    TIMELINE.mark("evaluated")
    # Kept: the next round trains from this model, and its message then only names it.
    store.keep_global(weights)
    return {"evaluation": evaluation.model_dump(mode="json"), "stored_global": meta["global_sha256"]}, {}


@app.query("hello")
def hello(message: Message, context: Context) -> Message:
    return _handle(message, context, _hello)


@app.query("summary")
def summary(message: Message, context: Context) -> Message:
    return _handle(message, context, _summary)


@app.query("preprocess")
def preprocess(message: Message, context: Context) -> Message:
    return _handle(message, context, _preprocess)


@app.train("fedcore")
def train(message: Message, context: Context) -> Message:
    return _handle(message, context, _train)


@app.train(mods=[secaggplus_mod])
def secure_train(message: Message, context: Context) -> Message:
    """A round under ``secagg-plus``: Flower's ``secaggplus_mod`` runs the protocol and masks the update."""
    site = _site_of(context)

    def run(meta: dict[str, Any], tensors: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        reply_meta, reply_tensors = _train(site, meta, tensors)
        # The coordinator never sees this update: the salt would let it confirm a guess of it.
        reply_meta.pop("salt")
        update = reply_tensors["update"]
        if update.extras:
            raise FedcoreUserError(
                f"site '{site.name}': the update carries extra tensors {sorted(update.extras)}, which secagg-plus cannot sum",
                hint="use an aggregator and privacy settings without update extras, or crypten in a simulation",
            )
        return reply_meta, update

    return _audit(site.name, secure_train_reply(message, run))


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return _handle(message, context, _evaluate)

