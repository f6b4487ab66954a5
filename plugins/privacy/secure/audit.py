"""Did any individual update reach the server? Checked on the bytes it actually received.

The audit looks for each site's update in every byte stream the server read
(:func:`~.channel.read_capture`), in every encoding an update could travel in:
the released delta as float32 or float64, the sample-weighted delta as float64,
and both in the fixed-point int64 encoding the parties use before sharing. A
probe is the first values of an array (enough that a match is no accident);
each probe found is a finding. The additive shares and the sum the server
legitimately receives match none of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedcore.plugins.privacy.secure.fixed_point import encode
from fedcore.types import ClientUpdate

#: values per probe: 16 float32 values are 64 bytes, far too many to match by chance
PROBE_VALUES = 16
#: fewer nonzero values than this and a probe could match zero padding
MIN_NONZERO = 4


def _probes(update: ClientUpdate, precision_bits: int) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name, array in update.delta.arrays.items():
        head = array.ravel()[:PROBE_VALUES].astype(np.float64)
        if np.count_nonzero(head) < MIN_NONZERO:
            continue
        weighted = update.n_samples * head
        encodings = {
            "delta float32": head.astype("<f4").tobytes(),
            "delta float64": head.astype("<f8").tobytes(),
            "weighted delta float64": weighted.astype("<f8").tobytes(),
            "fixed-point delta": encode(head, precision_bits).astype("<i8").tobytes(),
            "fixed-point weighted delta": encode(weighted, precision_bits).astype("<i8").tobytes(),
        }
        for encoding, probe in encodings.items():
            out[f"'{name}' as {encoding}"] = probe
    return out


def individual_updates_received(
    streams: Mapping[int, bytes], updates: Sequence[ClientUpdate], precision_bits: int
) -> list[str]:
    """One line per individual update (array, encoding) found in what the server received."""
    findings: list[str] = []
    for update in updates:
        probes = _probes(update, precision_bits)
        if not probes:
            raise ValueError(f"site {update.site}'s update has too few nonzero values to audit")
        for label, probe in probes.items():
            for connection, data in streams.items():
                if probe in data:
                    findings.append(
                        f"round {update.round}: site {update.site}'s update {label} found in connection {connection}"
                    )
    return findings
