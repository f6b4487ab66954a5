"""Against a live Fabric network (Fabric's own peer and orderer binaries, 4 SmartBFT orderers).

The network is started once for this module (`fedcore fabric up` in a temporary
directory, ~40 s on 2 cores). The binaries come from `fedcore fabric build`
(.ci/run builds them, cached by version); without them the tests skip, except
in CI, where a missing build is a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("grpc", reason="needs the fabric extra (grpcio)")
pytest.importorskip("fabric_protos", reason="needs the fabric extra (hyperledger-fabric-protos)")

from fedcore.errors import RunFailure  # noqa: E402
from fedcore.plugins.ledgers.fabric import RECEIPTS, UNCONFIRMED, FabricLedger  # noqa: E402
from fedcore.plugins.ledgers.fabric.client import FabricTransactionError, GatewayClient  # noqa: E402
from fedcore.plugins.ledgers.fabric.devca import DevCA  # noqa: E402
from fedcore.plugins.ledgers.fabric.network import CHAINCODE_DIR, LocalNetwork, bin_dir, connect, missing_binaries  # noqa: E402
from fedcore.plugins.ledgers.fabric.verify import verify_run  # noqa: E402
from fedcore.types import LedgerRecord  # noqa: E402

MISSING = missing_binaries()
if not (CHAINCODE_DIR / "node_modules" / ".bin" / "fabric-chaincode-node").exists():
    MISSING.append("chaincode node_modules")
if MISSING and os.environ.get("CI"):
    raise RuntimeError(f"CI must build Fabric first (`fedcore fabric build`): missing {MISSING} in {bin_dir()}")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"no Fabric build ({', '.join(MISSING)}): run `fedcore fabric build`"),
]
BASE_PORT = 27050
FEDCORE = str(Path(sys.executable).with_name("fedcore"))
SPEC = """
name: fabric-e2e
seed: 3
data: {{use: synthetic-ehr, settings: {{sites: 3, patients_per_site: 200}}}}
training: {{rounds: 3, local_epochs: 1, batch_size: 64}}
ledger: {{use: fabric, settings: {{network: {network}, commit_timeout_seconds: 30}}}}
execution: {{progress: false, checkpoints: false}}
"""


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fabric") / "net"
    up = subprocess.run([FEDCORE, "fabric", "up", "--dir", str(root), "--base-port", str(BASE_PORT)],
                        capture_output=True, text=True, timeout=300)
    net = LocalNetwork(root)
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        yield net
    finally:
        net.down()
        assert not net.running()


def _fabric(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FEDCORE, "fabric", *args], capture_output=True, text=True, timeout=120)


def test_up_refuses_over_a_running_network_and_status_says_what_runs(network: LocalNetwork, tmp_path: Path) -> None:
    again = _fabric("up", "--dir", str(network.root))
    assert again.returncode == 2 and "already running" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    status = _fabric("status", "--dir", str(network.root), "--json")
    nodes = json.loads(status.stdout)["nodes"]
    assert len(nodes) == 12 and all(n["running"] for n in nodes.values())
    # Another network on the same ports: one line naming the process, the busy port and its log.
    busy = _fabric("up", "--dir", str(tmp_path / "other"), "--base-port", str(BASE_PORT))
    assert busy.returncode == 2, busy.stderr
    assert f"cannot start orderer.coordinator: port {BASE_PORT}" in busy.stderr and "orderer.coordinator.log" in busy.stderr
    assert all(n["running"] for n in network.status()["nodes"].values())


def test_shrunk_paper_run_commits_every_digest_and_verify_rereads_the_channel(network: LocalNetwork, tmp_path: Path) -> None:
    from fedcore.engine.runner import run_experiment
    from fedcore.spec import load_experiment

    run_dir = run_experiment(load_experiment(None, [], text=SPEC.format(network=network.root)), out=tmp_path / "run",
                             workers=1, progress=False)
    ledger = json.loads((run_dir / "summary.json").read_text())["arms"][0]["federated"]["runs"][0]["ledger"]
    receipts = [json.loads(line) for line in (run_dir / "ledger" / "main-r0" / RECEIPTS).read_text().splitlines()]
    kinds = [e["kind"] for r in receipts for e in r["entries"]]
    assert kinds.count("site-update") == 9 and kinds.count("aggregate") == 3
    assert ledger["entries"] == ledger["entries_on_chain"] == len(kinds)
    assert ledger["unconfirmed_transactions"] == 0 and ledger["bytes"] > 0
    # Read from the channel's config block, not from a setting.
    assert ledger["consensus"].startswith("Hyperledger Fabric, orderer type BFT (channel config block 0), 4 consenters")
    assert "simulated" not in ledger["ledger"]
    ok = verify_run(run_dir)  # what `fedcore ledger verify RUN --ledger fabric` runs (the CLI is used below)
    assert ok.ok and ok.entries == len(kinds), ok.message
    # Each block is signed by a BFT quorum of the consenters (checked against their certificates in the config block).
    from fabric_protos.common import common_pb2

    from fedcore.plugins.ledgers.fabric import block_bytes, consenters, orderer_config
    from fedcore.plugins.ledgers.fabric.verify import bft_signers

    with connect(network.profile()) as clients:
        signers = consenters(orderer_config(clients["server"])[1])
        block = common_pb2.Block.FromString(block_bytes(clients["server"], receipts[-1]["block"]))
    assert len(signers) == 4 and len(bft_signers(block, signers)[0]) >= 3
    block.header.number += 1
    assert bft_signers(block, signers)[0] == set()
    # Change one local record (site-1's round-2 update digest): detected against the peer's copy.
    path = run_dir / "ledger" / "main-r0" / RECEIPTS
    line = next(i for i, r in enumerate(receipts) if r["writer"] == "site-1" and r["entries"][0]["round"] == 2)
    receipts[line]["entries"][0]["payloadSha256"] = "0" * 64
    path.write_text("".join(json.dumps(r) + "\n" for r in receipts))
    bad = subprocess.run([FEDCORE, "ledger", "verify", str(run_dir), "--ledger", "fabric"], capture_output=True, text=True)
    assert bad.returncode == 1 and f"line {line + 1}" in bad.stderr and "differ from the local record" in bad.stderr


def _round(ledger: FabricLedger, round_: int) -> None:
    ledger.append([LedgerRecord(kind="site-update", round=round_, writer=f"site-{i}", payload_sha256=f"{round_:02d}{i:02d}" * 16)
                   for i in range(3)] + [LedgerRecord(kind="aggregate", round=round_, writer="server", payload_sha256="ab" * 32)])


def _heights(network: LocalNetwork) -> list[int]:
    heights = []
    for org in network.orgs:
        base = network.root / "orgs" / org.name
        done = subprocess.run([str(bin_dir() / "osnadmin"), "channel", "list", "--channelID", "fedcore",
                               "-o", f"127.0.0.1:{org.orderer_admin_port}", "--ca-file", str(base / "ca" / "ca.pem"),
                               "--client-cert", str(base / "admin" / "tls" / "cert.pem"),
                               "--client-key", str(base / "admin" / "tls" / "key.pem")],
                              capture_output=True, text=True, timeout=30)
        heights.append(json.loads(done.stdout[done.stdout.index("{"):])["height"])
    return heights


def test_bft_tolerates_one_stopped_orderer_halts_without_quorum_and_catches_up(network: LocalNetwork, tmp_path: Path) -> None:
    ledger = FabricLedger(FabricLedger.Settings(network=str(network.root), commit_timeout_seconds=30))
    ledger.open(tmp_path / "ledger" / "main-r0", ["site-0", "site-1", "site-2"])
    try:
        _round(ledger, 1)
        assert network.stop_node("orderer.site-2")  # one of four: f = 1 is tolerated
        _round(ledger, 2)
        _round(ledger, 3)
        assert network.stop_node("orderer.site-1")  # two of four: no quorum of 3
        started = time.monotonic()
        with pytest.raises(RunFailure) as info:
            _round(ledger, 4)
        message = str(info.value)
        assert time.monotonic() - started < 15 and "\n" not in message
        assert "quorum" in message and "orderers running 2/4, SmartBFT quorum 3" in message
        assert "orderer.site-1" in message and "orderer.site-2" in message
        receipts = [json.loads(line) for line in ledger.receipts.read_text().splitlines()]
        assert [r["entries"][0]["round"] for r in receipts].count(4) == 0  # nothing recorded as committed that was not
        assert (ledger.directory / UNCONFIRMED).exists()
        # A ledger told to wait (on_ordering_failure: wait) retries until the orderers are back.
        waiting = FabricLedger(FabricLedger.Settings(network=str(network.root), on_ordering_failure="wait",
                                                     wait_seconds=120, commit_timeout_seconds=30))
        waiting.open(tmp_path / "ledger" / "waiting-r0", ["site-0", "site-1", "site-2"])
        restart = threading.Timer(3.0, lambda: [network.start_node(n) for n in ("orderer.site-1", "orderer.site-2")])
        restart.start()
        _round(waiting, 4)  # returns once committed after the restart
        restart.join()
        waited = waiting.close()
        assert waited["entries"] == 4 and waited["entries_on_chain"] >= 4  # retries refused earlier may be ordered too
        _round(ledger, 5)  # the first ledger goes on too
        deadline = time.monotonic() + 60
        while len(set(_heights(network))) != 1:
            assert time.monotonic() < deadline, f"orderers did not converge: {_heights(network)}"
            time.sleep(1)
    finally:
        network.start_node("orderer.site-1")
        network.start_node("orderer.site-2")
        summary = ledger.close()
    assert summary["unconfirmed_transactions"] >= 1
    result = verify_run(tmp_path)
    assert result.ok, result.message


def test_real_peer_refuses_wrong_writer_unknown_ca_missing_endorser_and_no_client_certificate(network: LocalNetwork) -> None:
    profile = network.profile()
    assert profile is not None
    entry = lambda writer: json.dumps([{"round": 1, "kind": "site-update", "writer": writer, "payloadSha256": "cd" * 32}])  # noqa: E731
    site0 = profile["organizations"][1]
    with connect(profile) as clients:
        # A hospital writing in another hospital's name: both endorsing peers run the chaincode and refuse.
        with pytest.raises(FabricTransactionError) as info:
            clients["site-0"].submit("RecordEntries", "refusals", entry("site-1"))
        assert "Site0MSP: chaincode response 500, entry 0: writer 'site-1' is not the submitting identity 'site-0'" in str(info.value)
        # Endorsed by its own peer only: ordered, then invalidated by every peer's validation (policy needs the coordinator).
        alone = clients["site-0"]
        alone.endorsing_organizations = ["Site0MSP"]
        with pytest.raises(FabricTransactionError, match="committed as ENDORSEMENT_POLICY_FAILURE"):
            alone.submit("RecordEntries", "refusals", entry("site-0"))
        assert json.loads(clients["server"].evaluate("GetRunEntries", "refusals")) == []
    tls = {"tls_ca_pem": Path(site0["tls_ca_cert"]).read_bytes(), "server_name": site0["peer_server_name"]}
    client_pair = {"tls_client_cert_pem": Path(site0["tls_client"]["cert"]).read_bytes(),
                   "tls_client_key_pem": Path(site0["tls_client"]["key"]).read_bytes()}
    # Right MSP id, name and OU, but a certificate from a CA the channel does not know.
    outsider = DevCA("Site0MSP", organization="site-0").issue("site-0", unit="client")
    stranger = GatewayClient(site0["peer"], outsider, "fedcore", "fedcore-ledger", **tls, **client_pair)
    with pytest.raises(FabricTransactionError) as info:
        stranger.submit("RecordEntries", "refusals", entry("site-0"))
    assert "access denied: channel [fedcore] creator org unknown, creator is malformed" in str(info.value)
    stranger.close()
    # The peers require mutual TLS: without a client certificate the handshake is refused.
    identity = connect(profile)["site-0"].identity
    anonymous = GatewayClient(site0["peer"], identity, "fedcore", "fedcore-ledger", timeout=5, **tls)
    with pytest.raises(FabricTransactionError, match="UNAVAILABLE"):
        anonymous.evaluate("GetRunEntries", "refusals")
    anonymous.close()


def test_a_run_without_orderer_quorum_stops_with_one_line(network: LocalNetwork, tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(network=network.root))
    for name in ("orderer.site-0", "orderer.site-2"):
        network.stop_node(name)
    try:
        started = time.monotonic()
        done = subprocess.run([FEDCORE, "run", str(spec), "--out", str(tmp_path / "run"), "--workers", "1", "--no-progress"],
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("run failed: Fabric: server's ledger transaction could not be ordered")
        assert "SmartBFT quorum 3" in lines[0] and "Traceback" not in done.stderr
        assert time.monotonic() - started < 120
    finally:
        for name in ("orderer.site-0", "orderer.site-2"):
            network.start_node(name)
