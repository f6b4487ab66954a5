"""synthetic-ehr: seeded, realistic EHR admissions for N hospitals, preprocessed like real data.

Each row is one patient's admission: demographics, admission type, primary
diagnosis group, length of stay, comorbidity and medication counts, prior
visits, five lab values with realistic (partly informative) missingness,
insulin and discharge. The 3-class outcome (no readmission, readmitted after
30 days, readmitted within 30 days) depends on them nonlinearly: thresholds
(HbA1c, haemoglobin, creatinine), a U-shape (sodium) and interactions
(uncontrolled diabetes without insulin, long stays of frail patients). Sites
differ by covariate shift (age, case mix, lab calibration), label skew (class
priors) and size. The raw tables then go through the same federated
preprocessing as real data (:mod:`fedcore.plugins.datasets.pipeline`).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field, model_validator

from fedcore.components import Dataset, FederatedData
from fedcore.plugins.datasets.pipeline import ColumnRoles, PreprocessingSettings, RawSite, build_federated_data

RACES = np.array(["White", "Black", "Hispanic", "Asian", "Other"], dtype=object)
RACE_SHARES = np.array([0.62, 0.18, 0.12, 0.05, 0.03])
ADMISSIONS = np.array(["Emergency", "Urgent", "Elective"], dtype=object)
ADMISSION_SHARES = np.array([0.55, 0.20, 0.25])
DIAGNOSES = np.array(
    ["Circulatory", "Respiratory", "Diabetes", "Digestive", "Injury", "Neoplasms", "Genitourinary", "Musculoskeletal", "Other"],
    dtype=object,
)
DIAGNOSIS_SHARES = np.array([0.30, 0.14, 0.09, 0.09, 0.07, 0.04, 0.05, 0.05, 0.17])
#: acute readmission risk of each primary diagnosis group (same order as DIAGNOSES)
DIAGNOSIS_RISK = np.array([0.35, 0.45, 0.1, 0.0, -0.6, 0.9, 0.1, -0.4, -0.2])
INSULIN = np.array(["No", "Steady", "Up", "Down"], dtype=object)
DISCHARGES = np.array(["Home", "Home health", "Facility"], dtype=object)

CLASS_NAMES = {
    3: ["no readmission", "readmitted after 30 days", "readmitted within 30 days"],
    2: ["no readmission", "readmitted"],
}
CONTINUOUS = (
    "age",
    "length_of_stay",
    "comorbidities",
    "medications",
    "prior_inpatient",
    "prior_emergency",
    "prior_outpatient",
    "glucose",
    "hba1c",
    "creatinine",
    "hemoglobin",
    "sodium",
)
CATEGORICAL = ("sex", "race", "admission_type", "diagnosis_group", "insulin", "discharge")
TARGET = "outcome"
#: the most patients synthetic-ehr makes in all (more would exhaust memory before training)
MAX_PATIENTS = 5_000_000


class SyntheticEHRSettings(PreprocessingSettings):
    """Sites, their sizes and heterogeneity, outcome noise; plus the shared preprocessing settings."""

    sites: int = Field(3, ge=1, le=1000)
    patients_per_site: int = Field(50_000, ge=10, le=MAX_PATIENTS)
    site_sizes: list[int] | None = Field(None, description="patients of each site (overrides patients_per_site)")
    n_classes: int = Field(3, ge=2, le=3, description="3: no / after 30 days / within 30 days; 2: no / yes")
    label_noise: float = Field(0.1, ge=0, le=1, description="share of outcomes redrawn uniformly at random")
    label_skew: float = Field(0.0, ge=0, description="sd of each site's shift of the class log-odds")
    covariate_shift: float = Field(0.5, ge=0, description="scale of site differences in age, case mix, lab calibration")

    @model_validator(mode="after")
    def _sizes(self) -> SyntheticEHRSettings:
        if self.site_sizes is not None:
            if len(self.site_sizes) != self.sites:
                raise ValueError(f"site_sizes lists {len(self.site_sizes)} sizes for {self.sites} sites")
            if min(self.site_sizes) < 10:
                raise ValueError("every site needs at least 10 patients")
        total = sum(self.site_sizes) if self.site_sizes is not None else self.sites * self.patients_per_site
        if total > MAX_PATIENTS:
            raise ValueError(f"{total} patients in all; synthetic-ehr makes at most {MAX_PATIENTS} (lower sites or sizes)")
        return self


def _mix(rng: np.random.Generator, base: np.ndarray, shift: float) -> np.ndarray:
    """Category shares of one site: ``base`` perturbed more as ``shift`` grows."""
    if shift == 0:
        return base
    return rng.dirichlet(base * (40.0 / shift))


def _with_missing(values: np.ndarray, missing: np.ndarray) -> np.ndarray:
    out = values.astype(np.float64, copy=True)
    out[missing] = np.nan
    return out


def generate_site(
    n: int, site_rng: np.random.Generator, shift: float, class_shift: np.ndarray, label_noise: float, n_classes: int
) -> pd.DataFrame:
    """One hospital's admissions, with the outcome; ``class_shift`` adds to the class log-odds."""
    rng = site_rng
    # Site-level differences (covariate shift): population age, case mix, lab calibration.
    age_mean = 66.0 + shift * rng.normal(0, 5)
    race_shares = _mix(rng, RACE_SHARES, shift)
    admission_shares = _mix(rng, ADMISSION_SHARES, shift)
    diagnosis_shares = _mix(rng, DIAGNOSIS_SHARES, shift)
    lab_bias = shift * rng.normal(0, 0.15, size=5)

    age = np.clip(rng.normal(age_mean, 15, n), 18, 98).round()
    female = rng.random(n) < 0.52
    race = rng.choice(RACES, n, p=race_shares)
    admission = rng.choice(ADMISSIONS, n, p=admission_shares)
    diagnosis = rng.choice(len(DIAGNOSES), n, p=diagnosis_shares)
    emergency = admission == "Emergency"
    diabetic = (diagnosis == 2) | (rng.random(n) < 0.35)

    frailty = rng.gamma(2.0, 0.5, n) * (1 + (age - 60) / 80)
    comorbidities = np.clip(rng.poisson(1.5 + 2.5 * frailty + 0.02 * (age - 40)), 1, 16)
    prior_inpatient = rng.poisson(0.35 * frailty**1.5)
    prior_emergency = rng.poisson(0.25 * frailty + 0.1 * emergency)
    prior_outpatient = rng.poisson(0.4 * frailty)

    hba1c = np.where(diabetic, rng.normal(8.0, 1.6, n), rng.normal(5.6, 0.5, n)) * (1 + lab_bias[0] / 10)
    glucose = np.exp(rng.normal(np.log(np.where(diabetic, 165, 110)), 0.3, n)) + 8 * (hba1c - 6)
    creatinine = np.exp(rng.normal(-0.1 + 0.008 * (age - 60) + 0.08 * frailty, 0.35, n)) * (1 + lab_bias[1])
    hemoglobin = rng.normal(13.4 - 1.2 * female - 0.5 * frailty, 1.7, n) + lab_bias[2] * 4
    sodium = rng.normal(139, 3.5, n) - 2.0 * (diagnosis == 1) + lab_bias[3] * 6
    severity = 0.4 * emergency + 0.25 * comorbidities / 3 + 0.3 * (creatinine > 1.5) + rng.normal(0, 0.35, n)
    length_of_stay = np.clip(np.exp(1.0 + 0.5 * severity + rng.normal(0, 0.3, n)), 1, 14).round()
    medications = np.clip(rng.poisson(6 + 1.6 * comorbidities + 0.8 * length_of_stay), 1, 80)

    uncontrolled = hba1c > 8.5
    insulin_probs = np.where(diabetic, 0.55, 0.04)
    on_insulin = rng.random(n) < insulin_probs
    adjusted = rng.random(n)
    insulin = np.where(~on_insulin, "No", np.where(adjusted < 0.6, "Steady", np.where(adjusted < 0.85, "Up", "Down")))
    frail_old = (age > 75) & (frailty > 1.2)
    discharge_score = 0.04 * (age - 65) + 0.25 * length_of_stay + 0.8 * frail_old + rng.normal(0, 1, n)
    discharge = np.where(discharge_score > 3.2, "Facility", np.where(discharge_score > 2.0, "Home health", "Home"))

    # The outcome: chronic (long-term) and acute (early) readmission drivers, nonlinear.
    chronic = (
        1.6 * np.log1p(prior_inpatient)
        + 0.8 * np.log1p(prior_emergency)
        + 0.3 * (comorbidities - 5) / 2.5
        + 1.4 * (uncontrolled & (insulin == "No"))
        + 0.5 * ((age - 70) / 12) ** 2
        - 1.7
    )
    acute = (
        0.7 * (length_of_stay - 4) / 3 * (1 + frail_old)
        + 1.5 * np.clip(creatinine - 1.4, 0, None)
        + 1.2 * (np.abs(sodium - 139) > 6)
        + 1.3 * (hemoglobin < 10.5)
        + 0.9 * (discharge == "Facility")
        + DIAGNOSIS_RISK[diagnosis]
        + 0.4 * emergency
        - 1.4
    )
    logits = np.stack([np.zeros(n), 2.2 * chronic, 2.4 * acute + 0.8 * chronic * (acute > 0)], axis=1)
    logits += class_shift
    outcome = (logits + rng.gumbel(size=logits.shape) * 0.15).argmax(axis=1)
    noisy = rng.random(n) < label_noise
    outcome[noisy] = rng.integers(0, 3, int(noisy.sum()))
    if n_classes == 2:
        outcome = np.minimum(outcome, 1)

    # Realistic missingness: HbA1c mostly measured in diabetics, other labs sometimes skipped.
    hba1c_missing = rng.random(n) < np.where(diabetic, 0.3, 0.8)
    glucose_missing = rng.random(n) < 0.05
    creatinine_missing = rng.random(n) < np.where(admission == "Elective", 0.15, 0.05)
    hemoglobin_missing = rng.random(n) < 0.08
    sodium_missing = rng.random(n) < 0.06
    race_text = race.astype(object)
    race_text[rng.random(n) < 0.02] = None
    return pd.DataFrame(
        {
            "age": age,
            "length_of_stay": length_of_stay,
            "comorbidities": comorbidities.astype(np.float64),
            "medications": medications.astype(np.float64),
            "prior_inpatient": prior_inpatient.astype(np.float64),
            "prior_emergency": prior_emergency.astype(np.float64),
            "prior_outpatient": prior_outpatient.astype(np.float64),
            "glucose": _with_missing(glucose.round(), glucose_missing),
            "hba1c": _with_missing(hba1c.round(1), hba1c_missing),
            "creatinine": _with_missing(creatinine.round(2), creatinine_missing),
            "hemoglobin": _with_missing(hemoglobin.round(1), hemoglobin_missing),
            "sodium": _with_missing(sodium.round(), sodium_missing),
            "sex": pd.array(np.where(female, "F", "M"), dtype="str"),
            "race": pd.array(race_text, dtype="str"),
            "admission_type": pd.array(admission, dtype="str"),
            "diagnosis_group": pd.array(DIAGNOSES[diagnosis], dtype="str"),
            "insulin": pd.array(insulin, dtype="str"),
            "discharge": pd.array(discharge, dtype="str"),
            TARGET: pd.array(np.array(CLASS_NAMES[n_classes], dtype=object)[outcome], dtype="str"),
        }
    )


class SyntheticEHR(Dataset):
    """Realistic synthetic admissions for N hospitals (no download needed), preprocessed federatedly."""

    name: ClassVar[str] = "synthetic-ehr"
    Settings: ClassVar[type[BaseModel]] = SyntheticEHRSettings
    description: ClassVar[str] = "seeded synthetic EHR admissions for N hospitals, 3-class readmission outcome"

    def will_oversample(self) -> bool:
        return self.settings.oversample != "none"  # type: ignore[attr-defined]

    def raw_sites(self, seed: int) -> list[RawSite]:
        """Every site's generated table before preprocessing."""
        s: SyntheticEHRSettings = self.settings  # type: ignore[assignment]
        sizes = s.site_sizes or [s.patients_per_site] * s.sites
        skew_rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5C3]))
        sites = []
        for index, n in enumerate(sizes):
            class_shift = np.concatenate([[0.0], skew_rng.normal(0, s.label_skew, 2)]) if s.label_skew else np.zeros(3)
            rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
            frame = generate_site(n, rng, s.covariate_shift, class_shift, s.label_noise, s.n_classes)
            sites.append(RawSite(f"hospital-{index}", frame, f"synthetic-ehr hospital-{index}"))
        return sites

    def load(self, seed: int) -> FederatedData:
        s: SyntheticEHRSettings = self.settings  # type: ignore[assignment]
        roles = ColumnRoles(target=TARGET, continuous=CONTINUOUS, categorical=CATEGORICAL)
        about = (
            f"{s.sites} sites, {sum(s.site_sizes or [s.patients_per_site] * s.sites)} patients (one admission each); "
            f"covariate shift {s.covariate_shift}, label skew {s.label_skew}, label noise {s.label_noise}. "
            "Outcome: nonlinear in prior visits, HbA1c without insulin, length of stay of frail patients, "
            "creatinine, sodium, haemoglobin, discharge and diagnosis group."
        )
        return build_federated_data(
            self.raw_sites(seed), roles, s.options(CLASS_NAMES[s.n_classes]), seed, {"Data: synthetic-ehr generator": about}
        )
