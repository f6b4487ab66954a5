"""The experiment spec: YAML -> validated :class:`ExperimentSpec`, overrides, sweeps, checks.

Every error is a one-line :class:`~fedcore.errors.SpecError` naming the file,
the line where known, the spec path (``aggregator.settings.mu``) and the fix.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedcore.components import (
    Aggregator,
    Attack,
    Component,
    Dataset,
    KINDS,
    Ledger,
    Model,
    PrivacyMechanism,
    SecureAggregator,
)
from fedcore.errors import PluginError, SpecError
from fedcore.registry import PluginManager


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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

    rounds: int = Field(10, ge=1)
    local_epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    learning_rate: float = Field(0.001, gt=0)
    momentum: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.0, ge=0)


class BaselineSpec(_Strict):
    """The centralized comparison: the same model trained on the pooled training data."""

    centralized: bool = False
    epochs: int | None = Field(None, ge=1, description="default: rounds x local_epochs")


class ExecutionSpec(_Strict):
    """How the simulation runs; never changes the numbers it produces."""

    engine: Literal["auto", "sequential", "vectorized"] = Field(
        "auto", description="auto: vectorized when the model and plugins allow it, else sequential"
    )
    workers: int | None = Field(None, ge=1, description="parallel worker processes; default: CPU cores")
    threads_per_worker: int = Field(1, ge=1)
    device: Literal["cpu", "cuda"] = Field("cpu", description="cuda: the vectorized engine on the GPU")
    out_dir: str | None = None
    checkpoints: bool = True
    progress: bool = True
    reproducible_noise: bool = Field(
        False,
        description="research mode: DP noise, DP sampling and ledger salts derived from `seed` "
        "(not private against anyone who knows the seed); default: the OS CSPRNG (fedcore.randomness)",
    )


class ExperimentSpec(_Strict):
    """A whole experiment. The core owns these keys; plugins fill their ``settings``."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    repeats: int = Field(1, ge=1)
    data: PluginRef
    model: PluginRef = PluginRef(use="mlp")
    training: TrainingSpec = TrainingSpec()
    aggregator: PluginRef = PluginRef(use="fedavg")
    privacy: list[PluginRef] = Field(default_factory=list)
    secure_aggregation: PluginRef | None = None
    ledger: PluginRef | None = None
    attacks: list[PluginRef] = Field(default_factory=list)
    baseline: BaselineSpec = BaselineSpec()
    sweep: dict[str, list[Any]] = Field(default_factory=dict)
    execution: ExecutionSpec = ExecutionSpec()

    @property
    def baseline_epochs(self) -> int:
        return self.baseline.epochs or self.training.rounds * self.training.local_epochs


#: spec path of each plugin slot -> component kind (views of :data:`fedcore.components.KINDS`)
SLOTS: dict[str, str] = {kind.slot: kind.name for kind in KINDS if not kind.many}
LIST_SLOTS: dict[str, str] = {kind.slot: kind.name for kind in KINDS if kind.many}


# ------------------------------------------------------------------ YAML reading


@dataclass
class SpecSource:
    """The raw mapping of a spec and where each path was written (for error lines)."""

    path: Path | None
    raw: dict[str, Any]
    lines: dict[tuple[str, ...], int]

    def where(self, loc: Sequence[Any]) -> str:
        dotted = ".".join(str(p) for p in loc) or "<top>"
        line = None
        key = tuple(str(p) for p in loc)
        while key and line is None:
            line = self.lines.get(key)
            key = key[:-1]
        prefix = str(self.path) if self.path else "<spec>"
        if line is not None:
            prefix += f":{line}"
        return f"{prefix}: {dotted}"


def _node_lines(node: yaml.Node, path: tuple[str, ...], out: dict[tuple[str, ...], int]) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
            out[path + (key,)] = key_node.start_mark.line + 1
            _node_lines(value_node, path + (key,), out)
            out[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _node_lines(item, path + (str(index),), out)


def read_spec_source(path: Path | str) -> SpecSource:
    """Read and parse a YAML spec file; malformed YAML and missing files are user errors."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}", hint="check the path (specs live in specs/)")
    text = path.read_text(encoding="utf-8")
    return parse_spec_text(text, path)


def parse_spec_text(text: str, path: Path | None = None) -> SpecSource:
    label = str(path) if path else "<spec>"
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"malformed YAML: {problem}", where=f"{label}{at}", hint="fix the YAML syntax") from None
    if not isinstance(raw, dict):
        raise SpecError("a spec must be a YAML mapping of keys (name, data, model, ...)", where=label)
    lines: dict[tuple[str, ...], int] = {}
    if node is not None:
        _node_lines(node, (), lines)
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
            raise SpecError("cannot set a key inside a scalar value", where=here)
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
        raw = set_path(raw, dotted.strip(), value)
    return SpecSource(source.path, raw, source.lines)


# -------------------------------------------------------------------- validation


def _first_error_message(exc: ValidationError) -> tuple[tuple[Any, ...], str, str]:
    err = exc.errors()[0]
    loc = tuple(err.get("loc", ()))
    kind = err.get("type", "")
    msg = err.get("msg", "invalid value")
    if kind == "extra_forbidden":
        return loc, f"unknown key '{loc[-1]}'", "remove it or check its spelling"
    if kind == "missing":
        return loc, "required key is missing", "add it"
    given = err.get("input")
    shown = repr(given) if not isinstance(given, dict | list) else type(given).__name__
    return loc, f"{msg} (got {shown})", "change the value"


def _validate_model(model: type[BaseModel], data: Any, source: SpecSource, prefix: Sequence[Any]) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        loc, msg, hint = _first_error_message(exc)
        full = tuple(prefix) + loc
        if loc and loc[-1] not in ("use",) and msg.startswith("unknown key") and hasattr(model, "model_fields"):
            valid = sorted(_fields_at(model, loc[:-1]))
            if valid:
                hint = f"{hint}; valid keys: {', '.join(valid)}"
        raise SpecError(msg, where=source.where(full), hint=hint) from None


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
    everyone: list[Component] = [
        components.dataset,
        components.model,
        components.aggregator,
        *components.privacy,
        *components.attacks,
    ]
    everyone += [c for c in (components.secure_aggregation, components.ledger) if c is not None]
    for component in everyone:
        component.check_spec(spec, components)


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


def _arm_label(assignments: Sequence[tuple[str, Any]], sweep: dict[str, list[Any]]) -> str:
    return ", ".join(f"{path}={_show(value, sweep[path])}" for path, value in assignments) or "main"


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
        paths = list(spec.sweep)
        for path_ in paths:
            _parse_path(path_)
            if path_.split(".")[0] in ("sweep", "name", "repeats", "execution"):
                raise SpecError(f"cannot sweep '{path_}'", where=source.where(("sweep", path_)))
        for values in itertools.product(*(spec.sweep[p] for p in paths)):
            assignments = tuple(zip(paths, values, strict=True))
            raw = {k: v for k, v in source.raw.items() if k != "sweep"}
            for path_, value in assignments:
                raw = set_path(raw, path_, value)
            arm_spec = _validate_arm(raw, source, plugins)
            arms.append(Arm(_arm_label(assignments, spec.sweep), arm_spec, assignments))
    return Experiment(spec, arms, plugins, source)


def resolved_yaml(spec: ExperimentSpec) -> str:
    """The spec with every default filled in, as YAML."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
