"""Secure aggregation plugins (the server learns only the sum of updates).

``crypten``: CrypTen MPC, each site its own party process (:mod:`.aggregator`).
CrypTen is optional: without it the plugin is listed as unavailable, with the
install command, and fedcore runs everything else.
"""

from __future__ import annotations

from fedcore import hookimpl
from fedcore.components import SecureAggregator
from fedcore.plugins.privacy.secure.aggregator import CrypTenSecureAggregator


@hookimpl
def fedcore_secure_aggregators() -> list[type[SecureAggregator]]:
    return [CrypTenSecureAggregator]
