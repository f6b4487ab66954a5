"""Array helpers shared by the reference aggregators (not a plugin).

Aggregation is done in float64 and cast back to each array's dtype, so a
float32 model gets the exact rounded result and integer buffers (BatchNorm's
``num_batches_tracked``) stay integers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedcore.types import ClientUpdate, SecureSum, Weights

if TYPE_CHECKING:
    from fedcore.spec import Components

#: Dataset settings field that states the number of sites before the data loads.
SITES_FIELD = "sites"


def is_float(array: np.ndarray) -> bool:
    return bool(np.issubdtype(array.dtype, np.floating))


def apply_step(global_weights: Weights, step: Mapping[str, np.ndarray]) -> Weights:
    """``global + step`` per array, computed in float64 and cast back to the array's dtype."""
    out: dict[str, np.ndarray] = {}
    for name, current in global_weights.arrays.items():
        total = current.astype(np.float64) + np.asarray(step[name], dtype=np.float64)
        out[name] = (total if is_float(current) else np.rint(total)).astype(current.dtype)
    return Weights(arrays=out)


def mean_deltas(summed: SecureSum) -> dict[str, np.ndarray]:
    """``sum_i n_i delta_i / sum_i n_i`` per array, in float64: the server's mean update."""
    return {
        name: np.asarray(total, dtype=np.float64) / summed.total_samples
        for name, total in summed.weighted_delta_sum.arrays.items()
    }


def stacked_deltas(updates: Sequence[ClientUpdate]) -> dict[str, np.ndarray]:
    """Each array's deltas stacked along a new first axis (one row per site), in float64."""
    if not updates:
        raise ValueError("no updates to aggregate")
    names = updates[0].delta.names
    for update in updates[1:]:
        if update.delta.names != names:
            raise ValueError(f"update of site {update.site} has a different layout than site {updates[0].site}")
    return {name: np.stack([u.delta[name].astype(np.float64) for u in updates]) for name in names}


def known_site_count(components: Components) -> int | None:
    """The number of sites the dataset's settings declare (``sites``), or None when it only shows at load."""
    count = getattr(components.dataset.settings, SITES_FIELD, None)
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def arrays_to_state(prefix: str, arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Arrays as ``{prefix/name: tensor}``: checkpoints hold tensors only (``torch.load(weights_only=True)``)."""
    return {f"{prefix}/{name}": torch.from_numpy(np.array(array, copy=True)) for name, array in arrays.items()}


def arrays_from_state(prefix: str, state: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Inverse of :func:`arrays_to_state` (keys of other prefixes are ignored)."""
    head = f"{prefix}/"
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if key.startswith(head):
            tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
            out[key[len(head) :]] = tensor.detach().cpu().numpy().copy()
    return out
