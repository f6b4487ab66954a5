"""Reference datasets: ehr-csv (generic EHR tables), synthetic-ehr, diabetes-130 (UCI extract)."""

from __future__ import annotations

from fedcore import hookimpl
from fedcore.components import Dataset
from fedcore.plugins.datasets.diabetes130 import Diabetes130
from fedcore.plugins.datasets.ehr_csv import EHRCSV
from fedcore.plugins.datasets.synthetic import SyntheticEHR


@hookimpl
def fedcore_datasets() -> list[type[Dataset]]:
    return [SyntheticEHR, EHRCSV, Diabetes130]
