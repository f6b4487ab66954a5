"""Plugins deployment adds: the ``site-tables`` dataset, the ``secagg-plus`` secure aggregator.

Registered under the ``fedcore`` entry-point group as ``deploy``; importing this
module never imports Flower, so fedcore without the ``deploy`` extra still loads.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, Field

from fedcore import hookimpl
from fedcore.components import Dataset, FederatedData, SecureAggregator
from fedcore.errors import DataError
from fedcore.plugins.datasets.pipeline import PreprocessingSettings


class SiteTablesSettings(PreprocessingSettings):
    """The coordinator's part of the data settings: preprocessing options only, never a path."""

    classes: list[str] | None = Field(None, description="class order (default: sorted union of the sites' target values)")


class SiteTables(Dataset):
    """Every hospital reads its own table (named in its own ``site.yaml``); deployment only.

    The coordinator's spec names this dataset and the preprocessing options; each
    site's file names its table, target and columns. Preprocessing runs federatedly
    over the same :class:`~fedcore.plugins.datasets.preprocessing.SiteSummary`
    messages as the simulation's ``ehr-csv``.
    """

    name: ClassVar[str] = "site-tables"
    Settings: ClassVar[type[BaseModel]] = SiteTablesSettings
    description: ClassVar[str] = "deployment: each site's own table (ehr-csv settings in its site.yaml)"

    def will_oversample(self) -> bool:
        return self.settings.oversample != "none"  # type: ignore[attr-defined]

    def load(self, seed: int) -> FederatedData:
        raise DataError(
            "dataset 'site-tables' is read at the sites of a deployment",
            where="data.use",
            hint="run with 'fedcore run SPEC --federation HOST:PORT --certs DIR', or use ehr-csv to simulate",
        )


@hookimpl
def fedcore_datasets() -> list[type[Dataset]]:
    return [SiteTables]


@hookimpl
def fedcore_secure_aggregators() -> list[type[SecureAggregator]]:
    from fedcore.plugins.privacy.secure.secagg_plus import SecAggPlusSecureAggregator

    return [SecAggPlusSecureAggregator]
