"""Reference attacks: simulated misbehaving sites (label flipping, sign-flipped, scaled and noise updates)."""

from __future__ import annotations

from fedcore import hookimpl
from fedcore.components import Attack
from fedcore.plugins.attacks.poisoning import LabelFlip, RandomNoise, Scale, SignFlip


@hookimpl
def fedcore_attacks() -> list[type[Attack]]:
    return [LabelFlip, SignFlip, Scale, RandomNoise]
