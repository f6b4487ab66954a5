"""Frozen pydantic models for everything that crosses the site/server boundary.

Tensors travel as read-only numpy arrays inside :class:`Weights`, so a message
can be serialized (``to_bytes``) and hashed identically by any participant.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

_CANONICAL_MAGIC = b"FEDCORE-WEIGHTS-v1\n"


def _readonly(array: Any) -> np.ndarray:
    """Copy ``array`` into a C-contiguous, read-only numpy array."""
    out = np.array(array, copy=True, order="C")
    out.flags.writeable = False
    return out


class Frozen(BaseModel):
    """Base of every boundary type: immutable, strict about unknown fields."""

    # A diverged model's loss is NaN: written as NaN (not null) so rounds.jsonl reads back.
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True, ser_json_inf_nan="constants")


class Weights(Frozen):
    """Named arrays of a model (parameters, deltas or sums), in a fixed order.

    The canonical byte encoding (:meth:`to_bytes`) is what every ledger digest is
    computed over, so any hospital can recompute it from the arrays alone:
    ``MAGIC || u32-le header length || header JSON (sorted keys, no spaces) ||
    raw little-endian C-order bytes of each array in header order``, where the
    header lists ``[name, dtype, shape]`` per array.

    :ivar arrays: name -> read-only numpy array (a model's ``state_dict`` order).
    """

    arrays: dict[str, np.ndarray]

    @field_validator("arrays", mode="before")
    @classmethod
    def _freeze_arrays(cls, value: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {str(k): _readonly(v) for k, v in value.items()}

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]
        return iter(self.arrays)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    @property
    def names(self) -> list[str]:
        return list(self.arrays)

    def num_parameters(self) -> int:
        return int(sum(a.size for a in self.arrays.values()))

    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))

    def flat(self) -> np.ndarray:
        """All arrays concatenated into one float64 vector (a copy)."""
        if not self.arrays:
            return np.zeros(0)
        return np.concatenate([a.astype(np.float64, copy=False).ravel() for a in self.arrays.values()])

    def unflatten(self, vector: np.ndarray) -> Weights:
        """Arrays shaped like ``self`` filled from a flat vector."""
        out: dict[str, np.ndarray] = {}
        offset = 0
        for name, array in self.arrays.items():
            out[name] = np.asarray(vector[offset : offset + array.size], dtype=array.dtype).reshape(array.shape)
            offset += array.size
        if offset != len(vector):
            raise ValueError(f"vector has {len(vector)} values, weights need {offset}")
        return Weights(arrays=out)

    def map(self, fn: Any) -> Weights:
        return Weights(arrays={k: fn(v) for k, v in self.arrays.items()})

    def combine(self, other: Weights, fn: Any) -> Weights:
        if other.names != self.names:
            raise ValueError("weights have different layouts")
        return Weights(arrays={k: fn(v, other.arrays[k]) for k, v in self.arrays.items()})

    def __add__(self, other: Weights) -> Weights:
        return self.combine(other, np.add)

    def __sub__(self, other: Weights) -> Weights:
        return self.combine(other, np.subtract)

    def scale(self, factor: float) -> Weights:
        return self.map(lambda a: (a * factor).astype(a.dtype, copy=False))

    def l2_norm(self) -> float:
        return float(np.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in self.arrays.values())))

    def to_bytes(self) -> bytes:
        header = [[n, a.dtype.newbyteorder("<").str, list(a.shape)] for n, a in self.arrays.items()]
        header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        body = b"".join(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes() for a in self.arrays.values())
        return _CANONICAL_MAGIC + len(header_bytes).to_bytes(4, "little") + header_bytes + body

    @classmethod
    def from_bytes(cls, data: bytes) -> Weights:
        if not data.startswith(_CANONICAL_MAGIC):
            raise ValueError("not a fedcore weights encoding")
        pos = len(_CANONICAL_MAGIC)
        size = int.from_bytes(data[pos : pos + 4], "little")
        pos += 4
        header = json.loads(data[pos : pos + size])
        pos += size
        arrays: dict[str, np.ndarray] = {}
        for name, dtype, shape in header:
            dt = np.dtype(dtype)
            count = int(np.prod(shape)) if shape else 1
            arrays[name] = np.frombuffer(data, dtype=dt, count=count, offset=pos).reshape(shape)
            pos += count * dt.itemsize
        return cls(arrays=arrays)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def allclose(self, other: Weights, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
        return self.names == other.names and all(
            np.allclose(self.arrays[k], other.arrays[k], rtol=rtol, atol=atol) for k in self.names
        )

    @classmethod
    def zeros_like(cls, other: Weights) -> Weights:
        return cls(arrays={k: np.zeros_like(v) for k, v in other.arrays.items()})


class GlobalModel(Frozen):
    """Server -> sites: the global weights at the start of ``round``.

    :ivar round: the round, from 1.
    :ivar weights: the global model.
    """

    round: int
    weights: Weights


class ClientUpdate(Frozen):
    """Site -> server: the change a site proposes, as released (after its privacy stages).

    :ivar site: the site's index.
    :ivar round: the round it answers.
    :ivar delta: trained weights minus the round's global weights (clipped and noised under DP).
    :ivar n_samples: the update's weight in FedAvg-style means: training rows (1 under site-level and central DP).
    :ivar local_steps: optimizer steps the site took.
    :ivar train_loss: the mean training loss of those steps.
    :ivar train_seconds: the site's training time.
    """

    site: int
    round: int
    delta: Weights
    n_samples: int = Field(gt=0)
    local_steps: int = 0
    train_loss: float = float("nan")
    train_seconds: float = 0.0
    extras: dict[str, Weights] = Field(default_factory=dict)
    """Additional tensors an algorithm sends (for example SCAFFOLD's control-variate delta)."""

    def nbytes(self) -> int:
        return self.delta.nbytes() + sum(w.nbytes() for w in self.extras.values())

    def canonical_bytes(self) -> bytes:
        """The update as released: the delta's bytes, then each extra's name and bytes, by name."""
        parts = [self.delta.to_bytes()]
        for name in sorted(self.extras):
            parts += [name.encode(), self.extras[name].to_bytes()]
        return b"".join(parts)

    def digest(self) -> str:
        """SHA-256 of :meth:`canonical_bytes`."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()


class SecureSum(Frozen):
    """What the server learns under secure aggregation: only sums over sites.

    :ivar round: the round.
    :ivar total_samples: ``sum_i n_i``.
    :ivar n_sites: how many sites the sum holds.
    """

    round: int
    weighted_delta_sum: Weights
    """``sum_i n_i * delta_i`` over the participating sites."""
    total_samples: int
    n_sites: int
    extras_sum: dict[str, Weights] = Field(default_factory=dict)
    """Unweighted sums of each extra tensor (``sum_i extra_i``)."""

    def mean_delta(self) -> Weights:
        return self.weighted_delta_sum.scale(1.0 / self.total_samples)


class ClassificationMetrics(Frozen):
    """Metrics of one model on one split: accuracy and macro precision, recall, F1.

    :ivar n: rows of the split.
    :ivar loss: mean cross-entropy (NaN on an empty split or a diverged model).
    :ivar accuracy: fraction of rows predicted right.
    :ivar precision: macro precision (a class never predicted counts 0).
    :ivar recall: macro recall.
    :ivar f1: macro F1.
    """

    n: int
    loss: float
    accuracy: float
    precision: float
    recall: float
    f1: float
    # Left out of JSON when empty: a run without evaluation.metrics writes what it always wrote.
    scores: dict[str, float | None] = Field(default_factory=dict, exclude_if=lambda value: not value)
    """The spec's ``evaluation.metrics`` (scikit-learn, :func:`fedcore.metrics.scores`); None: undefined on this split."""


class SiteEvaluation(Frozen):
    """Evaluation of the global model on one site's data (the site sends only metrics).

    :ivar site: the site's index.
    :ivar validation: metrics on the site's validation split.
    :ivar test: metrics on the site's test split.
    :ivar validation_confusion: confusion counts (rows: true class, columns: predicted) of the validation split.
    :ivar test_confusion: confusion counts of the test split.
    :ivar validation_histogram: with ``auroc`` in ``evaluation.metrics``: per class, counts of its predicted
        probability in 1000 bins over other rows and its own (:func:`fedcore.metrics.score_histogram`).
    :ivar test_histogram: the same for the test split.
    """

    site: int
    validation: ClassificationMetrics
    test: ClassificationMetrics
    # Confusion counts let the server pool metrics exactly without seeing predictions.
    validation_confusion: list[list[int]]
    test_confusion: list[list[int]]
    # Only with ``auroc`` in evaluation.metrics: per class, histograms of its predicted
    # probability (fedcore.metrics.score_histogram), for the pooled AUROC. Not kept in rounds.jsonl.
    validation_histogram: list[list[list[int]]] | None = Field(None, exclude_if=lambda value: value is None)
    test_histogram: list[list[list[int]]] | None = Field(None, exclude_if=lambda value: value is None)

    def without_histograms(self) -> SiteEvaluation:
        """The evaluation as ``rounds.jsonl`` keeps it (the histograms served pooling only)."""
        if self.validation_histogram is None and self.test_histogram is None:
            return self
        return self.model_copy(update={"validation_histogram": None, "test_histogram": None})


class PrivacySpent(Frozen):
    """Privacy loss computed by an accountant for the run so far.

    :ivar mechanism: the privacy mechanism's ``use`` name.
    :ivar unit: what one unit of privacy protects: ``record`` (one training row), ``patient``
        (all rows of one patient: group privacy over ``max_rows_per_patient``), ``site`` (a
        whole hospital's data), ``none`` (nothing: a mechanism that reports without protecting).
    :ivar epsilon: the accounted epsilon for the steps actually run.
    :ivar delta: the accountant's delta.
    :ivar accountant: the accountant (``rdp``, ``prv``...).
    :ivar noise_multiplier: the noise multiplier sigma, when the mechanism has one.
    :ivar max_grad_norm: the clipping norm, when it has one.
    :ivar steps: composed steps (DP-SGD steps, rounds) so far.
    :ivar notes: lines for the report (group privacy, what stays outside the guarantee).
    """

    mechanism: str
    unit: Literal["record", "patient", "site", "none"]
    epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    steps: int = 0
    notes: list[str] = Field(default_factory=list)


class LedgerRecord(Frozen):
    """One fact to record on the audit ledger: a digest, never the payload itself.

    :ivar kind: what the entry records.
    :ivar round: the round (0: before training).
    :ivar payload_sha256: SHA-256 of the payload (a hiding commitment where the payload is a site's).
    :ivar metadata: small public facts beside the digest (sizes, epsilon).
    """

    kind: Literal[
        "spec", "preprocessing", "site-update", "aggregate", "global-model", "privacy-spent", "dropout", "run-end", "resume"
    ]
    round: int
    writer: str
    """``server`` or ``site-<i>``: whose key signs the entry."""
    payload_sha256: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class LedgerHead(Frozen):
    """A signed statement of the ledger's newest entry, kept outside the ledger."""

    sequence: int
    entry_hash: str
    signature: str = ""
    signer: str = ""


class RoundRecord(Frozen):
    """Everything measured in one round (one line of ``rounds.jsonl``).

    :ivar arm: the sweep arm's label (``main`` without a sweep).
    :ivar repeat: the repeat, from 0.
    :ivar round: the round (federated, cyclic) or epoch (centralized, local), from 1.
    :ivar mode: ``federated``, or the baseline: ``centralized``, ``local`` (each centre alone), ``cyclic``.
    :ivar validation: pooled validation metrics (the sites' confusion counts summed).
    :ivar test: pooled test metrics.
    :ivar per_site: every site's evaluation (without score histograms).
    :ivar train_loss: the sites' mean training loss.
    :ivar round_seconds: the round's wall time.
    :ivar update_bytes: bytes of each site's update.
    :ivar update_seconds: each site's training time.
    :ivar privacy: what each privacy mechanism's accountant computed so far.
    """

    arm: str
    repeat: int
    round: int
    mode: Literal["federated", "centralized", "local", "cyclic"]
    epoch: int
    """Local epochs completed per site (federated, cyclic), epochs on pooled data (centralized)
    or on each centre's own data (local)."""
    validation: ClassificationMetrics
    test: ClassificationMetrics
    per_site: list[SiteEvaluation] = Field(default_factory=list)
    train_loss: float = float("nan")
    round_seconds: float = 0.0
    update_bytes: list[int] = Field(default_factory=list)
    update_seconds: list[float] = Field(default_factory=list)
    privacy: list[PrivacySpent] = Field(default_factory=list)
    sites: list[str] = Field(default_factory=list)
    """Deployment: the sites whose update this round aggregated (empty in simulation: all)."""
    absent_sites: list[str] = Field(default_factory=list)
    """Deployment: the sites that sent no usable update in time (dropped out or refused)."""


def json_bytes(payload: Any) -> bytes:
    """Canonical JSON (sorted keys, no spaces, UTF-8)."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()


def json_digest(payload: Any) -> str:
    """SHA-256 of :func:`json_bytes`."""
    return hashlib.sha256(json_bytes(payload)).hexdigest()
