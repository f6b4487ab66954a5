"""A hospital's side of a deployment: its own data file, its own state, its own key.

Everything here runs at the site (inside fedcore's ClientApp on the site's
SuperNode). The site's file (``site.yaml``) names its table and columns; those
never leave the site. What the site sends is listed in :mod:`fedcore.plugins.deploy.wire`.

Local training goes through one adapter, :func:`train_site_round`, which calls
the engine's site runtime, :class:`~fedcore.engine.site.SiteRuntime` (built with the
simulation's :func:`~fedcore.engine.simulation.site_stages`): the code that
trains at a SuperNode is the code the simulation runs.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedcore.commitments import Committer
from fedcore.components import FederatedData, SiteData
from fedcore.engine.resume import request_digest
from fedcore.engine.site import SiteRuntime, evaluate_split_pair
from fedcore.engine.training import load_weights
from fedcore.engine.simulation import derive_seed, site_stages
from fedcore.errors import DataError
from fedcore.rundir import atomic_write_bytes
from fedcore.plugins.datasets.ehr_csv import EHRCSV, EHRCSVSettings
from fedcore.plugins.datasets.pipeline import (
    ColumnRoles,
    PreparedSite,
    PreprocessingSettings,
    _classes,
    normalize_site,
    prepare_site,
    transform_site,
)
from fedcore.plugins.datasets.preprocessing import FederatedStatistics, fitted_transformer
from fedcore.plugins.ledgers.keys import PrivateKey, fingerprint, sign
from fedcore.spec import Components, ExperimentSpec
from fedcore.types import ClientUpdate, GlobalModel, PrivacySpent, SiteEvaluation, Weights, json_digest

#: Keys of a site's ``data`` block that are the coordinator's (preprocessing options), not the site's.
COORDINATOR_KEYS = set(PreprocessingSettings.model_fields) | {"classes"}


class SiteConfig(BaseModel):
    """``site.yaml``: what a hospital configures locally (never sent)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str = Field(description="this hospital's name, as in the federation's certificates")
    data: dict[str, Any] = Field(description="ehr-csv settings of this hospital's own table: path, target, columns")
    state_dir: str = Field("state", description="where this site keeps its preprocessed data and stage state")
    signing_key: str = Field(description="this site's ledger-signing private key (PEM); never leaves the site")


@dataclass(frozen=True)
class LoadedSite:
    config: SiteConfig
    source: Path

    @property
    def name(self) -> str:
        return self.config.site

    def path(self, text: str) -> Path:
        path = Path(text).expanduser()
        return path if path.is_absolute() else (self.source.parent / path)

    @property
    def state_dir(self) -> Path:
        return self.path(self.config.state_dir)

    def signing_key(self) -> PrivateKey:
        path = self.path(self.config.signing_key)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), None)
        except (OSError, ValueError) as exc:
            raise DataError(
                f"site '{self.name}' cannot read its signing key ({type(exc).__name__})",
                where=str(path),
                hint="point signing_key at the signing.key written by 'fedcore federation certs'",
            ) from exc
        return key  # type: ignore[return-value]

    def key_fingerprint(self) -> str:
        return fingerprint(self.signing_key().public_key())


def load_site_config(path: Path) -> LoadedSite:
    """Read and check ``site.yaml``; every problem is one line naming the file and the fix."""
    path = Path(path).expanduser().resolve()
    try:
        raw = yaml.safe_load(path.read_text())
        config = SiteConfig.model_validate(raw)
    except OSError as exc:
        raise DataError(f"cannot read the site file ({exc.strerror})", where=str(path), hint="give --data the site's yaml") from exc
    except yaml.YAMLError as exc:
        raise DataError("the site file is not valid YAML", where=str(path), hint="fix its syntax") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        raise DataError(
            f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}",
            where=str(path),
            hint="keys are site, data, state_dir, signing_key",
        ) from exc
    reserved = sorted(set(config.data) & (COORDINATOR_KEYS | {"site_files", "site_column", "partition"}))
    if reserved:
        raise DataError(
            f"data.{reserved[0]} belongs in the coordinator's spec (or is not used at a site)",
            where=str(path),
            hint="a site's data block names its own table and columns only; preprocessing options come from the study's spec",
        )
    return LoadedSite(config, path)


def _settings(site: LoadedSite, options: dict[str, Any]) -> EHRCSVSettings:
    data = dict(site.config.data)
    table = data.pop("path", None)
    if table is None:
        raise DataError("data.path is missing", where=str(site.source), hint="give the path of this hospital's table")
    try:
        return EHRCSVSettings.model_validate({**data, **options, "site_files": {site.name: str(site.path(table))}})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise DataError(
            f"data.{'.'.join(str(p) for p in first['loc'])}: {first['msg']}", where=str(site.source), hint="fix the site's data block"
        ) from exc


def prepare(site: LoadedSite, options: dict[str, Any], seed: int, index: int) -> tuple[PreparedSite, ColumnRoles, list[str]]:
    """Read the site's table, normalize, split and summarize it (the simulation's pipeline, one site)."""
    settings = _settings(site, options)
    dataset = EHRCSV(settings)
    raw = dataset.raw_sites(seed)
    roles = dataset.roles(raw)
    preprocess = settings.options(settings.classes)
    frame, dropped = normalize_site(raw[0], roles, preprocess)
    classes = _classes([(raw[0], frame)], roles, preprocess)
    return prepare_site(raw[0], frame, dropped, roles, preprocess, seed, index), roles, classes


def preprocess(
    site: LoadedSite,
    options: dict[str, Any],
    seed: int,
    index: int,
    stats: FederatedStatistics,
    classes: list[str],
) -> tuple[SiteData, int | None]:
    """Apply the federation's fitted preprocessing to the site's rows; its data never leaves."""
    prepared, roles, _ = prepare(site, options, seed, index)
    preprocess_options = _settings(site, options).options(classes)
    transformer = fitted_transformer(stats, roles.continuous, roles.categorical)
    data, _, _, rows_per_patient = transform_site(prepared, transformer, roles, classes, preprocess_options, seed, index)
    return data, rows_per_patient


# ------------------------------------------------------------------- state


class SiteStore:
    """The site's own disk: preprocessed data, the study's spec, stage state, keyed by study run id."""

    def __init__(self, site: LoadedSite, study: str) -> None:
        if not study or not all(c.isalnum() or c in "-_" for c in study):
            raise DataError(f"study id '{study}' is not usable", where="coordinator message", hint="restart the study")
        self.root = site.state_dir / study
        self.root.mkdir(parents=True, exist_ok=True)

    def save_data(self, data: SiteData, meta: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            x_train=data.x_train, y_train=data.y_train, x_val=data.x_val, y_val=data.y_val,
            x_test=data.x_test, y_test=data.y_test,
        )
        atomic_write_bytes(self.root / "data.npz", buffer.getvalue())
        atomic_write_bytes(self.root / "data.json", json.dumps({**meta, "site": data.site, "name": data.name}).encode())

    def load_data(self) -> tuple[SiteData, dict[str, Any]]:
        try:
            meta = json.loads((self.root / "data.json").read_text())
            with np.load(self.root / "data.npz") as arrays:
                data = SiteData(meta["site"], meta["name"], *(arrays[k] for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")))
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(
                f"the site has no preprocessed data for this study ({type(exc).__name__})",
                where=str(self.root),
                hint="the coordinator re-runs preprocessing when a study starts; restart the study",
            ) from exc
        return data, meta

    def save_spec(self, spec_json: str) -> None:
        atomic_write_bytes(self.root / "spec.json", spec_json.encode())

    def load_spec(self, digest: str) -> ExperimentSpec:
        text = (self.root / "spec.json").read_text()
        spec = ExperimentSpec.model_validate_json(text)
        if json_digest(spec.model_dump(mode="json")) != digest:
            raise DataError("the study's spec changed since preprocessing", where=str(self.root), hint="restart the study")
        return spec

    def keep_global(self, weights: Weights) -> None:
        """Keep the global model this site evaluated (the next train message names it by digest)."""
        atomic_write_bytes(self.root / "global.bin", weights.to_bytes())

    def global_model(self, sent: Weights | None, digest: str) -> Weights:
        """The global model a message means: the one it carries, else the one kept here.

        Either must have SHA-256 ``digest``; anything else is refused, never trained on.
        """
        if sent is None:
            try:
                sent = Weights.from_bytes((self.root / "global.bin").read_bytes())
            except (OSError, ValueError):
                sent = None
        if sent is None or global_digest(sent) != digest:
            raise DataError(
                "the coordinator named a global model this site does not hold",
                where=str(self.root),
                hint="restart the study from the coordinator (it sends the model again)",
            )
        return sent

    def committer(self, spec: ExperimentSpec, arm: str, repeat: int, seed: int) -> Committer:
        """Commits this site's updates of one training; the openings stay in this site's folder
        (``openings/<arm>-r<repeat>/``, the simulation's layout, for ``fedcore ledger verify --openings``)."""
        ledger = Path(f"{arm}-r{repeat}")
        return Committer(ledger, spec.execution.reproducible_noise, seed, arm, repeat, holder_root=self.root)

    def state_path(self, arm: str, repeat: int) -> Path:
        return self.root / f"site-state-{hashlib.sha256(arm.encode()).hexdigest()[:12]}-r{repeat}.pt"

    def load_state(self, arm: str, repeat: int) -> dict[str, Any] | None:
        path = self.state_path(arm, repeat)
        return torch.load(path, weights_only=False) if path.exists() else None

    def save_state(self, arm: str, repeat: int, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.state_path(arm, repeat), buffer.getvalue())


# ------------------------------------------------------------------ training


@dataclass(frozen=True)
class StudyShape:
    """What a site needs to know about the federation to build its stages (sent by the coordinator)."""

    n_sites: int
    n_features: int
    n_classes: int
    max_rows_per_patient: int | None
    seed: int


def build_site(spec: ExperimentSpec, components: Components, data: SiteData, shape: StudyShape, arm: str = "main") -> SiteRuntime:
    """The simulation's :class:`SiteRuntime` for this hospital, with the simulation's stages and seeds.

    ``site_stages`` reads the federation's size, features, classes and patient
    bound from a :class:`FederatedData`; here that holds this site's own data
    only (repeated ``n_sites`` times so the count is right) — nothing else is read.
    """
    federated = FederatedData(
        sites=[data] * shape.n_sites,
        feature_names=[f"f{i}" for i in range(shape.n_features)],
        class_names=[f"c{i}" for i in range(shape.n_classes)],
        max_rows_per_patient=shape.max_rows_per_patient,
    )
    stages = site_stages(spec, components, federated, data, shape.seed, arm)
    module = components.model.build(shape.n_features, shape.n_classes)
    return SiteRuntime(
        data, module, spec.training, stages, shape.n_classes, derive_seed(shape.seed, 1, data.site), spec.evaluation.metrics
    )


def train_site_round(
    site: SiteRuntime,
    state: dict[str, Any] | None,
    message: GlobalModel,
    extras: dict[str, Weights],
) -> tuple[ClientUpdate, list[PrivacySpent], dict[str, Any]]:
    """THE adapter: one site's local round, exactly as the simulation trains it.

    Restores the site's state from its own disk (generator, every stage's state:
    accountant, control variates), calls :meth:`SiteRuntime.fit` (the
    local-training contract: stages, sampler, DP step, ``transform_update``) and
    returns the released update, the site's privacy reports and the new state to
    keep on the site's disk.
    """
    asked = request_digest(message, extras)
    last = (state or {}).get("released")
    if last is not None and last["round"] == message.round and last["request_sha256"] == asked:
        # The coordinator lost this round (it crashed after the site released it) and asks
        # again with the same model: send the same release again. A replay is free under DP
        # (post-processing of what already left the site); training anew would spend the
        # budget twice for one round and could end the run early.
        return last["update"], last["privacy"], state  # type: ignore[return-value]
    if state is not None:
        site.load_state_dict(state)
    update = site.fit(message.weights, message.round, extras)
    privacy = site.privacy_spent()
    rounds = [*(state or {}).get("rounds", []), message.round]
    snapshot = {**site.state_dict(), "rounds": rounds}
    snapshot["released"] = {"round": message.round, "request_sha256": asked, "update": update, "privacy": privacy}
    return update, privacy, snapshot


def evaluate_model(spec: ExperimentSpec, module: torch.nn.Module, data: SiteData, n_classes: int, weights: Weights) -> SiteEvaluation:
    """The simulation's evaluation (:meth:`SiteRuntime.evaluate`) of the global model on the site's validation and test splits."""
    load_weights(module, weights)
    return evaluate_split_pair(module, data, n_classes, spec.evaluation.metrics)


def global_digest(weights: Weights) -> str:
    """SHA-256 of a global model's canonical bytes: how a message names a model the site holds."""
    return hashlib.sha256(weights.to_bytes()).hexdigest()


def statement(study: str, arm: str, repeat: int, round_: int, site: str, commitment: str, n_samples: int) -> bytes:
    """The canonical bytes a site signs for its update (what the coordinator verifies before appending).

    ``commitment`` is the hiding commitment to the update's canonical bytes
    (:func:`fedcore.commitments.commitment`), whose opening the site keeps.
    """
    return json.dumps(
        {
            "format": "fedcore-site-update-v2",
            "study": study,
            "arm": arm,
            "repeat": repeat,
            "round": round_,
            "site": site,
            "payload_commitment": commitment,
            "n_samples": n_samples,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def sign_statement(key: PrivateKey, message: bytes) -> str:
    import base64

    return base64.b64encode(sign(key, message)).decode()
