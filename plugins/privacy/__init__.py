"""Reference privacy plugins: ``gaussian`` (record- or site-level DP) and ``central-dp``.

Every epsilon they report is computed by an Opacus accountant over what actually ran
(:mod:`fedcore.plugins.privacy.accounting`); the DP-SGD arithmetic lives in small pure
functions (:mod:`fedcore.plugins.privacy.dpsgd`) that other engines reuse.
"""

from __future__ import annotations

from fedcore import hookimpl
from fedcore.components import PrivacyMechanism
from fedcore.plugins.privacy.central_dp import CentralDP
from fedcore.plugins.privacy.gaussian import Gaussian


@hookimpl
def fedcore_privacy_mechanisms() -> list[type[PrivacyMechanism]]:
    return [Gaussian, CentralDP]
