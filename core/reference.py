"""The plugin reference (``docs/reference.md``), generated from the code's own docstrings.

As pluggy and pytest document their hooks: every hook of :mod:`fedcore.hookspecs`, every
component base class of :data:`fedcore.components.KINDS` with its public methods, and every
boundary type a plugin meets with each field's type and meaning. A field's meaning comes
from, in order: an ``:ivar name:`` (or ``:param name:``) line of the class docstring, the
string literal right below the field, or a pydantic ``Field(description=...)``.
:func:`undocumented` lists what lacks one (``tests/test_reference.py`` fails on any).

Regenerate: ``python -m fedcore.reference > docs/reference.md``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import typing
from collections.abc import Callable, Iterator
from typing import Any

from pydantic import BaseModel

from fedcore import components, hookspecs, types

#: the types that cross a plugin's boundary, in the order the reference shows them
BOUNDARY_TYPES: tuple[type, ...] = (
    components.SiteData,
    components.FederatedData,
    components.SiteInfo,
    components.RoundContext,
    components.DPStep,
    types.Weights,
    types.GlobalModel,
    types.ClientUpdate,
    types.SecureSum,
    types.ClassificationMetrics,
    types.SiteEvaluation,
    types.PrivacySpent,
    types.RoundRecord,
    types.LedgerRecord,
)


def hooks() -> list[Callable[..., Any]]:
    """Every hook specification, in source order."""
    found = [f for _, f in inspect.getmembers(hookspecs, inspect.isfunction) if f.__name__.startswith("fedcore_")]
    return sorted(found, key=lambda f: f.__code__.co_firstlineno)


def _doc(obj: Any) -> str:
    return inspect.cleandoc(obj.__doc__ or "") if getattr(obj, "__doc__", None) else ""


def _own_doc(cls: type) -> str:
    """The class's own docstring (not one inherited from a base)."""
    return inspect.cleandoc(cls.__dict__.get("__doc__") or "")


def fields_of(cls: type) -> list[str]:
    """The declared fields of a pydantic model or dataclass (public attributes of a plain class)."""
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return []


def _own_code(klass: type) -> bool:
    """Whether ``klass`` is fedcore's or a plugin's (not Python's, pydantic's, typing's)."""
    return klass.__module__.split(".")[0] not in ("builtins", "pydantic", "typing", "abc")


def _attribute_docs(cls: type) -> dict[str, str]:
    """``name -> docstring`` of the string literals written right below a class's fields."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not _own_code(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                out[node.target.id] = inspect.cleandoc(after.value.value)
    return out


_IVAR = re.compile(r"^:(?:ivar|param|cvar)\s+(\w+):\s*(.*)$")


def _ivar_docs(doc: str) -> dict[str, str]:
    """``name -> text`` of the ``:ivar name:`` (or ``:param``) entries of a docstring, continuation lines joined."""
    out: dict[str, str] = {}
    current: str | None = None
    for line in doc.splitlines():
        match = _IVAR.match(line.strip())
        if match:
            current = match.group(1)
            out[current] = match.group(2).strip()
        elif current is not None and line.startswith((" ", "\t")) and line.strip():
            out[current] += " " + line.strip()
        else:
            current = None
    return out


def field_docs(cls: type) -> dict[str, str]:
    """Every field's meaning (empty where undocumented)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs |= _ivar_docs(_own_doc(klass)) if _own_code(klass) else {}
    docs |= _attribute_docs(cls)
    if issubclass(cls, BaseModel):
        for name, info in cls.model_fields.items():
            if info.description and name not in docs:
                docs[name] = info.description
    return {name: " ".join(docs.get(name, "").split()) for name in fields_of(cls)}


def _type_text(cls: type, name: str) -> str:
    try:
        hints = typing.get_type_hints(cls, vars(components) | vars(types))
    except Exception:  # an annotation only a type checker resolves: the annotation as written
        written = {k: v for klass in reversed(cls.__mro__) for k, v in getattr(klass, "__annotations__", {}).items()}
        return str(written.get(name, "?"))
    hint = hints.get(name)
    if hint is None:
        return "?"
    text = getattr(hint, "__name__", None) if not typing.get_args(hint) else None
    return text or str(hint).replace("typing.", "").replace("numpy.", "np.").replace("fedcore.types.", "").replace(
        "fedcore.components.", ""
    )


def public_methods(cls: type) -> list[tuple[str, Callable[..., Any]]]:
    """The public methods a component base class defines itself."""
    return [
        (name, member)
        for name, member in cls.__dict__.items()
        if not name.startswith("_") and inspect.isfunction(member)
    ]


def undocumented() -> list[str]:
    """Every public hook, component base class, method and boundary-type field without documentation."""
    missing = [f"hook {h.__name__}" for h in hooks() if not _doc(h)]
    for kind in components.KINDS:
        base = kind.base
        if not _own_doc(base):
            missing.append(f"class {base.__name__}")
        missing += [f"method {base.__name__}.{n}" for n, m in public_methods(base) if not _doc(m)]
    for cls in BOUNDARY_TYPES:
        if not _own_doc(cls):
            missing.append(f"class {cls.__name__}")
        missing += [f"field {cls.__name__}.{n}" for n, text in field_docs(cls).items() if not text]
    return missing


def _signature(fn: Callable[..., Any], drop_self: bool = False) -> str:
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if not (drop_self and p.name == "self")]
    return f"{fn.__name__}({', '.join(str(p.replace(annotation=p.empty, default=p.default)) for p in params)})"


def _section(doc: str) -> Iterator[str]:
    yield from (doc.splitlines() or ["(undocumented)"])


def render() -> str:
    """``docs/reference.md``: hooks, component base classes, boundary types."""
    out = [
        "# fedcore plugin reference",
        "",
        "Generated from the code's docstrings by `python -m fedcore.reference > docs/reference.md`;",
        "`tests/test_reference.py` fails when this file is stale or anything public lacks documentation.",
        "The guide to writing a plugin is [plugins.md](plugins.md).",
        "",
        "## Hooks (`fedcore.hookspecs`)",
        "",
        "Implement them with `fedcore.hookimpl`.",
    ]
    for hook in hooks():
        out += ["", f"### `{_signature(hook)}`", "", *_section(_doc(hook))]
    out += ["", "## Component base classes (`fedcore.components`)", ""]
    out += ["| kind | base class | registration hook | spec slot |", "|---|---|---|---|"]
    out += [f"| {k.name} | `{k.base.__name__}` | `{k.hook}` | `{k.slot}`{' (a list)' if k.many else ''} |" for k in components.KINDS]
    for kind in components.KINDS:
        base = kind.base
        out += ["", f"### `{base.__name__}`", "", *_section(_own_doc(base))]
        for name, method in public_methods(base):
            doc = _doc(method).splitlines()
            out += ["", f"- `{_signature(method, drop_self=True)}`: " + (doc[0] if doc else "(undocumented)")]
            out += [f"  {line}" if line else "" for line in doc[1:]]
    out += ["", "## Boundary types", "", "What a plugin receives and returns (`fedcore.components`, `fedcore.types`)."]
    for cls in BOUNDARY_TYPES:
        out += ["", f"### `{cls.__module__.replace('fedcore.', 'fedcore.')}.{cls.__name__}`", ""]
        out += [_own_doc(cls).split("\n\n")[0].replace("\n", " ") or "(undocumented)"]
        docs = field_docs(cls)
        if docs:
            out += ["", "| field | type | meaning |", "|---|---|---|"]
            out += [f"| `{n}` | `{_type_text(cls, n)}` | {text or '(undocumented)'} |" for n, text in docs.items()]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
