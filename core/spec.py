"""The experiment spec: YAML -> validated :class:`ExperimentSpec`, overrides, sweeps, checks.

Every error is a one-line :class:`~fedcore.errors.SpecError` naming the file,
the line where known, the spec path (``aggregator.settings.mu``) and the fix.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedcore.components import (
    Aggregator,
    Attack,
    Audit,
    Observer,
    Component,
    Dataset,
    KINDS,
    Ledger,
    Model,
    PrivacyMechanism,
    SecureAggregator,
)
from fedcore.errors import FedcoreUserError, PluginError, SpecError
from fedcore.registry import PluginManager


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


#: the largest seed: ``seed + repeat`` stays a 63-bit integer for numpy and torch
MAX_SEED = 2**62


class PluginRef(_Strict):
    """A plugin reference: ``{use: NAME, settings: {...}}``."""

    use: str
    settings: dict[str, Any] = Field(default_factory=dict)

    def label(self) -> str:
        if not self.settings:
            return self.use
        inner = ",".join(f"{k}={v}" for k, v in self.settings.items())
        return f"{self.use}({inner})"


class TrainingSpec(_Strict):
    """Local training at every site (and the centralized baseline)."""

    rounds: int = Field(10, ge=1, le=100_000)
    local_epochs: int = Field(5, ge=1, le=10_000)
    local_steps: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        exclude_if=lambda value: value is None,
        description="optimizer steps per site and round, whatever the site's size (instead of local_epochs; "
        "epochs then count rounds)",
    )
    batch_size: int = Field(32, ge=1, le=10_000_000)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    learning_rate: float = Field(0.001, gt=0)
    momentum: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    # Deployment only (fedcore run --federation); the simulation never drops a site.
    min_sites: int | None = Field(None, ge=1, description="deployment: quorum of sites a round needs (default: all)")
    round_timeout_s: float = Field(600.0, gt=0, description="deployment: how long a round waits for the sites' updates")
    round_retries: int = Field(2, ge=0, description="deployment: retries of a round below quorum before the run stops")

    @model_validator(mode="before")
    @classmethod
    def _steps_or_epochs(cls, data: Any) -> Any:
        """``local_steps`` replaces ``local_epochs``: one of them (``local_epochs`` is then 1)."""
        if isinstance(data, dict) and data.get("local_steps") is not None:
            if data.get("local_epochs", 1) != 1:
                raise ValueError("set local_epochs or local_steps, not both (remove one of them)")
            data = {**data, "local_epochs": 1}
        return data


class BaselineSpec(_Strict):
    """The comparisons of an FL table, with the same splits, model and seeds as the federated arms.

    ``centralized``: one model on the pooled training data; ``local``: each centre trains
    alone and is scored on its own splits; ``cyclic``: one model trained centre after
    centre, every round. ``training`` replaces the spec's ``training`` for all three.
    Fields left at their defaults are left out of the spec's dump (its digest stays).
    """

    centralized: bool = False
    epochs: int | None = Field(None, ge=1, le=1_000_000, description="default: rounds x local_epochs")
    local: bool = Field(False, exclude_if=lambda value: not value, description="each centre alone, scored on its own splits")
    cyclic: bool = Field(False, exclude_if=lambda value: not value, description="one model, centre after centre, every round")
    training: TrainingSpec | None = Field(
        None, exclude_if=lambda value: value is None, description="the baselines' training (default: the spec's training)"
    )

    def modes(self) -> list[str]:
        """The baselines this spec asks for, in table order."""
        return [mode for mode in ("centralized", "local", "cyclic") if getattr(self, mode)]


#: the metrics ``evaluation.metrics`` may name (scikit-learn's implementations, :mod:`fedcore.metrics`)
METRIC_NAMES = ("accuracy", "balanced_accuracy", "auroc", "f1", "precision", "recall", "per_class_recall")
MetricName = Literal["accuracy", "balanced_accuracy", "auroc", "f1", "precision", "recall", "per_class_recall"]


class EvaluationSpec(_Strict):
    """Which metrics every site and the pooled evaluation report, and which one leads.

    Without ``metrics`` the run reports accuracy and macro precision, recall and F1 (as
    always). ``primary`` is the metric of convergence, the headline tables and the figure.
    """

    metrics: list[MetricName] = Field(default_factory=list, description="default: accuracy, precision, recall, f1")
    primary: MetricName = Field("accuracy", description="the metric of convergence and of the headline tables")

    @model_validator(mode="after")
    def _primary_is_reported(self) -> EvaluationSpec:
        if self.primary == "per_class_recall":
            raise ValueError("primary must be one number: per_class_recall is one per class (use recall or balanced_accuracy)")
        reported = self.metrics or ["accuracy", "precision", "recall", "f1"]
        if self.primary not in reported:
            raise ValueError(f"primary '{self.primary}' is not among evaluation.metrics; add it to metrics")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError("evaluation.metrics names a metric twice; list each once")
        return self


class ExecutionSpec(_Strict):
    """How the simulation runs; never changes the numbers it produces."""

    engine: Literal["auto", "sequential", "vectorized"] = Field(
        "auto", description="auto: vectorized when the model and plugins allow it, else sequential"
    )
    workers: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="parallel worker processes; default: as many as the work pays for "
        "(one on device cuda, where processes would take turns on the GPU)",
    )
    threads_per_worker: int | None = Field(
        None, ge=1, le=1024, description="torch threads per worker; default: 1, or up to 8 on device cuda (see torch_threads)"
    )
    device: Literal["cpu", "cuda"] = Field("cpu", description="cuda: the vectorized engine on the GPU")
    out_dir: str | None = None
    checkpoints: bool = True
    progress: bool = True
    reproducible_noise: bool = Field(
        False,
        description="research mode: DP noise, DP sampling and ledger salts derived from `seed` "
        "(not private against anyone who knows the seed); default: the OS CSPRNG (fedcore.randomness)",
    )

    def torch_threads(self) -> int:
        """Torch threads of each worker: ``threads_per_worker``, else 1 on a CPU (workers fill the
        cores) and up to 8 on ``cuda``, where one process trains on the GPU and evaluates the
        models on the CPU (8 threads: 88 -> 77 s for ``specs/paper.yaml`` on an H200, docs/speed.md)."""
        if self.threads_per_worker is not None:
            return self.threads_per_worker
        return min(8, os.cpu_count() or 1) if self.device == "cuda" else 1


class ExperimentSpec(_Strict):
    """A whole experiment. The core owns these keys; plugins fill their ``settings``."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    repeats: int = Field(1, ge=1, le=10_000)
    data: PluginRef
    model: PluginRef = PluginRef(use="mlp")
    training: TrainingSpec = TrainingSpec()
    aggregator: PluginRef = PluginRef(use="fedavg")
    privacy: list[PluginRef] = Field(default_factory=list)
    secure_aggregation: PluginRef | None = None
    ledger: PluginRef | None = None
    attacks: list[PluginRef] = Field(default_factory=list)
    audits: list[PluginRef] = Field(default_factory=list)
    observers: list[PluginRef] = Field(
        default_factory=list, exclude_if=lambda value: not value, description="experiment trackers, logs (watch only)"
    )
    baseline: BaselineSpec = BaselineSpec()
    # Left out of the dump when default: a spec without it keeps its digest (spec_sha256, the ledger).
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, exclude_if=lambda value: value == EvaluationSpec())
    sweep: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(default_factory=dict)
    execution: ExecutionSpec = ExecutionSpec()

    def as_baseline(self) -> ExperimentSpec:
        """The spec a baseline trains by: ``training`` replaced by ``baseline.training`` where set."""
        if self.baseline.training is None:
            return self
        return self.model_copy(update={"training": self.baseline.training})

    @property
    def baseline_training(self) -> TrainingSpec:
        """The baselines' training: ``baseline.training``, else ``training``."""
        return self.baseline.training or self.training

    @property
    def baseline_epochs(self) -> int:
        """Epochs of the centralized and local baselines (default: rounds x local epochs of their training)."""
        training = self.baseline_training
        return self.baseline.epochs or training.rounds * training.local_epochs


#: spec path of each plugin slot -> component kind (views of :data:`fedcore.components.KINDS`)
SLOTS: dict[str, str] = {kind.slot: kind.name for kind in KINDS if not kind.many}
LIST_SLOTS: dict[str, str] = {kind.slot: kind.name for kind in KINDS if kind.many}
#: top-level keys a sweep may not vary (they hold for the whole run)
UNSWEPT = ("sweep", "name", "seed", "repeats", "execution", "evaluation", "observers")
#: the largest spec file read, and the most YAML nodes it may expand to (aliases included)
MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_NODES = 100_000


# ------------------------------------------------------------------ YAML reading


@dataclass
class SpecSource:
    """The raw mapping of a spec and where each path was written (for error lines).

    ``arm`` is set while a sweep arm is validated: its ``(sweep path, value index)``
    pairs, so an error in the arm points at the sweep entry (and its line) that made it.
    """

    path: Path | None
    raw: dict[str, Any]
    lines: dict[tuple[str, ...], int]
    arm: tuple[tuple[str, int], ...] = ()

    def line_of(self, loc: Sequence[Any]) -> int | None:
        """The line where ``loc`` (or its nearest written parent) is in the file."""
        key = tuple(str(p) for p in loc)
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return None

    def where(self, loc: Sequence[Any]) -> str:
        """``file:line: dotted.path`` of ``loc``; in a sweep arm, the sweep entry's line and value."""
        dotted = ".".join(str(p) for p in loc) or "<top>"
        prefix = str(self.path) if self.path else "<spec>"
        if self.arm:
            entry, index = self._sweep_entry(loc)
            line = self.line_of(("sweep", entry, index))
            at = f":{line}" if line is not None else ""
            return f"{prefix}{at}: sweep.{entry}[{index}] -> {dotted}"
        line = self.line_of(loc)
        if line is not None:
            prefix += f":{line}"
        return f"{prefix}: {dotted}"

    def _sweep_entry(self, loc: Sequence[Any]) -> tuple[str, int]:
        """The sweep assignment of this arm that wrote ``loc`` (or a parent or child of it)."""
        parts = [str(p) for p in loc]
        for entry, index in self.arm:
            for path_ in entry.split("+"):  # a grouped entry sets several paths
                swept = path_.split(".")
                common = min(len(swept), len(parts))
                if swept[:common] == parts[:common]:
                    return entry, index
        return self.arm[0]

    def for_arm(self, arm: Sequence[tuple[str, int]]) -> SpecSource:
        return SpecSource(self.path, self.raw, self.lines, tuple(arm))


_DOTTED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[([^\]]+)\])?((?:\.[A-Za-z0-9_-]+)*)$")


def spec_loc(where: str | None, raw: dict[str, Any]) -> tuple[str | int, ...] | None:
    """A plugin's ``where`` ("privacy.0.settings.epsilon", "privacy[dpsgd].use") as a spec path, or None."""
    match = _DOTTED.match(where or "")
    if match is None or match.group(1) not in ExperimentSpec.model_fields:
        return None
    head, item, rest = match.groups()
    loc: list[str | int] = [head]
    if item is not None:
        entries = raw.get(head) if isinstance(raw.get(head), list) else []
        names = [e.get("use") if isinstance(e, dict) else None for e in entries]
        loc.append(int(item) if item.isdigit() else names.index(item) if item in names else item)
    loc += [int(p) if p.isdigit() else p for p in rest.split(".") if p]
    return tuple(loc)


def locate(exc: FedcoreUserError, source: SpecSource, default: Sequence[Any] = ()) -> FedcoreUserError:
    """``exc`` pointing at its spec path's file and line (``default`` when it names none).

    Components raise errors naming a spec path only (``aggregator.settings.f``); this adds
    the file, the line and, in a sweep arm, the sweep entry. Errors naming a data file
    (``data.csv: column age``) keep their place.
    """
    loc = spec_loc(exc.where, source.raw)
    if loc is not None:
        return exc.relocated(source.where(loc))
    if exc.where is None:
        return exc.relocated(source.where(default))
    return exc


def _node_lines(node: yaml.Node, path: tuple[str, ...], out: dict[tuple[str, ...], int], label: str) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen and key != "<<":
                dotted = ".".join((*path, key))
                raise SpecError(
                    f"key '{key}' is written twice (the second would silently win)",
                    where=f"{label}:{key_node.start_mark.line + 1}: {dotted}",
                    hint="keep one of them",
                )
            seen.add(key)
            out[path + (key,)] = key_node.start_mark.line + 1
            _node_lines(value_node, path + (key,), out, label)
            out[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _node_lines(item, path + (str(index),), out, label)


def _expanded_nodes(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many nodes ``node`` stands for once its aliases are expanded (a YAML bomb is huge)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a cycle counts once
    count = 1
    if isinstance(node, yaml.MappingNode):
        count += sum(_expanded_nodes(k, memo) + _expanded_nodes(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        count += sum(_expanded_nodes(item, memo) for item in node.value)
    memo[id(node)] = min(count, 10 * MAX_SPEC_NODES)
    return memo[id(node)]


def read_spec_source(path: Path | str) -> SpecSource:
    """Read and parse a YAML spec file; malformed YAML and missing files are user errors."""
    path = Path(path)
    if path.is_dir():
        raise SpecError(f"{path} is a directory, not a spec file", hint="pass a YAML file such as specs/paper.yaml")
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}", hint="check the path (specs live in specs/)")
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(
                f"the spec is {size} bytes; a spec is at most {MAX_SPEC_BYTES} bytes",
                where=str(path),
                hint="pass the spec, not a data file (data files go in data.settings)",
            )
        data = path.read_bytes()
    except OSError as exc:
        raise SpecError(f"cannot read the spec: {exc.strerror}", where=str(path), hint="check the file's permissions") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"the spec is not UTF-8 text (byte {exc.start})", where=str(path), hint="save it as UTF-8 YAML"
        ) from None
    return parse_spec_text(text, path)


def parse_spec_text(text: str, path: Path | None = None) -> SpecSource:
    label = str(path) if path else "<spec>"
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise SpecError("the spec holds a NUL byte", where=f"{label}:{line}", hint="save it as plain UTF-8 YAML text")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and _expanded_nodes(node, {}) > MAX_SPEC_NODES:
            raise SpecError(
                f"the spec expands to more than {MAX_SPEC_NODES} YAML nodes (aliases included)",
                where=label,
                hint="write the spec without nested aliases",
            )
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"malformed YAML: {problem}", where=f"{label}{at}", hint="fix the YAML syntax") from None
    except RecursionError:
        raise SpecError("the spec is nested too deeply", where=label, hint="flatten the YAML") from None
    if not isinstance(raw, dict):
        raise SpecError(
            "a spec must be a YAML mapping of keys (name, data, model, ...)",
            where=label,
            hint="start from specs/paper.yaml; `fedcore validate` checks a spec",
        )
    lines: dict[tuple[str, ...], int] = {}
    if node is not None:
        _node_lines(node, (), lines, label)
    return SpecSource(path, raw, lines)


# --------------------------------------------------------------------- overrides


def _parse_path(dotted: str) -> list[str | int]:
    if not dotted or not re.fullmatch(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*", dotted):
        raise SpecError(f"bad path '{dotted}'", hint="use dotted keys such as training.rounds or privacy.0.settings.epsilon")
    return [int(p) if p.isdigit() else p for p in dotted.split(".")]


def set_path(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of ``raw`` with ``value`` at ``dotted`` (list indexes allowed; missing keys created)."""
    out = copy.deepcopy(raw)
    parts = _parse_path(dotted)
    node: Any = out
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(str(p) for p in parts[: i + 1])
        if isinstance(node, list):
            if not isinstance(part, int) or not 0 <= part < len(node):
                raise SpecError(f"no list item {part} (the list has {len(node)})", where=here)
            if last:
                node[part] = value
            else:
                if node[part] is None:
                    node[part] = {}
                node = node[part]
        elif isinstance(node, dict):
            key = str(part)
            if last:
                node[key] = value
            else:
                if node.get(key) is None:
                    node[key] = {}
                node = node[key]
        else:
            parent = ".".join(str(p) for p in parts[:i])
            raise SpecError(
                f"cannot set a key inside a scalar value ('{parent}' holds a value, not keys)",
                where=here,
                hint=f"set '{parent}' itself",
            )
    return out


def apply_overrides(source: SpecSource, overrides: Sequence[str]) -> SpecSource:
    """Apply ``--set dotted.path=value`` overrides; the value is parsed as YAML."""
    raw = source.raw
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"--set '{item}' has no '='", hint="write --set training.rounds=3")
        dotted, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        try:
            raw = set_path(raw, dotted.strip(), value)
        except SpecError as exc:
            raise exc.relocated(f"--set {item}" + (f": {exc.where}" if exc.where else "")) from None
    return SpecSource(source.path, raw, source.lines)


# -------------------------------------------------------------------- validation


def _first_error_message(exc: ValidationError) -> tuple[tuple[Any, ...], str, str]:
    err = exc.errors()[0]
    loc = tuple(err.get("loc", ()))
    kind = err.get("type", "")
    msg = err.get("msg", "invalid value")
    given = err.get("input")
    if kind == "extra_forbidden":
        return loc, f"unknown key '{loc[-1]}'", "remove it or check its spelling"
    if kind == "missing":
        return loc, "required key is missing", "add it"
    if kind in ("finite_number", "float_parsing") and _non_finite_text(given):
        return loc, f"must be a finite number (got {given!r})", "write a finite number, e.g. 0.5 or 1e-3"
    if kind == "value_error" and isinstance(given, dict):
        # A check across several keys (a model validator): its message names the keys and the fix.
        return loc, msg.removeprefix("Value error, "), "change these settings as the message says"
    if kind == "too_short" and isinstance(given, list) and not given:
        return loc, "the list is empty", "give at least one value, or remove the key"
    msg = msg.removeprefix("Value error, ")
    shown = repr(given)[:60] if not isinstance(given, dict | list) else type(given).__name__
    return loc, f"{msg} (got {shown})", "change the value"


def _non_finite_text(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    text = str(value).strip().lower().lstrip("+-.")
    return text in ("inf", "infinity", "nan")


def _first_non_finite(value: Any, loc: tuple[Any, ...] = ()) -> tuple[tuple[Any, ...], float] | None:
    """Path and value of the first inf or nan anywhere in ``value`` (settings dumped to Python)."""
    if isinstance(value, float) and not math.isfinite(value):
        return loc, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else ()
    for key, item in items:
        found = _first_non_finite(item, (*loc, key))
        if found is not None:
            return found
    return None


def _validate_model(model: type[BaseModel], data: Any, source: SpecSource, prefix: Sequence[Any]) -> BaseModel:
    """Validate ``data`` against ``model``; no inf or nan passes, whatever the model's own config says."""
    try:
        validated = model.model_validate(data)
    except ValidationError as exc:
        loc, msg, hint = _first_error_message(exc)
        full = tuple(prefix) + loc
        if loc and loc[-1] not in ("use",) and msg.startswith("unknown key") and hasattr(model, "model_fields"):
            valid = sorted(_fields_at(model, loc[:-1]))
            if valid:
                hint = f"{hint}; valid keys: {', '.join(valid)}"
        raise SpecError(msg, where=source.where(full), hint=hint) from None
    found = _first_non_finite(validated.model_dump(mode="python"))
    if found is not None:
        loc, value = found
        raise SpecError(
            f"must be a finite number (got {value})",
            where=source.where((*prefix, *loc)),
            hint="write a finite number, e.g. 0.5 or 1e-3",
        )
    return validated


def _fields_at(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ()) or ()
        candidates = [a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return []
        current = candidates[0]
    return list(getattr(current, "model_fields", {}))


@dataclass(frozen=True)
class Arm:
    """One combination of a sweep (or the whole spec when there is no sweep)."""

    label: str
    spec: ExperimentSpec
    assignments: tuple[tuple[str, Any], ...] = ()
    """``(spec path, value)`` of every swept path (a grouped entry gives one per path)"""
    indexes: tuple[tuple[str, int], ...] = ()
    """``(sweep entry, value index)`` per sweep entry"""


@dataclass(frozen=True)
class Experiment:
    """A validated spec, its sweep arms, and the plugin manager that resolved it."""

    spec: ExperimentSpec
    arms: list[Arm]
    plugins: PluginManager
    source: SpecSource


def _validate_arm(raw: dict[str, Any], source: SpecSource, plugins: PluginManager) -> ExperimentSpec:
    spec = _validate_model(ExperimentSpec, raw, source, ())
    assert isinstance(spec, ExperimentSpec)
    updates: dict[str, Any] = {}
    for slot, kind in SLOTS.items():
        ref = getattr(spec, slot)
        if ref is not None:
            updates[slot] = _resolve_ref(ref, kind, (slot,), source, plugins)
    for slot, kind in LIST_SLOTS.items():
        updates[slot] = [
            _resolve_ref(ref, kind, (slot, i), source, plugins) for i, ref in enumerate(getattr(spec, slot))
        ]
    spec = spec.model_copy(update=updates)
    check_capabilities(spec, plugins, source)
    return spec


def _resolve_ref(
    ref: PluginRef, kind: str, loc: tuple[Any, ...], source: SpecSource, plugins: PluginManager
) -> PluginRef:
    cls = plugins.get(kind, ref.use, where=source.where(loc + ("use",)))
    settings = _validate_model(cls.Settings, ref.settings, source, loc + ("settings",))
    return PluginRef(use=ref.use, settings=settings.model_dump(mode="json"))


def instantiate(ref: PluginRef, kind: str, plugins: PluginManager) -> Component:
    """A component instance for an already-validated reference."""
    cls = plugins.get(kind, ref.use, where=kind)
    return cls(cls.Settings.model_validate(ref.settings))


@dataclass
class Components:
    """Fresh component instances for one training run (aggregators keep state)."""

    dataset: Dataset
    model: Model
    aggregator: Aggregator
    privacy: list[PrivacyMechanism]
    secure_aggregation: SecureAggregator | None
    ledger: Ledger | None
    attacks: list[Attack]
    audits: list[Audit] = field(default_factory=list)
    observers: list[Observer] = field(default_factory=list)


def build_components(spec: ExperimentSpec, plugins: PluginManager) -> Components:
    def one(ref: PluginRef | None, kind: str) -> Any:
        return None if ref is None else instantiate(ref, kind, plugins)

    return Components(
        dataset=one(spec.data, "dataset"),
        model=one(spec.model, "model"),
        aggregator=one(spec.aggregator, "aggregator"),
        privacy=[one(r, "privacy") for r in spec.privacy],
        secure_aggregation=one(spec.secure_aggregation, "secure_aggregator"),
        ledger=one(spec.ledger, "ledger"),
        attacks=[one(r, "attack") for r in spec.attacks],
        audits=[one(r, "audit") for r in spec.audits],
        observers=[one(r, "observer") for r in spec.observers],
    )


def check_capabilities(spec: ExperimentSpec, plugins: PluginManager, source: SpecSource | None = None) -> None:
    """Cross-plugin checks made when the spec loads, before any data is read."""
    where = source.where if source else (lambda loc: ".".join(map(str, loc)))
    aggregator_cls = plugins.get("aggregator", spec.aggregator.use, where=where(("aggregator", "use")))
    if spec.secure_aggregation is not None and getattr(aggregator_cls, "needs_individual_updates", False):
        raise SpecError(
            f"aggregator '{spec.aggregator.use}' needs individual updates, but secure aggregation "
            f"'{spec.secure_aggregation.use}' reveals only their sum",
            where=where(("secure_aggregation",)),
            hint="remove secure_aggregation or choose an aggregator that needs only the sum (fedavg, fedavgm, fedadam...)",
        )
    components = build_components(spec, plugins)
    everyone: list[tuple[tuple[Any, ...], Component]] = [
        (("data",), components.dataset),
        (("model",), components.model),
        (("aggregator",), components.aggregator),
        *((("privacy", i), c) for i, c in enumerate(components.privacy)),
        *((("attacks", i), c) for i, c in enumerate(components.attacks)),
        *((("audits", i), c) for i, c in enumerate(components.audits)),
        *((("observers", i), c) for i, c in enumerate(components.observers)),
    ]
    everyone += [((slot,), c) for slot, c in (("secure_aggregation", components.secure_aggregation), ("ledger", components.ledger)) if c is not None]
    for loc, component in everyone:
        try:
            component.check_spec(spec, components)
        except FedcoreUserError as exc:
            if source is None:
                raise
            raise locate(exc, source, loc) from None


def _as_refs(value: Any) -> list[dict[str, Any]] | None:
    """A swept value as a list of plugin references, or None when it is not one."""
    if isinstance(value, dict) and "use" in value:
        return [value]
    if isinstance(value, list) and all(isinstance(v, dict) and "use" in v for v in value):
        return value
    return None


def _show(value: Any, alternatives: Sequence[Any]) -> str:
    """A swept value for an arm label: plugin references show only the settings that vary."""
    refs = _as_refs(value)
    if refs is None:
        return str(value)
    others = [r for r in (_as_refs(v) for v in alternatives) if r is not None]
    parts = []
    for index, ref in enumerate(refs):
        settings = ref.get("settings") or {}
        # Compared with the same plugin at the same place in the other values: what tells them apart.
        peers = [o[index].get("settings") or {} for o in others if len(o) > index and o[index]["use"] == ref["use"]]
        varying = {key: val for key, val in settings.items() if any(peer.get(key) != val for peer in peers)}
        inner = ",".join(f"{k}={v}" for k, v in varying.items())
        parts.append(f"{ref['use']}({inner})" if inner else ref["use"])
    return "+".join(parts) or "none"


def _arm_label(assignments: Sequence[tuple[str, Any]], alternatives: dict[str, list[Any]]) -> str:
    """``path=value, ...`` (``alternatives``: every value each path takes, to show what varies)."""
    return ", ".join(f"{path}={_show(value, alternatives[path])}" for path, value in assignments) or "main"


def _grouped_values(entry: str, values: list[Any], source: SpecSource) -> list[list[Any]]:
    """A sweep entry's values as one list per arm, a value per path of the entry.

    ``training.learning_rate: [0.1, 0.01]`` sweeps one path; ``aggregator+training.learning_rate:
    [[{use: fedavg}, 0.1], [{use: fedprox}, 0.01]]`` sets several paths together, one arm per
    item (an aggregator with its own client learning rate).
    """
    paths = entry.split("+")
    if len(paths) == 1:
        return [[value] for value in values]
    for index, value in enumerate(values):
        if not isinstance(value, list) or len(value) != len(paths):
            raise SpecError(
                f"sweep entry '{entry}' sets {len(paths)} paths together: each value must be a list of {len(paths)}",
                where=source.where(("sweep", entry, index)),
                hint=f"write [{', '.join(f'<{p}>' for p in paths)}] per arm",
            )
    return values


def load_experiment(
    path: Path | str | None = None,
    overrides: Sequence[str] = (),
    plugins: PluginManager | None = None,
    *,
    text: str | None = None,
) -> Experiment:
    """Read, override, validate and resolve a spec and expand its sweep into arms."""
    source = parse_spec_text(text) if text is not None else read_spec_source(path)  # type: ignore[arg-type]
    source = apply_overrides(source, overrides)
    plugins = plugins or PluginManager()
    try:
        spec = _validate_arm(source.raw, source, plugins)
    except PluginError:
        raise
    arms: list[Arm] = []
    if not spec.sweep:
        arms.append(Arm("main", spec))
    else:
        entries = list(spec.sweep)
        grouped = {entry: _grouped_values(entry, spec.sweep[entry], source) for entry in entries}
        paths = [path_ for entry in entries for path_ in entry.split("+")]
        for path_ in paths:
            try:
                _parse_path(path_)
            except SpecError as exc:
                raise exc.relocated(source.where(("sweep", path_))) from None
            if path_.split(".")[0] not in ExperimentSpec.model_fields:
                raise SpecError(
                    f"cannot sweep '{path_}': '{path_.split('.')[0]}' is not a key of the spec",
                    where=source.where(("sweep", path_)),
                    hint=f"sweep a path such as training.learning_rate; keys: {', '.join(ExperimentSpec.model_fields)}",
                )
            if path_.split(".")[0] in UNSWEPT:
                raise SpecError(
                    f"cannot sweep '{path_}'",
                    where=source.where(("sweep", path_)),
                    hint=f"{', '.join(UNSWEPT)} hold for the whole run; sweep another key or write two specs",
                )
        alternatives = {path_: [values[k] for values in grouped[entry]] for entry in entries for k, path_ in enumerate(entry.split("+"))}
        for indexes in itertools.product(*(range(len(spec.sweep[e])) for e in entries)):
            arm_indexes_ = tuple(zip(entries, indexes, strict=True))
            assignments = tuple(
                (path_, value)
                for entry, i in arm_indexes_
                for path_, value in zip(entry.split("+"), grouped[entry][i], strict=True)
            )
            arm_source = source.for_arm(arm_indexes_)
            raw = {k: v for k, v in source.raw.items() if k != "sweep"}
            for path_, value in assignments:
                try:
                    raw = set_path(raw, path_, value)
                except SpecError as exc:
                    raise locate(exc, arm_source, ("sweep", next(e for e in entries if path_ in e.split("+")))) from None
            arm_spec = _validate_arm(raw, arm_source, plugins)
            label = _arm_label(assignments, alternatives)
            if any(arm.label == label for arm in arms):
                raise SpecError(
                    f"two sweep arms are both '{label}'",
                    where=arm_source.where(("sweep",)),
                    hint="list each value once in every sweep entry",
                )
            arms.append(Arm(label, arm_spec, assignments, arm_indexes_))
    return Experiment(spec, arms, plugins, source)


def arm_indexes(experiment: Experiment, arm: Arm) -> tuple[tuple[str, int], ...]:
    """``(sweep entry, value index)`` of each of ``arm``'s sweep entries (for :meth:`SpecSource.for_arm`)."""
    return arm.indexes


def resolved_yaml(spec: ExperimentSpec) -> str:
    """The spec with every default filled in, as YAML."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
