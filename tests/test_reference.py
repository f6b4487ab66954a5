"""The generated plugin reference: nothing public undocumented, and docs/reference.md up to date."""

from __future__ import annotations

from pathlib import Path

from fedcore import reference
from fedcore.components import KINDS

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference.md"


def test_every_hook_class_and_field_is_documented() -> None:
    assert reference.undocumented() == []


def test_the_check_fails_on_an_undocumented_field(monkeypatch) -> None:
    from pydantic import BaseModel

    class Bare(BaseModel):
        """A boundary type with one documented field.

        :ivar a: documented.
        """

        a: int
        b: int

    monkeypatch.setattr(reference, "BOUNDARY_TYPES", (*reference.BOUNDARY_TYPES, Bare))
    assert reference.undocumented() == ["field Bare.b"]


def test_reference_is_generated_and_current() -> None:
    text = reference.render()
    assert REFERENCE.read_text() == text, "docs/reference.md is stale: python -m fedcore.reference > docs/reference.md"
    for hook in reference.hooks():
        assert f"### `{hook.__name__}(" in text
    for kind in KINDS:
        assert f"### `{kind.base.__name__}`" in text
    for cls in ("ClientUpdate", "RoundRecord", "SiteData", "FederatedData", "PrivacySpent"):
        assert f".{cls}`" in text
    assert "``record`` (one training row), ``patient``" in text  # PrivacySpent's units
