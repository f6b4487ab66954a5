"""Privacy accounting with Opacus's accountants: epsilon of a composition, noise calibration.

A *composition* is Opacus's accountant history: a tuple of ``(noise_multiplier,
sample_rate, steps)`` entries, each a Poisson-subsampled Gaussian mechanism run
``steps`` times (``sample_rate = 1`` is the plain Gaussian mechanism). Epsilon is
always what Opacus's PRV or RDP analysis computes for it; nothing here asserts one.

Two Opacus defaults are changed on purpose:

- RDP orders reach 1024 (Opacus stops at 63, which cannot express epsilon = 0.1 at
  delta = 1e-5: the conversion term ``log(1/delta) / (order - 1)`` alone exceeds 0.1).
- Calibration stops within a tolerance *relative* to the target (Opacus's is an
  absolute 0.01, which is 10 % of epsilon = 0.1), and PRV's discretisation error is
  scaled with the target too.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from opacus.accountants import PRVAccountant, RDPAccountant

from fedcore.cache import shared_results
from fedcore.errors import PrivacyBudgetError
from fedcore.rundir import atomic_write_bytes

AccountantName = Literal["prv", "rdp"]
Entry = tuple[float, float, int]
Composition = tuple[Entry, ...]

#: Opacus's default orders plus orders up to 1024; orders whose RDP overflows come out NaN
#: and Opacus's conversion skips them.
WIDE_RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)]
    + list(range(12, 64))
    + list(range(64, 256, 4))
    + [256, 288, 320, 384, 448, 512, 640, 768, 896, 1024]
)

#: calibrated epsilon lands in ``[target * (1 - CALIBRATION_RTOL), target]``
CALIBRATION_RTOL = 0.005


def prv_eps_error(target_epsilon: float) -> float:
    """PRV's allowed discretisation error for a budget: 1 % of it, within [1e-3, 0.05].

    Opacus reports PRV's *upper* bound, so a coarser grid only over-states epsilon;
    the floor keeps epsilon = 0.1 calibrations to seconds.
    """
    return min(0.05, max(1e-3, 0.01 * target_epsilon))


def _merged(history: Composition) -> Composition:
    """Adjacent entries with the same mechanism merged (the same composition, fewer PRV terms)."""
    out: list[Entry] = []
    for z, q, steps in history:
        if steps <= 0:
            continue
        if out and out[-1][0] == z and out[-1][1] == q:
            out[-1] = (z, q, out[-1][2] + steps)
        else:
            out.append((float(z), float(q), int(steps)))
    return tuple(out)


@functools.lru_cache(maxsize=512)
def _epsilon_cached(history: Composition, delta: float, accountant: str, eps_error: float) -> float:
    if accountant == "rdp":
        rdp = RDPAccountant()
        rdp.history = list(history)
        with warnings.catch_warnings():
            # "optimal order is the largest alpha" only says the bound could be tighter.
            warnings.simplefilter("ignore")
            return float(rdp.get_epsilon(delta, alphas=list(WIDE_RDP_ORDERS)))
    prv = PRVAccountant()
    prv.history = list(history)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(prv.get_epsilon(delta, eps_error=eps_error))
    except (ValueError, OverflowError, FloatingPointError, RuntimeError):
        # PRV's domain computation fails when the privacy loss is unbounded in practice.
        return math.inf


def epsilon_of(history: Composition, delta: float, accountant: AccountantName, eps_error: float = 0.01) -> float:
    """Epsilon at ``delta`` of a composition, by Opacus's ``accountant`` (0 for an empty one)."""
    merged = _merged(history)
    if not merged:
        return 0.0
    value = _epsilon_cached(merged, float(delta), accountant, float(eps_error))
    return value if math.isfinite(value) else math.inf


#: A folder that also keeps calibrations across processes (:func:`calibrations_kept_in`); None: this process only.
_CALIBRATION_FOLDER: Path | None = None


@contextlib.contextmanager
def calibrations_kept_in(folder: Path) -> Iterator[None]:
    """Within the block, also keep every calibration in ``folder`` (a small JSON file each, keyed by all its inputs).

    A deployed site calibrates in its own state folder: Flower starts a fresh process for
    each message, and calibrating the same budget again with PRV takes seconds each time.
    The result is a pure function of the inputs (and of this module's tolerance and
    Opacus's version, both in the key), so a kept one is the one a fresh search returns.
    """
    global _CALIBRATION_FOLDER
    before, _CALIBRATION_FOLDER = _CALIBRATION_FOLDER, folder
    try:
        yield
    finally:
        _CALIBRATION_FOLDER = before


def _kept_on_disk(search: Callable[..., float]) -> Callable[..., float]:
    """``search`` (keyword arguments only), also reading and writing results in :data:`_CALIBRATION_FOLDER`
    when set, else in the run's :func:`fedcore.cache.shared_results` (a simulation's workers then
    find what their parent's preflight calibrated: PRV takes seconds)."""
    signature = inspect.signature(search)

    @functools.wraps(search)
    def calibrate(**arguments: Any) -> float:
        shared = shared_results()
        folder = _CALIBRATION_FOLDER or (shared / "calibrations" if shared is not None else None)
        if folder is None:
            return search(**arguments)
        from opacus import __version__ as opacus_version

        bound = signature.bind(**arguments)
        bound.apply_defaults()
        inputs = {k: v for k, v in bound.arguments.items() if k != "where"}
        key = json.dumps({**inputs, "rtol": CALIBRATION_RTOL, "opacus": opacus_version}, sort_keys=True, default=repr)
        kept = folder / f"calibration-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
        if kept.exists():
            try:
                return float(json.loads(kept.read_text())["noise_multiplier"])
            except (OSError, ValueError, KeyError, TypeError):
                pass  # unreadable: calibrate again and rewrite it
        noise = search(**arguments)
        # Not flushed to the disk: a lost or torn file is read as missing and calibrated again.
        atomic_write_bytes(kept, json.dumps({"noise_multiplier": noise}).encode(), durable=False)
        return noise

    return calibrate


@functools.lru_cache(maxsize=128)
@_kept_on_disk
def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantName,
    eps_error: float,
    fixed: Composition = (),
    max_noise_multiplier: float = 100.0,
    where: str | None = None,
) -> float:
    """The smallest noise multiplier (to ``CALIBRATION_RTOL``) whose run meets ``target_epsilon``.

    The run is ``fixed`` (already decided releases) followed by ``steps`` steps at
    ``sample_rate``. Searches log(noise) by the Illinois variant of regula falsi, since
    log(epsilon) is close to linear in log(noise): a handful of accountant calls.
    ``eps_error`` is PRV's discretisation error (see :func:`prv_eps_error`). Results are
    cached: the preflight and the run calibrate the same sites (and, within
    :func:`calibrations_kept_in`, processes that calibrate the same budget again).

    :raises PrivacyBudgetError: when even ``max_noise_multiplier`` cannot meet the budget.
    """
    if target_epsilon <= 0 or not 0 < delta < 1:
        raise PrivacyBudgetError(
            f"epsilon must be > 0 and delta in (0, 1), got epsilon={target_epsilon}, delta={delta}",
            where=where,
            hint="set a positive epsilon and a delta such as 1e-5",
        )

    def eps_by(kind: AccountantName) -> Any:
        return lambda z: epsilon_of((*fixed, (z, sample_rate, steps)), delta, kind, eps_error)

    rdp_eps = eps_by("rdp")
    eps_hi = rdp_eps(max_noise_multiplier)
    if eps_hi > target_epsilon:
        raise PrivacyBudgetError(
            f"epsilon={target_epsilon:g} at delta={delta:g} is out of reach: even noise multiplier "
            f"{max_noise_multiplier:g} spends epsilon={eps_hi:.4g} over {steps} steps at sampling rate {sample_rate:.3g}",
            where=where,
            hint="raise epsilon, or train fewer rounds/epochs, or raise max_noise_multiplier (the model would learn nothing)",
        )
    # RDP is fast and robust at any noise level, so it brackets the search; PRV is tighter
    # but slow (and can take minutes) far from the answer, so it only refines near it.
    z_rdp = _solve(rdp_eps, target_epsilon, max_noise_multiplier, eps_hi, shrink=0.25)
    if accountant == "rdp":
        return z_rdp
    prv_eps = eps_by("prv")
    hi, eps_hi = z_rdp, prv_eps(z_rdp)
    while eps_hi > target_epsilon:  # PRV's upper bound can exceed RDP's when eps_error is coarse
        hi *= 1.1
        eps_hi = prv_eps(hi)
    return _solve(prv_eps, target_epsilon, hi, eps_hi, shrink=0.85)


def _solve(eps: Any, target: float, hi: float, eps_hi: float, shrink: float) -> float:
    """Smallest noise in ``(0, hi]`` with ``eps(noise)`` in ``[target (1 - rtol), target]``.

    ``eps(hi) <= target`` on entry. Steps down by ``shrink`` until the budget is exceeded,
    then refines log(noise) by the Illinois variant of regula falsi.
    """
    floor = target * (1 - CALIBRATION_RTOL)
    if eps_hi >= floor:
        return hi
    lo = hi * shrink
    eps_lo = eps(lo)
    while eps_lo <= target:
        if eps_lo >= floor or lo < 1e-4:
            return lo
        hi, eps_hi = lo, eps_lo
        lo *= shrink
        eps_lo = eps(lo)
    # Invariant: eps(lo) > target >= eps(hi).
    x_lo, x_hi = math.log(lo), math.log(hi)
    f_lo, f_hi = _log_ratio(eps_lo, target), _log_ratio(eps_hi, target)
    side = 0
    for _ in range(100):
        if eps_hi >= floor or x_hi - x_lo < 1e-9:
            break
        x = x_hi - f_hi * (x_hi - x_lo) / (f_hi - f_lo) if math.isfinite(f_lo) else (x_lo + x_hi) / 2
        if not x_lo < x < x_hi:
            x = (x_lo + x_hi) / 2
        value = eps(math.exp(x))
        f = _log_ratio(value, target)
        if value <= target:
            x_hi, f_hi, eps_hi = x, f, value
            if side == 1:
                f_lo /= 2
            side = 1
        else:
            x_lo, f_lo = x, f
            if side == -1:
                f_hi /= 2
            side = -1
    return math.exp(x_hi)


def _log_ratio(value: float, target: float) -> float:
    return math.log(value / target) if math.isfinite(value) and value > 0 else math.inf


def group_privacy(epsilon: float, delta: float, group_size: int) -> tuple[float, float]:
    """(epsilon, delta) for groups of ``group_size`` records: (k eps, k e^((k-1) eps) delta).

    The standard group-privacy bound (Dwork and Roth 2014, Lemma 2.2 generalised to
    approximate DP); it covers a patient with ``group_size`` rows.
    """
    k = max(1, int(group_size))
    return k * epsilon, min(1.0, k * math.exp((k - 1) * epsilon) * delta)


@dataclass
class Accountant:
    """A stateful accountant: Opacus's history of executed releases, checkpointable.

    :param kind: ``prv`` or ``rdp``.
    :param delta: the delta epsilon is reported at.
    :param eps_error: PRV's discretisation error (fixed per run so every report is comparable).
    """

    kind: AccountantName
    delta: float
    eps_error: float
    history: list[Entry] = field(default_factory=list)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Record ``steps`` executed releases of one subsampled Gaussian mechanism."""
        self.history = list(_merged((*self.history, (noise_multiplier, sample_rate, steps))))

    def epsilon(self, planned: Composition = ()) -> float:
        """Epsilon spent so far, plus ``planned`` releases if given (a projection)."""
        return epsilon_of((*self.history, *planned), self.delta, self.kind, self.eps_error)

    @property
    def steps(self) -> int:
        return sum(entry[2] for entry in self.history)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "delta": self.delta, "eps_error": self.eps_error, "history": [list(e) for e in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind or float(state.get("delta", -1)) != self.delta:
            raise PrivacyBudgetError(
                f"checkpointed accountant ({state.get('kind')}, delta={state.get('delta')}) does not match "
                f"this run ({self.kind}, delta={self.delta})",
                where="checkpoint",
                hint="resume with the spec the checkpoint was written with",
            )
        self.eps_error = float(state["eps_error"])
        self.history = [(float(z), float(q), int(s)) for z, q, s in state["history"]]
