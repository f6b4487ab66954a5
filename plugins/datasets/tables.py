"""Reading EHR tables (CSV or Parquet) and checking them against the settings, with one-line errors."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from fedcore.errors import DataError

TableFormat = Literal["auto", "csv", "parquet"]

#: text read as a missing value unless the settings say otherwise
DEFAULT_MISSING = ("", "?", "NA", "N/A", "NaN", "nan", "null", "NULL")
_DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}
#: a numeric column with at most this many distinct values is inferred categorical (codes, flags)
MAX_CODES_FOR_NUMERIC_CATEGORICAL = 10


def resolve_path(text: str, setting: str, hint: str) -> Path:
    """``text`` as an existing file; relative paths are taken from the working directory."""
    path = Path(text).expanduser()
    if not path.is_file():
        shown = path if path.is_absolute() else f"{path} (from {Path.cwd()})"
        raise DataError(f"file not found: {shown}", where=setting, hint=hint)
    return path


def _format_of(path: Path, fmt: TableFormat) -> str:
    if fmt != "auto":
        return fmt
    suffixes = [s.lower() for s in path.suffixes]
    return "parquet" if suffixes and suffixes[-1] in (".parquet", ".pq") else "csv"


def read_table(
    path: Path,
    *,
    fmt: TableFormat = "auto",
    delimiter: str = ",",
    header: bool = True,
    column_names: Sequence[str] | None = None,
    missing_values: Sequence[str] = DEFAULT_MISSING,
    dtypes: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Read one table; the missing-value markers become NaN. Unreadable files raise :class:`DataError`."""
    if _format_of(path, fmt) == "parquet":
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises many types for a bad file
            raise DataError(
                f"cannot read Parquet file: {str(exc).splitlines()[0][:120]}",
                where=str(path),
                hint="check that it is a Parquet file, or set data.settings.format: csv",
            ) from None
        if column_names is not None:
            if len(column_names) != frame.shape[1]:
                raise DataError(
                    f"column_names lists {len(column_names)} names but the file has {frame.shape[1]} columns",
                    where=str(path),
                    hint="list one name per column",
                )
            frame.columns = list(column_names)
        frame = frame.reset_index(drop=True)  # error messages count data rows from 1
        for column in frame.columns:
            if pd.api.types.is_string_dtype(frame[column]) or frame[column].dtype == object:
                frame[column] = frame[column].mask(frame[column].isin(list(missing_values)))
        return frame
    if not any(s.lower() in (".gz", ".bz2", ".zip", ".xz", ".zst", ".tar") for s in path.suffixes):
        _check_no_nul(path)
    names = list(column_names) if column_names is not None else None
    if names is not None and len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise DataError(f"column_names lists '{twice}' twice", where=str(path), hint="give every column its own name")
    try:
        frame = pd.read_csv(
            path,
            sep=delimiter,
            header=0 if header else None,
            na_values=list(missing_values),
            keep_default_na=False,
            dtype=dict(dtypes) if dtypes and names is None else None,
            low_memory=False,
            encoding="utf-8-sig",  # a spreadsheet's byte-order mark is not part of the first name
        )
    except pd.errors.EmptyDataError:
        raise DataError("the file is empty", where=str(path), hint="give it a header line and data rows") from None
    except pd.errors.ParserError as exc:
        raise DataError(
            f"cannot parse CSV: {str(exc).strip().splitlines()[-1][:120]}",
            where=str(path),
            hint=f"check data.settings.delimiter (now {delimiter!r}) and quoting",
        ) from None
    except UnicodeDecodeError:
        raise DataError("the file is not UTF-8 text", where=str(path), hint="save it as UTF-8 CSV, or use Parquet") from None
    except (OSError, EOFError) as exc:  # e.g. a truncated .gz
        raise DataError(f"cannot read the file: {exc}", where=str(path), hint="check the file") from None
    if names is not None:
        if len(names) != frame.shape[1]:
            raise DataError(
                f"column_names lists {len(names)} names but the file has {frame.shape[1]} columns",
                where=str(path),
                hint=f"list one name per column ({frame.shape[1]})" + ("" if header else ", or check data.settings.delimiter"),
            )
        frame.columns = names
    elif not header:
        frame.columns = [f"column_{i}" for i in range(frame.shape[1])]
    else:
        _check_header(frame, path)
    _check_delimiter(frame, path, delimiter, header)
    _check_text(frame, path)
    return frame


def _check_header(frame: pd.DataFrame, path: Path) -> None:
    """Refuse a header that names a column twice (pandas would silently rename it 'x.1') or not at all."""
    columns = [str(c) for c in frame.columns]
    for index, column in enumerate(columns):
        if column.startswith("Unnamed: "):
            raise DataError(
                f"column {index + 1} of the header has no name",
                where=str(path),
                hint="name every column in the header line, or set header: false and column_names",
            )
        base, dot, suffix = column.rpartition(".")
        if dot and suffix.isdigit() and base in columns[:index]:
            raise DataError(
                f"the header names column '{base}' twice",
                where=str(path),
                hint="give every column its own name (or list them in data.settings.column_names)",
            )


def _check_no_nul(path: Path) -> None:
    """Refuse a CSV holding a NUL byte (a binary or damaged file; the CSV parser would cut values at it)."""
    try:
        with path.open("rb") as handle:
            offset, line = 0, 1
            while chunk := handle.read(1 << 20):
                at = chunk.find(b"\x00")
                if at >= 0:
                    line += chunk[:at].count(b"\n")
                    raise DataError(
                        f"the file holds a NUL byte (line {line}, byte {offset + at})",
                        where=str(path),
                        hint="the file is binary or damaged; re-export it as UTF-8 CSV",
                    )
                offset += len(chunk)
                line += chunk.count(b"\n")
    except OSError as exc:
        raise DataError(f"cannot read the file: {exc.strerror}", where=str(path), hint="check the file and its permissions") from None


def _check_text(frame: pd.DataFrame, path: Path) -> None:
    """Refuse NUL bytes and other control characters in names and text cells (a binary or damaged file)."""
    for column in frame.columns:
        if "\x00" in str(column):
            raise DataError("the header holds a NUL byte", where=str(path), hint="the file is binary or damaged; re-export it as CSV")
        series = frame[column]
        if series.dtype == object:
            bad = series.astype("str").str.contains("\x00", regex=False).to_numpy() & series.notna().to_numpy()
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise DataError(
                    f"column '{column}' holds a NUL byte (data row {row + 1})",
                    where=f"{path}: column {column}",
                    hint="the file is binary or damaged; re-export it as UTF-8 CSV",
                )


def _check_delimiter(frame: pd.DataFrame, path: Path, delimiter: str, header: bool) -> None:
    if frame.shape[1] != 1:
        return
    sample = str(frame.columns[0]) if header else str(frame.iloc[0, 0]) if len(frame) else ""
    for other, name in _DELIMITERS.items():
        if other != delimiter and other in sample:
            raise DataError(
                f"the file reads as one column '{sample[:40]}' with delimiter {delimiter!r}; it looks {name}-separated",
                where=str(path),
                hint=f"set data.settings.delimiter: {other!r}",
            )


def closest(name: str, choices: Iterable[str]) -> str:
    """A 'did you mean' phrase for ``name`` among ``choices``, or ''."""
    match = difflib.get_close_matches(name, [str(c) for c in choices], n=1)
    return f"did you mean '{match[0]}'? " if match else ""


def check_named_columns(frame: pd.DataFrame, source: str, named: Mapping[str, Sequence[str]], target: str) -> None:
    """Every column the settings name (``setting path -> columns``) must be in ``frame``."""
    columns = [str(c) for c in frame.columns]
    shown = ", ".join(columns[:12]) + (" ..." if len(columns) > 12 else "")
    if target not in columns:
        raise DataError(
            f"target column '{target}' is not in the file",
            where=source,
            hint=f"{closest(target, columns)}set data.settings.target to one of: {shown}",
        )
    for setting, names in named.items():
        for name in names:
            if name not in columns:
                raise DataError(
                    f"column '{name}' named in data.settings.{setting} is not in the file",
                    where=source,
                    hint=f"{closest(name, columns)}columns: {shown}",
                )


def _numeric_profile(series: pd.Series) -> tuple[bool, int]:
    """Whether the observed values are all numbers, and how many distinct values there are."""
    observed = series.dropna()
    if pd.api.types.is_bool_dtype(series):
        return False, int(observed.nunique())
    if pd.api.types.is_numeric_dtype(series):
        return True, int(observed.nunique())
    numbers = pd.to_numeric(observed, errors="coerce")
    return bool(numbers.notna().all()), int(observed.nunique())


def infer_types(frames: Sequence[pd.DataFrame], columns: Sequence[str]) -> tuple[list[str], list[str]]:
    """Continuous and categorical columns among ``columns``, from each site's own profile.

    A column is continuous when its values are numbers at every site and it has
    more than :data:`MAX_CODES_FOR_NUMERIC_CATEGORICAL` distinct values at some site.
    """
    continuous: list[str] = []
    categorical: list[str] = []
    for column in columns:
        profiles = [_numeric_profile(frame[column]) for frame in frames]
        numeric = all(p[0] for p in profiles)
        many = max(p[1] for p in profiles) > MAX_CODES_FOR_NUMERIC_CATEGORICAL
        (continuous if numeric and many else categorical).append(column)
    return continuous, categorical
