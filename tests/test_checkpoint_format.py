"""The checkpoint format on its own: atomic parts, the site's part in its own folder, the last complete round."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedcore.checkpoint import (
    CheckpointError,
    CheckpointLayout,
    last_complete_round,
    load_coordinator,
    load_site,
    prune,
    save_coordinator,
    save_site,
    training_key,
)

SITES = ["site-0", "site-1", "site-2"]


def _layout(tmp_path: Path) -> CheckpointLayout:
    return CheckpointLayout(tmp_path, training_key("federated", "fedprox(mu=0.1)", 2))


def _round(layout: CheckpointLayout, round: int, sites=SITES) -> None:
    save_coordinator(layout, round, {"weights": {"w": torch.full((2, 2), float(round))}, "round": round, "ledger_head": "ab" * 32})
    for site in sites:
        save_site(layout, site, round, {"accountant": [(1.0, 0.01, round)], "generator": torch.tensor([round, 7])})


def test_parts_round_trip_and_sites_write_only_their_own_folders(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    _round(layout, 1)
    assert layout.key == "federated-fedprox_mu_0.1_-r2"
    assert torch.equal(load_coordinator(layout, 1)["weights"]["w"], torch.ones(2, 2))
    assert load_site(layout, "site-1", 1)["accountant"] == [(1.0, 0.01, 1)]
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.pt"))
    assert files == [
        f"checkpoints/{layout.key}/round-000001.pt",
        *(f"sites/{s}/checkpoints/{layout.key}/round-000001.pt" for s in SITES),
    ]
    assert not list(tmp_path.rglob("*.tmp"))


def test_the_last_complete_round_needs_every_part(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    assert last_complete_round(layout, SITES) is None
    _round(layout, 1)
    _round(layout, 2)
    _round(layout, 3, sites=SITES[:2])  # the crash came before site-2 wrote round 3
    assert last_complete_round(layout, SITES) == 2
    save_coordinator(layout, 4, {})  # coordinator only
    assert last_complete_round(layout, SITES) == 2
    # A damaged part (a disk error, not a crash: writes are atomic) is skipped, not trusted.
    (layout.site_dir("site-0") / layout.file(2)).write_bytes(b"garbage")
    assert last_complete_round(layout, SITES) == 1


def test_a_part_of_another_training_or_round_is_refused(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    _round(layout, 1)
    other = CheckpointLayout(tmp_path, training_key("federated", "main", 0))
    other.coordinator_dir.mkdir(parents=True)
    os.link(layout.coordinator_dir / layout.file(1), other.coordinator_dir / other.file(1))
    with pytest.raises(CheckpointError, match="belongs to"):
        load_coordinator(other, 1)
    os.replace(layout.coordinator_dir / layout.file(1), layout.coordinator_dir / layout.file(5))
    with pytest.raises(CheckpointError, match="not federated"):
        load_coordinator(layout, 5)


def test_a_crash_mid_write_leaves_the_old_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = _layout(tmp_path)
    _round(layout, 1)

    def crash(*args, **kwargs):  # noqa: ANN002, ANN003
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        save_coordinator(layout, 1, {"weights": "new"})
    monkeypatch.undo()
    assert torch.equal(load_coordinator(layout, 1)["weights"]["w"], torch.ones(2, 2))
    assert not list(tmp_path.rglob("*.tmp"))


def test_prune_keeps_the_newest_complete_rounds(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    for round in (1, 2, 3):
        _round(layout, round)
    prune(layout, SITES, keep=1)
    assert last_complete_round(layout, SITES) == 3
    assert sorted(p.name for p in layout.coordinator_dir.iterdir()) == ["round-000003.pt"]
    with pytest.raises(ValueError):
        layout.site_dir("../coordinator")
