"""Reference datasets."""

from __future__ import annotations

from fedcore import hookimpl
from fedcore.components import Dataset
from fedcore.plugins.datasets.synthetic import SyntheticEHR


@hookimpl
def fedcore_datasets() -> list[type[Dataset]]:
    return [SyntheticEHR]
