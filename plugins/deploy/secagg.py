"""``secagg-plus`` in a deployment: Flower's SecAgg+ workflow and mod around fedcore's round.

The coordinator half (:func:`secure_round`) runs Flower's ``SecAggPlusWorkflow``
with a minimal legacy ``Strategy`` that hands out fedcore's round (global model,
broadcast extras, round metadata) as ``FitIns`` and captures the revealed
weighted mean. The round travels in the ``FitIns`` config in fedcore's wire
format (:func:`~fedcore.plugins.deploy.wire.encode_items`: compressed tensor
groups, the global model left out for a site that holds it), its parameters
empty; only the update goes back as ``FitRes`` parameters, one float array per
tensor, which the mod quantizes and masks (compression cannot apply to masked
vectors); the site half (:func:`secure_train_reply`) is the ClientApp's
``train`` under Flower's ``secaggplus_mod``: it trains exactly as without
secure aggregation and returns its released update as ``FitRes`` parameters,
which the mod masks (and strips) before anything leaves the site. What the
coordinator still gets from each site in the clear: the hiding commitment to the update, its
signature, sample count, loss, timing and privacy report (as without secure
aggregation), never the update.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np

import flwr.compat.common.recorddict_compat as compat
from flwr.app import ConfigRecord, Context, Message
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedcore.plugins.deploy.wire import decode_items, encode_items
from fedcore.types import ClientUpdate, SecureSum, Weights

META_KEY = "fedcore"


class SealedUpdate(ClientUpdate):
    """An update the coordinator never saw: the site's own commitment to it and its size (secure aggregation)."""

    claimed_digest: str
    claimed_bytes: int

    def digest(self) -> str:
        return self.claimed_digest

    def nbytes(self) -> int:
        return self.claimed_bytes


class _RoundStrategy(Strategy):
    """The legacy strategy SecAgg+ expects: fedcore's round as FitIns, the revealed mean captured."""

    def __init__(self, proxies: Sequence[ClientProxy], configs: Mapping[int, dict[str, Any]], parameters: Parameters) -> None:
        self.proxies = list(proxies)
        self.configs = configs  # by node id
        self.parameters = parameters
        self.results: list[tuple[ClientProxy, FitRes]] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.parameters

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        return [(proxy, FitIns(self.parameters, dict(self.configs[proxy.node_id]))) for proxy in self.proxies]

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> tuple[Parameters | None, dict[str, Any]]:
        self.results = list(results)
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list[Any]:
        return []

    def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> tuple[float | None, dict[str, Any]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Any]] | None:
        return None


def secure_round(
    grid: Grid,
    context: Context,
    node_ids: Sequence[int],
    round_: int,
    meta: Mapping[str, Any],
    global_weights: Weights,
    extras: Mapping[str, Weights],
    settings: Any,
    holding: Collection[int] = (),
) -> tuple[SecureSum | None, dict[int, dict[str, Any]]]:
    """Run one SecAgg+ round; the revealed sum (None if the protocol halted) and each site's plain metadata by node.

    :param holding: nodes that hold ``global_weights`` already (their message names it by digest in ``meta``).
    """
    names = list(global_weights.arrays)
    broadcast = {f"extra:{name}": weights for name, weights in extras.items()}
    sent, named = encode_items(meta, {"global": global_weights, **broadcast}), encode_items(meta, broadcast)
    parameters = ndarrays_to_parameters([])
    proxies = [GridClientProxy(node, grid, grid.run.run_id) for node in node_ids]
    strategy = _RoundStrategy(proxies, {node: named if node in holding else sent for node in node_ids}, parameters)
    legacy = LegacyContext(context, strategy=strategy, client_manager=SimpleClientManager())
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_})
    legacy.state.array_records["parameters"] = compat.parameters_to_arrayrecord(parameters, keep_input=True)
    workflow = SecAggPlusWorkflow(
        num_shares=settings.num_shares if settings.num_shares <= 1 else int(settings.num_shares),
        reconstruction_threshold=settings.reconstruction_threshold
        if settings.reconstruction_threshold <= 1
        else int(settings.reconstruction_threshold),
        max_weight=settings.max_weight,
        clipping_range=settings.clipping_range,
        quantization_range=settings.quantization_range,
        timeout=settings.timeout_s,
    )
    workflow(grid, legacy)
    if not strategy.results:
        return None, {}
    by_node = {proxy.node_id: json.loads(str(fitres.metrics[META_KEY])) for proxy, fitres in strategy.results}
    mean = parameters_to_ndarrays(strategy.results[0][1].parameters)
    total = sum(int(fitres.num_examples) for _, fitres in strategy.results)
    summed = SecureSum(
        round=round_,
        weighted_delta_sum=Weights(arrays={n: np.asarray(a, dtype=np.float64) * total for n, a in zip(names, mean, strict=True)}),
        total_samples=total,
        n_sites=len(strategy.results),
    )
    return summed, by_node


def secure_train_reply(message: Message, train: Callable[[dict[str, Any], dict[str, Weights]], tuple[dict[str, Any], ClientUpdate]]) -> Message:
    """At the site, inside ``secaggplus_mod``: fedcore's training of the round, replied as ``FitRes`` for masking."""
    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    meta, tensors = decode_items(fitins.config, "coordinator")
    reply_meta, update = train(meta, tensors)
    names = update.delta.names
    plain = {
        **reply_meta,
        "site": update.site,
        "round": update.round,
        "n_samples": update.n_samples,
        "local_steps": update.local_steps,
        "train_loss": update.train_loss,
        "train_seconds": update.train_seconds,
        "bytes": update.nbytes(),
    }
    fitres = FitRes(
        status=Status(Code.OK, ""),
        parameters=ndarrays_to_parameters([np.asarray(update.delta[n]) for n in names]),
        num_examples=update.n_samples,
        metrics={META_KEY: json.dumps(plain)},
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=message)
