"""Reference audits: membership inference against the final model, and the empirical epsilon lower bound."""

from __future__ import annotations

from fedcore import hookimpl
from fedcore.components import Audit
from fedcore.plugins.audits.bound import EpsilonLowerBound
from fedcore.plugins.audits.membership import LikelihoodRatioAttack, LossThresholdAttack


@hookimpl
def fedcore_audits() -> list[type[Audit]]:
    return [LossThresholdAttack, LikelihoodRatioAttack, EpsilonLowerBound]
