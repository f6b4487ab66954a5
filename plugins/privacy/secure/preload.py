"""Imported once by the fork server the parties are forked from.

Each party then starts with torch and CrypTen already imported instead of
importing them itself (three parties on two cores: seconds each). A failure
here is left for the party to report with its full reason.
"""

from __future__ import annotations

from fedcore.plugins.privacy.secure.party import import_crypten

try:
    import_crypten()
except Exception:  # noqa: BLE001 - the party re-imports and reports the real error
    pass
