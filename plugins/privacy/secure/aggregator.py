"""``crypten``: secure aggregation with CrypTen, each hospital its own party process.

Each site runs a CrypTen party (an OS process; torch.distributed with gloo,
on loopback in the simulation). Every round a party receives its own site's
update as released (after client-side DP), encodes ``n_i * delta_i`` in fixed
point and secret-shares it; the parties add their shares of all inputs, and
each sends the server one share of the sum. The server adds the shares and
learns only ``sum_i n_i * delta_i``, ``sum_i n_i``, the number of sites and the
sums of any extra tensors (:class:`~fedcore.types.SecureSum`): never one
site's update. Central DP then noises that sum on the server
(``PrivacyMechanism.transform_sum``), after clipping at the sites.

Threat model: honest-but-curious server and sites; the server learns nothing
beyond the sum unless it colludes with all but one site. CrypTen is a research
library: its shares come from torch's Mersenne Twister seeded with ``os.urandom``
(not a cryptographic PRG) and gloo traffic is not encrypted; a deployment
across hospitals needs TLS links and a reviewed PRG.
"""

from __future__ import annotations

import functools
import importlib.util
import secrets
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from fedcore.components import Aggregator, SecureAggregator
from fedcore.errors import PluginError, SpecError
from fedcore.plugins.privacy.secure.channel import ChannelError, FrameReceiver, int64_from_body
from fedcore.plugins.privacy.secure.fixed_point import VectorLayout, sum_from_shares
from fedcore.plugins.privacy.secure.group import PartyFailure, PartyGroup, RangeError
from fedcore.types import ClientUpdate, SecureSum, Weights

if TYPE_CHECKING:
    from fedcore.spec import Components, ExperimentSpec

INSTALL_HINT = "install it with: pip install --no-deps -r requirements/crypten.txt && pip install onnx==1.18.0 omegaconf==2.4.0"


class CrypTenSettings(BaseModel):
    """Settings of the ``crypten`` secure aggregator."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    precision_bits: int = Field(
        16, ge=0, le=40, description="fixed-point fraction bits; each summed value is exact to n_sites * 2**-(bits+1)"
    )
    master_addr: str = Field("127.0.0.1", description="rendezvous host of the parties' gloo process group")
    master_port: int = Field(0, ge=0, le=65535, description="rendezvous port; 0 picks a free one")
    server_host: str = Field("127.0.0.1", description="host the server listens on for the parties' shares")
    server_port: int = Field(0, ge=0, le=65535, description="port the server listens on; 0 picks a free one")
    gloo_interface: str | None = Field(None, description="network interface for gloo (GLOO_SOCKET_IFNAME)")
    startup_timeout_s: float = Field(180.0, gt=0, description="watchdog: parties must join within this time")
    round_timeout_s: float = Field(60.0, gt=0, description="watchdog: every party must share within this time per round")


@functools.cache
def crypten_import_problem() -> str | None:
    """Why CrypTen cannot be imported here, or None (checked once per process)."""
    for module, package in (("crypten", "crypten==0.4.1"), ("onnx", "onnx"), ("omegaconf", "omegaconf")):
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed; {INSTALL_HINT}"
    from fedcore.plugins.privacy.secure.party import import_crypten

    try:
        import_crypten()
    except Exception as exc:  # a broken install (protobuf, torch.onnx layout) is unavailability too
        return f"CrypTen fails to import ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
    return None


class CrypTenSecureAggregator(SecureAggregator):
    """The server learns only the sum of the sites' updates, computed by CrypTen parties."""

    name: ClassVar[str] = "crypten"
    Settings: ClassVar[type[BaseModel]] = CrypTenSettings
    description: ClassVar[str] = "CrypTen MPC: each site a party process; the server learns only the weighted sum"

    def __init__(self, settings: BaseModel | None = None) -> None:
        super().__init__(settings)
        self._group: PartyGroup | None = None
        self._receiver: FrameReceiver | None = None
        self._template: Weights | None = None
        self._opened_at = 0.0
        self._ready = False
        #: seconds :meth:`secure_sum` took per round, start-up wait excluded (the benchmark reads them)
        self.round_seconds: list[float] = []
        #: from :meth:`open` until every party joined, and the part of it a round had to wait
        self.startup_seconds = 0.0
        self.startup_wait_seconds = 0.0

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return crypten_import_problem()

    def check_spec(self, spec: ExperimentSpec, components: Components) -> None:
        aggregator = type(components.aggregator)
        if aggregator.aggregate_sum is Aggregator.aggregate_sum:
            raise SpecError(
                f"aggregator '{spec.aggregator.use}' does not aggregate from a sum, but secure aggregation "
                f"'{self.name}' reveals only the sum of the updates",
                where="secure_aggregation",
                hint="remove secure_aggregation or choose an aggregator that needs only the sum (fedavg, fedavgm, fedadam...)",
            )

    @property
    def party_pids(self) -> list[int]:
        """Process ids of the parties (site ``i`` is party ``i``); waits until they have joined."""
        self.wait_ready()
        return self._group.pids if self._group is not None else []

    def open(self, n_sites: int, template: Weights) -> None:
        """Launch the parties and return: their start-up overlaps the first round's local training."""
        reason = crypten_import_problem()
        if reason:
            raise PluginError(f"secure aggregator '{self.name}' is unavailable: {reason}", where="secure_aggregation.use")
        s: CrypTenSettings = self.settings  # type: ignore[assignment]
        self._opened_at = time.perf_counter()
        key = secrets.token_bytes(32)
        self._template = template
        self._receiver = FrameReceiver(n_sites, key, s.server_host, s.server_port)
        self._group = PartyGroup(
            n_sites,
            server_address=self._receiver.address,
            key=key,
            precision_bits=s.precision_bits,
            master_addr=s.master_addr,
            master_port=s.master_port,
            gloo_interface=s.gloo_interface,
            connect_timeout_s=s.startup_timeout_s,
        )
        self._ready = False
        try:
            self._group.launch()
        except BaseException:
            self.close()
            raise

    def wait_ready(self) -> None:
        """Block until every party has joined (at most ``startup_timeout_s`` after :meth:`open`)."""
        if self._ready:
            return
        if self._group is None or self._receiver is None:
            raise PartyFailure("secure aggregation is not running (not opened, or stopped after a failure)")
        s: CrypTenSettings = self.settings  # type: ignore[assignment]
        waited = time.perf_counter()
        remaining = max(0.1, s.startup_timeout_s - (waited - self._opened_at))
        try:
            self._group.wait_ready(remaining)
            self._receiver.accept("party", time.monotonic() + remaining, self._group.check_alive)
        except ChannelError as exc:
            self.close()
            raise PartyFailure(f"secure aggregation could not start: {exc}") from None
        except BaseException:
            self.close()
            raise
        self._ready = True
        self.startup_seconds = time.perf_counter() - self._opened_at
        self.startup_wait_seconds = time.perf_counter() - waited

    def secure_sum(self, round: int, updates: Sequence[ClientUpdate]) -> SecureSum:
        self.wait_ready()
        if self._group is None or self._receiver is None or self._template is None or self._group.closed:
            raise PartyFailure("secure aggregation is not running (not opened, or stopped after a failure)")
        start = time.perf_counter()
        s: CrypTenSettings = self.settings  # type: ignore[assignment]
        by_site = {u.site: u for u in updates}
        if len(by_site) != len(updates) or not all(0 <= site < self._group.n_parties for site in by_site):
            raise ValueError(f"updates must come from distinct sites 0..{self._group.n_parties - 1}")
        layout = VectorLayout.of(self._template, updates[0].extras if updates else None)
        deadline = time.monotonic() + s.round_timeout_s
        try:
            self._group.submit(round, layout, by_site, s.round_timeout_s)
            frames = self._receiver.receive_round("share", round, deadline, self._group.check_alive)
        except RangeError as exc:
            # Every party skipped this round together, so the group stays usable.
            raise SpecError(
                str(exc), where="secure_aggregation.settings.precision_bits", hint="lower precision_bits"
            ) from None
        except ChannelError as exc:
            self.close()
            raise PartyFailure(f"secure aggregation stopped in round {round}: {exc}") from None
        except BaseException:
            self.close()
            raise
        shares = [int64_from_body(frames[party][1]) for party in sorted(frames)]
        summed = sum_from_shares(round, layout, shares, s.precision_bits)
        self.round_seconds.append(time.perf_counter() - start)
        return summed

    def close(self) -> None:
        if self._group is not None:
            self._group.close()
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None
