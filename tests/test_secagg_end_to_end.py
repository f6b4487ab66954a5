"""Whole runs with secure aggregation: accuracy against plain FedAvg, and what the server receives."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import numpy as np
import pytest

from fedcore.engine.simulation import derive_seed, initial_module
from fedcore.engine.site import SiteRuntime
from fedcore.engine.training import weights_of
from fedcore.plugins.privacy.secure.aggregator import crypten_import_problem
from fedcore.plugins.privacy.secure.audit import individual_updates_received
from fedcore.plugins.privacy.secure.channel import decode_frames, read_capture
from fedcore.plugins.privacy.secure.fixed_point import VectorLayout
from fedcore.plugins.privacy.secure.group import PartyGroup
from fedcore.plugins.privacy.secure.server import PlainSiteLink, ServerConfig, ServerProcess
from fedcore.spec import build_components, load_experiment
from fedcore.testing import run_spec_text
from fedcore.types import ClientUpdate, Weights

pytestmark = [
    pytest.mark.skipif(crypten_import_problem() is not None, reason=f"{crypten_import_problem()}"),
    pytest.mark.slow,
]

SPEC = """\
name: secagg-e2e
seed: 7
data: {use: synthetic-ehr, settings: {sites: 3, patients_per_site: 1500}}
model: {use: mlp, settings: {hidden: [32, 16]}}
training: {rounds: 3, local_epochs: 1, batch_size: 32, learning_rate: 0.01}
aggregator: {use: fedavg}
execution: {progress: false, checkpoints: false}
"""
PRECISION_BITS = 16


def test_secure_aggregation_reaches_plain_fedavg_accuracy_for_the_same_seed(tmp_path: Path) -> None:
    accuracy = {}
    for label, extra in (("plain", ""), ("secure", "secure_aggregation: {use: crypten}\n")):
        run_dir = run_spec_text(SPEC + extra, tmp_path / label)
        rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
        accuracy[label] = [r["test"]["accuracy"] for r in rounds if r["mode"] == "federated"]
    assert len(accuracy["secure"]) == 3
    assert accuracy["plain"][-1] > accuracy["plain"][0]  # the model learns, so equal accuracy means something
    for plain, secure in zip(accuracy["plain"], accuracy["secure"], strict=True):
        assert abs(plain - secure) <= 0.005


def federate_through_a_server_process(mode: str, tmp_path: Path, rounds: int = 2) -> tuple[list[ClientUpdate], Path, Weights, bytes]:
    """Sites train here; the server is its own process and gets only what the transport sends it."""
    experiment = load_experiment(None, (), text=SPEC)
    spec = experiment.spec
    components = build_components(spec, experiment.plugins)
    data = components.dataset.load(spec.seed)
    initial = weights_of(initial_module(components, data, spec.seed))
    sites = [
        SiteRuntime(
            d, components.model.build(data.n_features, data.n_classes), spec.training, [], data.n_classes, derive_seed(spec.seed, 1, d.site)
        )
        for d in data.sites
    ]
    key = secrets.token_bytes(32)
    capture = tmp_path / f"{mode}-server-received.bin"
    server = ServerProcess(
        ServerConfig(mode, len(sites), key, PRECISION_BITS, {"use": "fedavg", "settings": {}}, initial, rounds, capture)  # type: ignore[arg-type]
    )
    group = PartyGroup(len(sites), server_address=server.address, key=key, precision_bits=PRECISION_BITS)
    links: list[PlainSiteLink] = []
    sent: list[ClientUpdate] = []
    try:
        if mode == "secure":
            group.start(timeout_s=180)
        else:
            links = [PlainSiteLink(s, server.address, key) for s in range(len(sites))]
        weights = initial
        for round_ in range(1, rounds + 1):
            updates = [site.fit(weights, round_) for site in sites]
            sent += updates
            if mode == "secure":
                group.submit(round_, VectorLayout.of(initial), {u.site: u for u in updates}, timeout_s=60)
            else:
                for link, update in zip(links, updates, strict=True):
                    link.send(update)
            weights = server.next_weights(round_)
    finally:
        group.close()
        for link in links:
            link.close()
        server.stop()
    return sent, capture, weights, key


def test_no_individual_update_reaches_a_server_in_its_own_process_and_the_control_shows_the_check_can_fail(
    tmp_path: Path,
) -> None:
    secure_updates, secure_capture, secure_weights, key = federate_through_a_server_process("secure", tmp_path)
    received = read_capture(secure_capture)
    assert individual_updates_received(received, secure_updates, PRECISION_BITS) == []
    # The server did receive something each round: one share of the sum from each party.
    kinds = [header["type"] for stream in received.values() for header, _ in decode_frames(stream, key)]
    assert kinds.count("share") == 3 * 2 and kinds.count("hello") == 3 and len(kinds) == 9

    plain_updates, plain_capture, plain_weights, _ = federate_through_a_server_process("plain", tmp_path)
    findings = individual_updates_received(read_capture(plain_capture), plain_updates, PRECISION_BITS)
    found_sites = {(u.round, u.site) for u in plain_updates if any(f"round {u.round}: site {u.site}'s" in f for f in findings)}
    assert found_sites == {(r, s) for r in (1, 2) for s in range(3)}

    # Same seed, same sites: the secure run's model is the plain run's, up to fixed-point rounding.
    for name in plain_weights.names:
        assert np.allclose(secure_weights[name], plain_weights[name], atol=1e-5)
