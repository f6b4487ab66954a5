"""Sites for tables without a hospital column, and patient-level train/validation/test splits.

A partitioner is a simulation step (the public data has no hospital column), so
it sees the whole table. The split, in contrast, is computed at each site on
its own: a keyed hash of the patient id decides the split, so a patient seen at
two sites lands in the same split at both without any coordination, and no
patient is ever in two splits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedcore.errors import DataError

#: in ``groups``, the value list ``["*"]`` takes every value not listed for another site
REST = "*"


class PartitionSettings(BaseModel):
    """How to cut one table into sites.

    ``iid``: patients shuffled into ``sites`` equal parts. ``dirichlet``: label
    skew, each class's patients spread over the sites by Dirichlet(``alpha``)
    proportions (smaller alpha, more skew). ``column``: one site per value of
    ``column``, or per named group of values in ``groups``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    method: Literal["iid", "dirichlet", "column"] = "iid"
    sites: int = Field(3, ge=1, le=1000)
    alpha: float = Field(0.5, gt=0)
    column: str | None = None
    groups: dict[str, list[str]] | None = None
    min_rows: int = Field(10, ge=1, description="dirichlet: redraw until every site has this many rows")

    @field_validator("groups", mode="before")
    @classmethod
    def _values_as_text(cls, value: object) -> object:
        # YAML reads codes such as 7 as numbers; the table's values are compared as text.
        if isinstance(value, dict):
            return {str(k): [str(v) for v in (vs if isinstance(vs, list) else [vs])] for k, vs in value.items()}
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PartitionSettings:
        if self.method == "column" and not self.column:
            raise ValueError("method 'column' needs 'column' (the column whose values name the sites)")
        if self.method != "column" and (self.column or self.groups):
            raise ValueError(f"'column' and 'groups' apply only to method 'column', not '{self.method}'")
        if self.groups is not None:
            if not self.groups:
                raise ValueError("'groups' is empty; name at least one site")
            rest = [site for site, values in self.groups.items() if REST in values]
            if len(rest) > 1:
                raise ValueError(f"only one group may hold '{REST}' (the other values); {', '.join(rest)} do")
            seen: dict[str, str] = {}
            for site, values in self.groups.items():
                for value in values:
                    if value != REST and value in seen:
                        raise ValueError(f"value '{value}' is in groups '{seen[value]}' and '{site}'")
                    seen[value] = site
        return self


def _patient_keys(frame: pd.DataFrame, patient_id: str | None) -> pd.Series:
    if patient_id is None:
        return pd.Series(np.arange(len(frame)), index=frame.index)
    return frame[patient_id]


def partition(
    frame: pd.DataFrame,
    settings: PartitionSettings,
    target: str,
    patient_id: str | None,
    seed: int,
    where: str,
) -> dict[str, pd.DataFrame]:
    """Cut ``frame`` into named sites; iid and dirichlet keep each patient's rows at one site."""
    if settings.method == "column":
        return _by_column(frame, settings, where)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    keys = _patient_keys(frame, patient_id)
    codes, patients = pd.factorize(keys, sort=True)
    n_patients = len(patients)
    names = [f"site-{i}" for i in range(settings.sites)]
    if settings.method == "iid":
        order = rng.permutation(n_patients)
        site_of_patient = np.empty(n_patients, dtype=np.int64)
        for index, chunk in enumerate(np.array_split(order, settings.sites)):
            site_of_patient[chunk] = index
    else:
        # A patient's label is that of their first row; the patient moves as a whole.
        first_row = pd.Series(np.arange(len(frame))).groupby(codes).min().to_numpy()
        labels = frame[target].astype("str").to_numpy()[first_row]
        site_of_patient = _dirichlet(labels, settings, rng, codes, where)
    site_of_row = site_of_patient[codes]
    return {name: frame[site_of_row == index] for index, name in enumerate(names)}


def _dirichlet(
    labels: np.ndarray, settings: PartitionSettings, rng: np.random.Generator, codes: np.ndarray, where: str
) -> np.ndarray:
    rows_per_patient = np.bincount(codes, minlength=len(labels))
    classes = np.unique(labels)
    for _ in range(100):
        site_of_patient = np.empty(len(labels), dtype=np.int64)
        for label in classes:
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(settings.sites, settings.alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for index, chunk in enumerate(np.split(members, cuts)):
                site_of_patient[chunk] = index
        rows = np.bincount(site_of_patient, weights=rows_per_patient, minlength=settings.sites)
        if rows.min() >= settings.min_rows:
            return site_of_patient
    raise DataError(
        f"a Dirichlet(alpha={settings.alpha}) partition into {settings.sites} sites left a site with "
        f"fewer than {settings.min_rows} rows in 100 draws",
        where=where,
        hint="raise data.settings.partition.alpha, use fewer sites, or lower partition.min_rows",
    )


def _by_column(frame: pd.DataFrame, settings: PartitionSettings, where: str) -> dict[str, pd.DataFrame]:
    column = settings.column
    assert column is not None
    values = frame[column].astype("str")
    if settings.groups is None:
        present = sorted(v for v in values.dropna().unique())
        return {f"{column}={v}": frame[(values == v).to_numpy()] for v in present}
    out: dict[str, pd.DataFrame] = {}
    listed = {v for vs in settings.groups.values() for v in vs if v != REST}
    for site, members in settings.groups.items():
        if REST in members:
            mask = ~values.isin(listed) | values.isna()
        else:
            mask = values.isin(members)
        out[site] = frame[mask.to_numpy()]
    if not any(REST in vs for vs in settings.groups.values()):
        unassigned = int((~values.isin(listed)).sum())
        if unassigned:
            example = values[~values.isin(listed)].iloc[0]
            raise DataError(
                f"{unassigned} rows have a value of '{column}' in no group (for example '{example}')",
                where=f"{where}: column {column}",
                hint=f"add the value to a group, or give one group the value '{REST}' for all others",
            )
    return out


SPLITS = ("train", "validation", "test")


def split_key(seed: int) -> str:
    """The 16-character key of the patient hash for ``seed`` (every site derives the same)."""
    return hashlib.sha256(f"fedcore-split-{seed}".encode()).hexdigest()[:16]


def assign_splits(
    frame: pd.DataFrame,
    patient_id: str | None,
    fractions: Sequence[float],
    seed: int,
    site: int,
    labels: pd.Series | None = None,
) -> np.ndarray:
    """Split index (0 train, 1 validation, 2 test) of every row.

    With a patient id, a keyed hash of the id picks the split, so all rows of a
    patient share a split at every site. Without one, each row is its own
    patient and a seeded shuffle gives exact fractions.

    With ``labels`` (stratified), each class is cut by the fractions on its own, so
    every split keeps the site's class balance; patients are ordered by the same keyed
    hash and take the class of their first row (all their rows stay in one split at
    this site; a patient seen at two sites with different first labels could split differently).
    """
    bounds = np.cumsum(fractions)[:-1]
    if labels is not None:
        return _stratified(frame, patient_id, bounds, seed, site, labels)
    if patient_id is not None:
        hashed = pd.util.hash_pandas_object(frame[patient_id].astype("str"), index=False, hash_key=split_key(seed))
        uniform = hashed.to_numpy(dtype=np.uint64) / float(2**64)
        return np.searchsorted(bounds, uniform, side="right").astype(np.int8)
    n = len(frame)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5B117, site]))
    cuts = np.rint(bounds * n).astype(np.int64)
    out = np.empty(n, dtype=np.int8)
    for index, chunk in enumerate(np.split(rng.permutation(n), cuts)):
        out[chunk] = index
    return out


def _stratified(
    frame: pd.DataFrame, patient_id: str | None, bounds: np.ndarray, seed: int, site: int, labels: pd.Series
) -> np.ndarray:
    if patient_id is not None:
        keys = frame[patient_id].astype("str")
        hashed = pd.util.hash_pandas_object(keys, index=False, hash_key=split_key(seed)).to_numpy(dtype=np.uint64)
        codes, _ = pd.factorize(keys)
    else:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5B117, site]))
        hashed = rng.permutation(len(frame)).astype(np.uint64)
        codes = np.arange(len(frame))
    first = pd.Series(np.arange(len(frame))).groupby(codes).min().to_numpy()
    patient_label = labels.astype("str").to_numpy()[first]
    patient_key = hashed[first]
    split_of_patient = np.empty(len(first), dtype=np.int8)
    for label in np.unique(patient_label):
        members = np.flatnonzero(patient_label == label)
        ordered = members[np.argsort(patient_key[members], kind="stable")]
        cuts = np.rint(bounds * len(ordered)).astype(np.int64)
        for index, chunk in enumerate(np.split(ordered, cuts)):
            split_of_patient[chunk] = index
    return split_of_patient[codes]
