"""fedcore's ServerApp: the study, run by the coordinator over the SuperLink.

The SuperLink starts this ServerApp (in its own process, on the coordinator's
machine) for every ``fedcore run SPEC --federation``. It drives the
simulation's :class:`~fedcore.engine.simulation.FederatedRun` (server,
aggregation, central privacy, ledger, evaluation pooling) with proxies of the
remote sites in place of in-process ones: only the transport differs.

Per round: the global model goes to every site; updates that arrive within
``training.round_timeout_s`` and carry a valid site signature are aggregated if
at least ``training.min_sites`` arrived (FedAvg re-weights over the arrivals);
otherwise the missing sites are asked again, up to ``training.round_retries``
times, and then the run stops naming them. After every completed round the
coordinator's checkpoint is written (:mod:`fedcore.plugins.deploy.checkpoint`).
"""

from __future__ import annotations

import base64
import json
import time
import traceback
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedcore.commitments import SALT_BYTES, commitment
from fedcore.components import FederatedData
from fedcore.plugins.deploy.certs import FederationCerts
from fedcore.checkpoint import weights_from_state
from fedcore.plugins.deploy.checkpoint import CoordinatorCheckpoint
from fedcore.plugins.deploy.wire import MalformedMessage, message_bytes, note_timing, pack, parse_model, parse_update, unpack
from fedcore.plugins.deploy.site import global_digest, statement
from fedcore.plugins.deploy.study import preprocessing_timeout
from fedcore.engine.runner import EngineChoice
from fedcore.engine.simulation import FederatedRun, RunJob, RunResult
from fedcore.errors import DataError, FedcoreUserError, PrivacyBudgetError, RunFailure, SpecError
from fedcore.plugins.datasets.pipeline import released_summaries
from fedcore.plugins.datasets.preprocessing import SiteSummary, check_columns_observed, combine_summaries, fitted_transformer
from fedcore.plugins.ledgers.keys import load_public_pem, verify_signature
from fedcore.spec import ExperimentSpec, build_components, load_experiment
from fedcore.types import ClientUpdate, GlobalModel, LedgerRecord, PrivacySpent, RoundRecord, SiteEvaluation, Weights, json_digest

app = ServerApp()

STATUS_FILE = "status.json"
#: fedcore's plain training message (SecAgg+ rounds use Flower's own ``train`` type, under ``secaggplus_mod``)
TRAIN = "train.fedcore"
LOG_FILE = "coordinator.log"


def write_status(run_dir: Path, state: str, **extra: Any) -> None:
    """``status.json``: running / complete / failed (with the one-line error and exit code), atomically."""
    path = run_dir / STATUS_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"state": state, "time": time.time(), **extra}))
    tmp.replace(path)


class Log:
    """The coordinator's log file in the run directory (one line per event)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOG_FILE

    def __call__(self, text: str) -> None:
        with open(self.path, "a") as handle:
            handle.write(f"{time.strftime('%H:%M:%S')} {text}\n")


@dataclass
class RemoteSite:
    """The coordinator's proxy of one hospital: its name, index and SuperNode; never its data."""

    name: str
    index: int
    node_id: int
    reports: list[PrivacySpent] = field(default_factory=list)

    def privacy_spent(self) -> list[PrivacySpent]:
        """The site's own accountant's reports, as sent with its latest update."""
        return list(self.reports)


#: How often the coordinator asks its SuperLink for replies (seconds). Flower's own
#: ``Grid`` waits 3 s between pulls; the pull is a local call on the coordinator's
#: machine (no bytes on any site's link), so a short interval costs nothing.
REPLY_POLL_S = 0.2


def exchange(grid: Grid, messages: Sequence[Message], timeout_s: float) -> list[Message]:
    """Push ``messages`` and pull their replies every :data:`REPLY_POLL_S` until all came or ``timeout_s`` passed."""
    waiting = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout_s
    replies: list[Message] = []
    while waiting:
        for reply in grid.pull_messages(waiting):
            waiting.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(REPLY_POLL_S)
    return replies


class Federation:
    """The connected sites and the one way to talk to them (Flower's grid), every wait bounded."""

    def __init__(self, grid: Grid, certs: FederationCerts, log: Log, context: Context | None = None) -> None:
        self.grid = grid
        self.context = context
        self.registry = certs.registry()
        self.log = log
        self.sites: list[RemoteSite] = []
        #: each site's training-set size (its update weight), as it reported after preprocessing
        self.site_rows: dict[str, int] = {}

    def connect(self, timeout_s: float) -> None:
        """Wait until every registered site's SuperNode is connected and says who it is."""
        names = sorted(self.registry)
        known: dict[str, int] = {}
        asked: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while True:
            fresh = [n for n in self.grid.get_node_ids() if n not in asked]
            if fresh:
                asked.update(fresh)
                for reply in exchange(
                    self.grid, [self.grid.create_message(pack({}), "query.hello", n, "") for n in fresh], max(5.0, deadline - time.monotonic())
                ):
                    node = reply.metadata.src_node_id
                    if not reply.has_content():
                        asked.discard(node)
                        continue
                    meta, _ = unpack(reply.content, f"node {node}")
                    if "error" in meta:
                        raise DataError(str(meta["error"]))
                    name = str(meta.get("site"))
                    if name not in self.registry:
                        self.log(f"node {node} says it is '{name}', which is not in sites.json: ignored")
                        continue
                    if meta.get("signing_fingerprint") != self.registry[name]["signing_fingerprint"]:
                        raise DataError(
                            f"site '{name}' signs with a key that is not the one in sites.json",
                            where=f"site '{name}'",
                            hint="give that site's site.yaml the signing.key written for it by 'fedcore federation certs'",
                        )
                    known[name] = node
                    self.log(f"site '{name}' connected (node {node})")
            if all(n in known for n in names):
                break
            if time.monotonic() > deadline:
                missing = [n for n in names if n not in known]
                raise RunFailure(
                    f"sites not connected after {timeout_s:g}s: {', '.join(missing)} "
                    "(start each with 'fedcore site start --superlink HOST:PORT --certs DIR --data site.yaml')"
                )
            time.sleep(1.0)
        self.sites = [RemoteSite(name, index, known[name]) for index, name in enumerate(names)]

    def ask(
        self,
        kind: str,
        sites: Sequence[RemoteSite],
        meta: Mapping[str, Any],
        tensors: Mapping[str, Weights],
        timeout_s: float,
        omit: Mapping[str, Collection[str]] | None = None,
    ) -> dict[str, Message]:
        """Send one message per site (same content) and return the replies that came in time, by site name.

        :param omit: per site name, tensor groups left out of its message (it holds them already).
        """
        by_node = {s.node_id: s for s in sites}
        messages = [
            self.grid.create_message(
                pack({**meta, "site_index": s.index}, {k: v for k, v in tensors.items() if k not in (omit or {}).get(s.name, ())}),
                kind, s.node_id, "",
            )
            for s in sites
        ]
        replies: dict[str, Message] = {}
        out = {m.metadata.dst_node_id: (message_bytes(m.content), m.metadata.created_at) for m in messages}
        sent = time.time()
        for reply in exchange(self.grid, messages, timeout_s):
            site = by_node.get(reply.metadata.src_node_id)
            if site is None:
                continue
            note_timing("coordinator", {"kind": kind, "round": meta.get("round"), "site": site.name, "sent": sent,
                                        "reply_created": reply.metadata.created_at, "received": time.time(),
                                        "created": out[site.node_id][1], "bytes_out": out[site.node_id][0], "bytes_in": message_bytes(reply.content)})
            if reply.has_error():
                self.log(f"site '{site.name}': {kind} failed at the site: {reply.error.reason}")
                continue
            replies[site.name] = reply
        return replies

    def ask_all(self, kind: str, metas: Mapping[str, Mapping[str, Any]], timeout_s: float) -> dict[str, dict[str, Any]]:
        """A message per site (its own metadata); every site must answer in time, or the run stops naming it."""
        by_node = {s.node_id: s for s in self.sites}
        messages = [self.grid.create_message(pack(metas[s.name]), kind, s.node_id, "") for s in self.sites]
        out: dict[str, dict[str, Any]] = {}
        for reply in exchange(self.grid, messages, timeout_s):
            site = by_node.get(reply.metadata.src_node_id)
            if site is None:
                continue
            if reply.has_error():
                raise RunFailure(f"site '{site.name}': {kind} failed at the site: {reply.error.reason}")
            meta, _ = unpack(reply.content, site.name)
            if "error" in meta:
                raise DataError(str(meta["error"]))
            out[site.name] = meta
        missing = [s.name for s in self.sites if s.name not in out]
        if missing:
            raise RunFailure(f"{kind}: no answer within {timeout_s:g}s from {', '.join(missing)} (check those sites' SuperNodes)")
        return out


def federated_preprocessing(federation: Federation, spec: ExperimentSpec, study: str, seed: int, timeout_s: float) -> FederatedData:
    """The simulation's preprocessing, federated: summaries in, fitted statistics out; rows never move."""
    if spec.data.use != "site-tables":
        raise SpecError(
            f"dataset '{spec.data.use}' is read by the coordinator; a deployment reads each site's own table",
            where="data.use",
            hint="use 'site-tables' with the preprocessing options; each site's site.yaml names its table and columns",
        )
    from fedcore.registry import PluginManager

    options = build_components(spec, PluginManager()).dataset.settings.model_dump(mode="json")
    base = {"study": study, "seed": seed, "options": options}
    answers = federation.ask_all("query.summary", {s.name: {**base, "index": s.index} for s in federation.sites}, timeout_s)
    first = federation.sites[0].name
    for site in federation.sites[1:]:
        for key in ("continuous", "categorical"):
            if answers[site.name][key] != answers[first][key]:
                theirs, ours = answers[site.name][key], answers[first][key]
                diff = sorted(set(theirs) ^ set(ours)) or ["(order)"]
                raise DataError(
                    f"site '{site.name}' has {key} columns that differ from site '{first}' (first difference: {diff[0]})",
                    where=f"site '{site.name}'",
                    hint="give every site's table the same columns, and declare continuous/categorical in each site.yaml",
                )
    summaries = [parse_model(SiteSummary, answers[s.name]["summary"], s.name, "summary") for s in federation.sites]
    stats = combine_summaries(summaries, options.get("max_categories"), options.get("min_category_count", 1))
    check_columns_observed(stats, ", ".join(f"site '{s.name}'" for s in federation.sites))
    classes = options.get("classes") or sorted(set().union(*(set(answers[s.name]["classes"]) for s in federation.sites)))
    continuous, categorical = answers[first]["continuous"], answers[first]["categorical"]
    feature_names = [str(n) for n in fitted_transformer(stats, continuous, categorical).get_feature_names_out()]
    rows = [answers[s.name]["max_rows_per_patient"] for s in federation.sites]
    spec_json = spec.model_dump_json()
    prepared = federation.ask_all(
        "query.preprocess",
        {s.name: {**base, "index": s.index, "statistics": stats.model_dump(mode="json"), "classes": classes, "spec": spec_json} for s in federation.sites},
        timeout_s,
    )
    federation.site_rows = {name: int(answer["n_train"]) for name, answer in prepared.items()}
    return FederatedData(
        sites=[],
        feature_names=feature_names,
        class_names=list(classes),
        report_sections={
            "Data: deployment": (
                f"{len(federation.sites)} sites ({', '.join(s.name for s in federation.sites)}), each reading its own table; "
                "rows, splits and per-site counts stay at the sites. The coordinator received only each site's "
                "preprocessing summary (listed below as released statistics)."
            )
        },
        released_statistics=released_summaries(summaries),
        max_rows_per_patient=None if any(r is None for r in rows) else max(rows),
    )


def server_calibrated_privacy(spec: ExperimentSpec) -> str | None:
    """The privacy mechanism whose noise assumes every site contributes (site-level or central DP), or None.

    Record-level DP is accounted at each site for the rounds it trained, so dropouts
    do not touch it; site-level and central DP are calibrated for the full federation,
    so a round with a site missing is refused before anything is released.
    """
    for ref in spec.privacy:
        level = (ref.settings or {}).get("level", "record") if ref.use == "gaussian" else None
        if ref.use == "central-dp" or level == "site":
            return f"privacy '{ref.use}'" + (" (level: site)" if level == "site" else "")
    return None


def refusal_reason(
    public_pem: str, study: str, arm: str, repeat: int, round_: int, site: RemoteSite, update: ClientUpdate,
    meta: Mapping[str, Any], sealed: bool = False,
) -> str | None:
    """Why the coordinator must refuse ``update`` from ``site`` (wrong claims, a bad site signature,
    a commitment that does not open to the update), or None.

    :param meta: the reply's metadata: ``signature`` (base64) over the site's statement,
        ``commitment`` (hex) and, unless ``sealed``, the ``salt`` (hex) that opens it.
    :param sealed: the update arrived masked (secure aggregation): only the signature is checked.
    """
    if update.site != site.index or update.round != round_:
        return f"it claims site {update.site}, round {update.round}"
    signature_b64, committed = str(meta.get("signature", "")), str(meta.get("commitment", ""))
    if not sealed:
        try:
            salt = bytes.fromhex(str(meta.get("salt", "")))
        except ValueError:
            return "its commitment salt is not hex"
        if len(salt) < SALT_BYTES or commitment(salt, update.canonical_bytes()) != committed:
            return "its ledger commitment does not open to the update it sent"
    message = statement(study, arm, repeat, round_, site.name, committed, update.n_samples)
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except ValueError:
        return "its signature is not base64"
    if not verify_signature(load_public_pem(public_pem), signature, message):
        return "its signature does not verify with the site's registered key"
    return None


class DeployedRun(FederatedRun):
    """The simulation's :class:`FederatedRun` whose sites are remote hospitals."""

    def __init__(
        self, federation: Federation, study: str, shape: dict[str, Any], *args: Any, resumed: bool = False, **kwargs: Any
    ) -> None:
        self.federation = federation
        self.resumed = resumed
        self.absent: list[str] = []
        self.study = study
        self.shape = shape
        self.signatures: dict[str, dict[str, str]] = {}
        # The global model each site stored when it evaluated it (by SHA-256): the next round's
        # train message names it instead of sending it again.
        self.held: dict[str, str] = {}
        self.present: list[RemoteSite] = list(federation.sites)
        super().__init__(*args, sites=federation.sites, **kwargs)

    # -- seams of FederatedRun

    def opening_records(self) -> list[LedgerRecord]:
        # A resumed run continues its ledger's chain: its opening records are already on it.
        return [] if self.resumed else super().opening_records()

    def ledger_writers(self) -> list[str]:
        # Sites sign their own statements (verified before appending, kept in the entry's metadata);
        # the coordinator never holds a site's key, so it alone writes the chain.
        return ["server"]

    def update_records(self, round_: int, updates: Sequence[ClientUpdate]) -> list[LedgerRecord]:
        records = []
        for u in updates:
            site = self.federation.sites[u.site]
            records.append(
                LedgerRecord(
                    kind="site-update",
                    round=round_,
                    writer="server",
                    payload_sha256=self.signatures[site.name]["commitment"],
                    metadata={
                        "n_samples": u.n_samples,
                        "bytes": u.nbytes(),
                        "site": site.name,
                        "site_signature": self.signatures[site.name]["signature"],
                        "site_key": self.federation.registry[site.name]["signing_fingerprint"],
                    },
                )
            )
        return records

    def evaluate_sites(self, message: GlobalModel) -> list[SiteEvaluation]:
        timeout = self.spec.training.round_timeout_s
        digest = global_digest(message.weights)
        meta_out = {**self._meta(message.round), "global_sha256": digest}
        replies = self.federation.ask("evaluate", self.present, meta_out, {"global": message.weights}, timeout)
        evaluations = []
        for site in self.present:
            if site.name not in replies:
                continue
            meta, _ = unpack(replies[site.name].content, site.name)
            if "error" in meta:
                raise DataError(str(meta["error"]))
            evaluations.append(parse_model(SiteEvaluation, meta["evaluation"], site.name, "evaluation"))
            if meta.get("stored_global") == digest:
                self.held[site.name] = digest
        if not evaluations:
            raise RunFailure(f"round {message.round}: no site evaluated the global model within {timeout:g}s")
        return evaluations

    # -- the round

    def _meta(self, round_: int) -> dict[str, Any]:
        return {
            "study": self.study,
            "arm": self.result.arm,
            "repeat": self.result.repeat,
            "round": round_,
            "spec_sha256": json_digest(self.spec.model_dump(mode="json")),
            "shape": self.shape,
        }

    def _verify(self, site: RemoteSite, round_: int, update: ClientUpdate, meta: dict[str, Any], sealed: bool = False) -> str | None:
        return refusal_reason(
            self.federation.registry[site.name]["signing_public_key"], self.study, self.result.arm, self.result.repeat,
            round_, site, update, meta, sealed,
        )

    def _secure_attempt(
        self, round_: int, message: GlobalModel, extras: Mapping[str, Weights], round_meta: dict[str, Any],
        arrived: dict[str, ClientUpdate], refused: dict[str, str], log: Log,
    ) -> None:
        """One SecAgg+ round over every site: the revealed sum goes to the plugin, sealed updates to ``arrived``."""
        from fedcore.plugins.deploy.secagg import SealedUpdate, secure_round

        secure = self.components.secure_aggregation
        assert secure is not None and self.federation.context is not None
        arrived.clear()
        settings = secure.settings
        if settings.max_weight is None:  # type: ignore[attr-defined]
            # The largest weight the sites will use: SecAgg+ scales each update by weight / max_weight before
            # quantizing, so a loose bound would quantize the updates away.
            settings = settings.model_copy(update={"max_weight": float(max(self.federation.site_rows.values(), default=1))})
        summed, metas = secure_round(
            self.federation.grid, self.federation.context, [s.node_id for s in self.federation.sites], round_,
            round_meta, message.weights, extras, settings,
            holding={s.node_id for s in self.federation.sites if self.held.get(s.name) == round_meta["global_sha256"]},
        )
        if summed is None:
            log(f"round {round_}: SecAgg+ halted (too few sites answered every stage)")
            return
        by_node = {s.node_id: s for s in self.federation.sites}
        for node, meta in metas.items():
            site = by_node[node]
            if "error" in meta:
                raise DataError(str(meta["error"]))
            update = parse_model(
                SealedUpdate,
                {**{k: meta[k] for k in ("site", "round", "n_samples", "local_steps", "train_loss", "train_seconds")},
                 "delta": Weights(arrays={}), "claimed_digest": meta["commitment"], "claimed_bytes": meta["bytes"]},
                site.name, "sealed update",
            )
            log(f"round {round_}: site '{site.name}' sent its update masked (0 individual tensor bytes)")
            reason = self._verify(site, round_, update, meta, sealed=True)
            if reason is not None:
                # Its masked contribution is already inside the sum: the whole round is refused.
                raise RunFailure(f"round {round_}: the update of site '{site.name}' is refused ({reason}); under secure "
                                 "aggregation it cannot be removed from the sum, so the round is not released")
            site.reports = [parse_model(PrivacySpent, r, site.name, "privacy report") for r in meta.get("privacy", [])]
            self.signatures[site.name] = {"signature": str(meta["signature"]), "commitment": str(meta["commitment"])}
            arrived[site.name] = update
        secure.provide(summed)  # type: ignore[attr-defined]

    def collect(self, round_: int, message: GlobalModel, extras: Mapping[str, Weights], log: Log) -> list[ClientUpdate]:
        """The round's verified updates from at least the quorum, retrying missing sites; else stop naming them."""
        training = self.spec.training
        quorum = training.min_sites or len(self.federation.sites)
        arrived: dict[str, ClientUpdate] = {}
        refused: dict[str, str] = {}
        tensors = {"global": message.weights, **{f"extra:{k}": v for k, v in extras.items()}}
        digest = global_digest(message.weights)
        round_meta = {**self._meta(round_), "global_sha256": digest}
        secure = self.components.secure_aggregation
        for attempt in range(training.round_retries + 1):
            if secure is not None:
                self._secure_attempt(round_, message, extras, round_meta, arrived, refused, log)
                if len(arrived) >= quorum:
                    break
                continue
            waiting = [s for s in self.federation.sites if s.name not in arrived and s.name not in refused]
            if not waiting:
                break
            omit = {s.name: ("global",) for s in waiting if self.held.get(s.name) == digest}
            replies = self.federation.ask(TRAIN, waiting, round_meta, tensors, training.round_timeout_s, omit)
            for site in waiting:
                reply = replies.get(site.name)
                if reply is None:
                    continue
                meta, _ = unpack(reply.content, site.name)
                if "error" in meta:
                    if meta.get("user_error"):
                        raise PrivacyBudgetError(str(meta["error"])) if "budget" in str(meta["error"]) else DataError(str(meta["error"]))
                    raise RunFailure(str(meta["error"]))
                update, rest = parse_update(reply.content, site.name, self.initial)
                log(f"round {round_}: received the update of site '{site.name}' ({update.nbytes()} individual tensor bytes)")
                reason = self._verify(site, round_, update, rest)
                if reason is not None:
                    refused[site.name] = reason
                    log(f"round {round_}: refused the update of site '{site.name}': {reason}")
                    continue
                site.reports = [parse_model(PrivacySpent, r, site.name, "privacy report") for r in rest.get("privacy", [])]
                self.signatures[site.name] = {"signature": str(rest["signature"]), "commitment": str(rest["commitment"])}
                arrived[site.name] = update
            if len(arrived) >= quorum:
                break
            missing = [s.name for s in self.federation.sites if s.name not in arrived]
            log(f"round {round_}: {len(arrived)} of {len(self.federation.sites)} sites in time (quorum {quorum}); missing {', '.join(missing)}; try {attempt + 1}")
        absent = [s.name for s in self.federation.sites if s.name not in arrived]
        if len(arrived) < quorum:
            raise RunFailure(
                f"round {round_}: only {len(arrived)} of {len(self.federation.sites)} sites sent a usable update "
                f"(quorum {quorum}) after {training.round_retries + 1} tries of {training.round_timeout_s:g}s; "
                f"missing: {', '.join(absent)} (check those sites' SuperNodes, or lower training.min_sites)"
            )
        calibrated = server_calibrated_privacy(self.spec)
        if absent and calibrated:
            raise RunFailure(
                f"round {round_}: {len(arrived)} of {len(self.federation.sites)} sites sent an update, but {calibrated} is "
                f"calibrated for all {len(self.federation.sites)} sites: the round is refused before release "
                f"(missing: {', '.join(absent)}); restart those sites' SuperNodes"
            )
        if absent and self.ledger is not None:
            self._append(
                [
                    LedgerRecord(
                        kind="dropout",
                        round=round_,
                        writer="server",
                        payload_sha256=json_digest({"site": name, "reason": refused.get(name, "no update in time")}),
                        metadata={"site": name, "reason": refused.get(name, "no update in time")},
                    )
                    for name in absent
                ]
            )
        self.present = [s for s in self.federation.sites if s.name in arrived]
        self.absent = absent
        return [arrived[s.name] for s in self.federation.sites if s.name in arrived]


def _data_file(run_dir: Path, repeat: int) -> Path:
    return run_dir / "checkpoints" / f"deploy-data-r{repeat}.json"


def save_data_shape(run_dir: Path, repeat: int, data: FederatedData, site_rows: dict[str, int]) -> None:
    """What the coordinator learnt from preprocessing (no rows): features, classes, released summaries."""
    path = _data_file(run_dir, repeat)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "feature_names": data.feature_names,
        "class_names": data.class_names,
        "report_sections": data.report_sections,
        "released_statistics": data.released_statistics,
        "max_rows_per_patient": data.max_rows_per_patient,
        "site_rows": site_rows,
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


def load_data_shape(run_dir: Path, repeat: int) -> tuple[FederatedData, dict[str, int]] | None:
    path = _data_file(run_dir, repeat)
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    site_rows = saved.pop("site_rows", {})
    return FederatedData(sites=[], **saved), site_rows


def _records_until(run_dir: Path, repeat: int, last_round: int) -> list[RoundRecord]:
    """Keep ``rounds.jsonl`` lines of completed rounds only (a round cut short is redone); this repeat's records."""
    path = run_dir / "rounds.jsonl"
    if not path.exists():
        return []
    records = [RoundRecord.model_validate_json(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in records if r.repeat != repeat or r.round <= last_round]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(r.model_dump_json() + "\n" for r in kept))
    tmp.replace(path)
    return [r for r in kept if r.repeat == repeat]


def restore(run: DeployedRun, state: dict[str, Any]) -> None:
    """The coordinator's state after the checkpoint's round (weights, aggregator, central DP, random state)."""
    run.server.weights = weights_from_state(state["weights"])
    run.ledger_head = state["ledger_head"]
    run.components.aggregator.load_state_dict(state["aggregator"])
    for mechanism, mechanism_state in zip(run.server.privacy, state["privacy"], strict=True):
        if mechanism_state and hasattr(mechanism, "load_state_dict"):
            mechanism.load_state_dict(mechanism_state)
    run.server.rng.bit_generator.state = state["server_rng"]


def coordinate(
    grid: Grid,
    run_dir: Path,
    certs: FederationCerts,
    connect_timeout_s: float,
    log: Log,
    resume: bool = False,
    context: Context | None = None,
) -> None:
    """The whole study at the coordinator; writes the run directory as the simulation does.

    With ``resume``, every repeat continues after its checkpoint's round: the sites
    still hold their preprocessed data and stage state under the study's id.
    """
    from fedcore.report import build_report, write_summary

    experiment = load_experiment(run_dir / "spec.resolved.yaml")
    spec = experiment.spec
    if len(experiment.arms) != 1:
        raise SpecError("a deployment runs one arm; sweeps run in simulation", where="sweep", hint="remove sweep")
    if spec.baseline.centralized:
        log("baseline.centralized skipped: a deployment never pools data")
    study = json.loads((run_dir / "deployment.json").read_text())["study"]
    federation = Federation(grid, certs, log, context)
    federation.connect(connect_timeout_s)
    plugins = experiment.plugins
    started = time.perf_counter()
    results: list[RunResult] = []
    checkpoint = CoordinatorCheckpoint(run_dir)
    data: FederatedData | None = None
    for repeat in range(spec.repeats):
        seed = spec.seed + repeat
        state = checkpoint.load(repeat) if resume else None
        saved = load_data_shape(run_dir, repeat) if state is not None else None
        if saved is None:
            state = None
            data = federated_preprocessing(federation, spec, f"{study}-r{repeat}", seed, preprocessing_timeout(spec))
            save_data_shape(run_dir, repeat, data, federation.site_rows)
        else:
            data, federation.site_rows = saved
        done_rounds = int(state["round"]) if state is not None else 0
        earlier = _records_until(run_dir, repeat, done_rounds) if resume else []
        shape = {
            "n_sites": len(federation.sites),
            "n_features": data.n_features,
            "n_classes": data.n_classes,
            "max_rows_per_patient": data.max_rows_per_patient,
            "seed": seed,
        }
        components = build_components(spec, plugins)
        if components.secure_aggregation is not None:
            components.secure_aggregation.deployed = True  # type: ignore[attr-defined]
        rounds_file = open(run_dir / "rounds.jsonl", "a")

        def on_round(record: RoundRecord) -> None:
            record = record.model_copy(update={"sites": [s.name for s in run.present], "absent_sites": list(run.absent)})
            rounds_file.write(record.model_dump_json() + "\n")
            rounds_file.flush()
            plugins.hook.fedcore_round_end(record=record)

        job = RunJob(components, data, repeat, seed, ledger_dir=run_dir / "ledger" / f"main-r{repeat}")
        run = DeployedRun(federation, f"{study}-r{repeat}", shape, spec, job, "main", on_round, resumed=state is not None)
        if state is not None:
            restore(run, state)
            log(f"repeat {repeat}: resumed after round {done_rounds} (ledger head {state['ledger_head']})")
        try:
            for round_ in range(done_rounds + 1, spec.training.rounds + 1):
                note_timing("coordinator", {"kind": "round start", "round": round_, "time": time.time()})
                if not run.run_round(round_, lambda message, extras, r=round_: run.collect(r, message, extras, log)):
                    break
                note_timing("coordinator", {"kind": "round end", "round": round_, "time": time.time()})
                checkpoint.save(repeat, round_, run)
                note_timing("coordinator", {"kind": "checkpointed", "round": round_, "time": time.time()})
                log(f"repeat {repeat} round {round_} done: sites {', '.join(s.name for s in run.present)}")
        finally:
            result = run.close()
            rounds_file.close()
        result.records = [*earlier, *result.records]
        results.append(result)
    assert data is not None
    engines = {"main": EngineChoice("sequential", "a deployment trains at each site's SuperNode")}
    write_summary(run_dir, experiment, results, time.perf_counter() - started, data, engines)
    build_report(run_dir)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point the SuperLink calls; never raises: the outcome goes to ``status.json``."""
    run_dir = Path(str(context.run_config["run-dir"]))
    log = Log(run_dir)
    write_status(run_dir, "running")
    try:
        certs = FederationCerts(Path(str(context.run_config["certs"])))
        resume = bool(context.run_config.get("resume", False))
        coordinate(grid, run_dir, certs, float(context.run_config["connect-timeout-s"]), log, resume, context)
    except FedcoreUserError as exc:
        log(f"error: {exc}")
        write_status(run_dir, "failed", error=str(exc), exit_code=2)
    except (RunFailure, MalformedMessage) as exc:
        log(f"run failed: {exc}")
        write_status(run_dir, "failed", error=str(exc), exit_code=1)
    except BaseException as exc:  # an internal error: one line, the traceback in the log
        log(traceback.format_exc())
        write_status(run_dir, "failed", error=f"internal error: {type(exc).__name__}: {exc} (traceback in {log.path})", exit_code=1)
    else:
        write_status(run_dir, "complete")
