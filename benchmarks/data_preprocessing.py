"""Load and preprocess 150,000 EHR rows; target: at most 10 s on 2 cores.

    .venv/bin/python benchmarks/data_preprocessing.py [--repeats 3]

Prints the wall time of ``Dataset.load`` (read or generate, split by patient,
summarize, combine, impute/scale/one-hot at every site) for:

- synthetic-ehr, 3 sites x 50,000 patients (the paper spec's data);
- ehr-csv, the same 150,000 rows written to three CSV files first (so parsing is timed);
- diabetes-130 (101,766 rows), when ../shared/data/diabetes-130-us-hospitals/ is there.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fedcore.components import Dataset, FederatedData
from fedcore.plugins.datasets.diabetes130 import Diabetes130, Diabetes130Settings
from fedcore.plugins.datasets.ehr_csv import EHRCSV, EHRCSVSettings
from fedcore.plugins.datasets.synthetic import CATEGORICAL, CONTINUOUS, TARGET, SyntheticEHR, SyntheticEHRSettings

TARGET_SECONDS = 10.0
DIABETES = Path(__file__).resolve().parents[2] / "shared" / "data" / "diabetes-130-us-hospitals" / "diabetic_data.csv.gz"


def best_of(repeats: int, load: Callable[[], FederatedData]) -> tuple[float, FederatedData]:
    times = []
    data = None
    for _ in range(repeats):
        start = time.perf_counter()
        data = load()
        times.append(time.perf_counter() - start)
    assert data is not None
    return min(times), data


def report(label: str, seconds: float, data: FederatedData) -> None:
    rows = sum(s.n_train + len(s.y_val) + len(s.y_test) for s in data.sites)
    verdict = "ok" if seconds <= TARGET_SECONDS else "SLOWER THAN TARGET"
    print(
        f"{label:<34} rows={rows:>7,}  features={data.n_features:>4}  load+preprocess={seconds:6.2f} s  "
        f"({rows / seconds:,.0f} rows/s)  target<= {TARGET_SECONDS:.0f} s: {verdict}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"cpu cores visible: {os.cpu_count()}, best of {args.repeats}")
    synthetic: Dataset = SyntheticEHR(SyntheticEHRSettings(sites=3, patients_per_site=50_000))
    seconds, data = best_of(args.repeats, lambda: synthetic.load(0))
    report("synthetic-ehr 3 x 50,000", seconds, data)

    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for site in synthetic.raw_sites(0):  # type: ignore[attr-defined]
            path = Path(tmp) / f"{site.name}.csv"
            site.frame.to_csv(path, index=False)
            files[site.name] = str(path)
        csv = EHRCSV(
            EHRCSVSettings(
                site_files=files, target=TARGET, continuous=list(CONTINUOUS), categorical=list(CATEGORICAL)
            )
        )
        seconds, data = best_of(args.repeats, lambda: csv.load(0))
        report("ehr-csv 3 CSV files x 50,000", seconds, data)
        inferred = EHRCSV(EHRCSVSettings(site_files=files, target=TARGET))
        seconds, data = best_of(args.repeats, lambda: inferred.load(0))
        report("ehr-csv, column types inferred", seconds, data)

    if DIABETES.is_file():
        diabetes = Diabetes130(Diabetes130Settings(path=str(DIABETES)))
        seconds, data = best_of(args.repeats, lambda: diabetes.load(0))
        report("diabetes-130 (real extract)", seconds, data)
    else:
        print(f"diabetes-130: skipped ({DIABETES} absent)")


if __name__ == "__main__":
    main()
