"""The Python Fabric Gateway client against FakeFabricGateway, which runs the real JavaScript chaincode."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("grpc", reason="needs the fabric extra (grpcio)")
pytest.importorskip("fabric_protos", reason="needs the fabric extra (hyperledger-fabric-protos)")

import grpc  # noqa: E402
from fabric_protos.gateway import gateway_pb2, gateway_pb2_grpc  # noqa: E402
from fabric_protos.peer import proposal_pb2  # noqa: E402

from fedcore.plugins.ledgers.fabric import FabricLedger  # noqa: E402
from fedcore.plugins.ledgers.fabric.client import FabricTransactionError, GatewayClient  # noqa: E402
from fedcore.plugins.ledgers.fabric.devca import DevCA, private_key_pem  # noqa: E402
from fedcore.plugins.ledgers.fabric.fake_gateway import (  # noqa: E402
    CHAINCODE_DIR,
    chaincode_unavailable_reason,
    start_fake_network,
)
from fedcore.plugins.ledgers.fabric.protocol import P256_ORDER, build_proposal  # noqa: E402
from fedcore.types import LedgerRecord  # noqa: E402

REASON = chaincode_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"FakeFabricGateway needs the chaincode: {REASON}")
CLIENT_DIR = CHAINCODE_DIR.parent / "client-node"
DIGEST = "ab" * 32


@pytest.fixture(scope="module")
def network():
    gateway, endpoint, identities, _ = start_fake_network("fedcore", "fedcore-ledger", ["server", "site-0", "site-1"])
    yield gateway, endpoint, identities
    gateway.stop()


def client(endpoint: str, identity, **kw) -> GatewayClient:
    return GatewayClient(endpoint, identity, "fedcore", "fedcore-ledger", **kw)


def entries(writer: str, round_: int = 1) -> str:
    return json.dumps([{"round": round_, "kind": "site-update", "writer": writer, "payloadSha256": DIGEST, "metadata": {"n": 1}}])


def test_submit_commits_and_evaluate_reads_back(network) -> None:
    gateway, endpoint, identities = network
    site = client(endpoint, identities["site-0"])
    committed = site.submit("RecordEntries", "run-a", entries("site-0"))
    assert committed.block_number >= 1 and len(committed.tx_id) == 64
    stored = json.loads(committed.result)
    assert stored[0]["txId"] == committed.tx_id and stored[0]["mspId"] == "FedcoreMSP"
    read = json.loads(site.evaluate("GetEntries", "run-a", "1"))
    assert [e["payloadSha256"] for e in read] == [DIGEST]
    site.close()


def test_chaincode_refuses_entry_in_another_sites_name(network) -> None:
    _, endpoint, identities = network
    with pytest.raises(FabricTransactionError, match="not the submitting identity"):
        client(endpoint, identities["site-0"]).submit("RecordEntries", "run-b", entries("site-1"))


def _raw_endorse(endpoint: str, tx_id: str, signed: proposal_pb2.SignedProposal):
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(endpoint))
    return stub.Endorse(gateway_pb2.EndorseRequest(transaction_id=tx_id, channel_id="fedcore", proposed_transaction=signed))


def _proposal(identities):
    return build_proposal(identities["site-0"], "fedcore", "fedcore-ledger", [b"RecordEntries", b"run-c", entries("site-0").encode()])


def test_tampered_proposal_is_rejected(network) -> None:
    _, endpoint, identities = network
    proposal = _proposal(identities)
    tampered = bytearray(proposal.proposal_bytes)
    tampered[-5] ^= 0x01
    with pytest.raises(grpc.RpcError) as info:
        _raw_endorse(endpoint, proposal.tx_id, proposal_pb2.SignedProposal(proposal_bytes=bytes(tampered), signature=proposal.signature))
    assert info.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)


def test_high_s_signature_is_rejected(network) -> None:
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

    _, endpoint, identities = network
    proposal = _proposal(identities)
    r, s = decode_dss_signature(proposal.signature)
    high = encode_dss_signature(r, P256_ORDER - s)  # the same signature, malleated: valid ECDSA, refused by Fabric
    with pytest.raises(grpc.RpcError, match="high S"):
        _raw_endorse(endpoint, proposal.tx_id, proposal_pb2.SignedProposal(proposal_bytes=proposal.proposal_bytes, signature=high))


def test_wrong_transaction_id_and_unknown_ca_are_rejected(network) -> None:
    _, endpoint, identities = network
    proposal = _proposal(identities)
    signed = proposal_pb2.SignedProposal(proposal_bytes=proposal.proposal_bytes, signature=proposal.signature)
    with pytest.raises(grpc.RpcError, match="transaction id"):
        _raw_endorse(endpoint, "00" * 32, signed)
    outsider = DevCA("FedcoreMSP").issue("site-0")  # right MSP id and name, wrong CA
    with pytest.raises(FabricTransactionError, match="not issued by"):
        client(endpoint, outsider).submit("RecordEntries", "run-d", entries("site-0"))


def test_replayed_transaction_is_rejected(network) -> None:
    _, endpoint, identities = network
    proposal = _proposal(identities)
    signed = proposal_pb2.SignedProposal(proposal_bytes=proposal.proposal_bytes, signature=proposal.signature)
    _raw_endorse(endpoint, proposal.tx_id, signed)
    with pytest.raises(grpc.RpcError, match="duplicate"):
        _raw_endorse(endpoint, proposal.tx_id, signed)


def test_tls_connection(tmp_path: Path) -> None:
    gateway, endpoint, identities, ca_pem = start_fake_network("fedcore", "fedcore-ledger", ["server"], tls=True)
    try:
        secure = client(endpoint, identities["server"], tls_ca_pem=ca_pem, server_name="localhost")
        entry = json.dumps([{"round": 0, "kind": "spec", "writer": "server", "payloadSha256": DIGEST}])
        assert secure.submit("RecordEntries", "run-tls", entry).block_number >= 1
        with pytest.raises(FabricTransactionError):
            client(endpoint, identities["server"], timeout=3).evaluate("GetRunEntries", "run-tls")  # plaintext to a TLS port
    finally:
        gateway.stop()


def test_fabric_ledger_plugin_round_trip(tmp_path: Path) -> None:
    ledger = FabricLedger()
    ledger.open(tmp_path / "ledger" / "main-r0", ["site-0", "site-1"])
    ledger.append([LedgerRecord(kind="spec", round=0, writer="server", payload_sha256=DIGEST)])
    head = ledger.append(
        [LedgerRecord(kind="site-update", round=1, writer=f"site-{i}", payload_sha256=DIGEST) for i in range(2)]
        + [LedgerRecord(kind="aggregate", round=1, writer="server", payload_sha256=DIGEST)]
    )
    assert sorted(e["writer"] for e in ledger.read_entries(1)) == ["server", "site-0", "site-1"]
    summary = ledger.close()
    assert summary["transactions"] == 4 and summary["entries_on_chain"] == 4
    assert summary["consensus"].startswith("none: simulated Fabric gateway")
    assert summary["head"] == f"{head.sequence}:{head.entry_hash}"


NODE_CLIENT = CLIENT_DIR / "node_modules" / "@hyperledger" / "fabric-gateway"


@pytest.mark.skipif(not NODE_CLIENT.is_dir(), reason=f"reference client not installed: npm ci --prefix {CLIENT_DIR}")
@pytest.mark.parametrize("tamper", [False, True])
def test_official_node_client_against_the_fake(network, tmp_path: Path, tamper: bool) -> None:
    gateway, endpoint, identities = network
    identity = identities["site-1"]
    (tmp_path / "cert.pem").write_bytes(identity.certificate_pem)
    (tmp_path / "key.pem").write_bytes(private_key_pem(identity))
    command = ["node", str(CLIENT_DIR / "submit.js"), endpoint, "FedcoreMSP", str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"), "site-1"]
    if tamper:
        command.append("--tamper-signature")
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=CLIENT_DIR)
    if tamper:
        assert done.returncode == 3, done.stdout + done.stderr
        assert "PERMISSION_DENIED" in done.stdout or "access denied" in done.stdout
    else:
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["status"] == "VALID" and report["blockNumber"] >= 1
        assert report["entries"][0]["writer"] == "site-1"


@pytest.mark.slow
def test_a_fake_runs_report_says_simulated_wherever_it_says_fabric(tmp_path: Path) -> None:
    from fedcore.engine.runner import run_experiment
    from fedcore.spec import load_experiment

    spec = """
name: fake-ledger
seed: 1
data: {use: synthetic-ehr, settings: {sites: 2, patients_per_site: 100}}
training: {rounds: 1, local_epochs: 1, batch_size: 64}
ledger: {use: fabric}
execution: {progress: false, checkpoints: false}
"""
    run_dir = run_experiment(load_experiment(None, [], text=spec), out=tmp_path / "run", workers=1, progress=False)
    # "Fabric" (the network) only beside "simulated"; `fabric` alone is the plugin's name, as the spec says it.
    lines = [line for line in (run_dir / "report.md").read_text().splitlines() if "Fabric" in line]
    assert lines and all(line.count("simulated") >= line.replace("FakeFabricGateway", "").count("Fabric") for line in lines), lines


def test_fabric_up_without_binaries_fails_with_one_line(tmp_path: Path) -> None:
    import os
    import sys

    fedcore = str(Path(sys.executable).with_name("fedcore"))
    env = {**os.environ, "FEDCORE_FABRIC_BIN": str(tmp_path / "no-build")}
    done = subprocess.run([fedcore, "fabric", "up", "--dir", str(tmp_path / "net")], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Fabric binary 'peer' not found" in done.stderr and "fedcore fabric build" in done.stderr
    assert not (tmp_path / "net" / "orgs").exists()  # nothing half-written


def test_network_layout_bft_config_and_ccaas_package(tmp_path: Path) -> None:
    import hashlib
    import io
    import tarfile

    from fedcore.plugins.ledgers.fabric.network import bft_quorum, chaincode_package, configtx, endorsement_policy, organizations

    orgs = organizations(3, 17050)
    assert [o.participant for o in orgs] == ["server", "site-0", "site-1", "site-2"]
    assert len({p for o in orgs for p in (o.orderer_port, o.orderer_admin_port, o.peer_port, o.chaincode_port)}) == 16
    assert [bft_quorum(n) for n in (4, 7, 10)] == [3, 5, 7]
    assert endorsement_policy(orgs) == "AND('CoordinatorMSP.peer',OR('Site0MSP.peer','Site1MSP.peer','Site2MSP.peer'))"
    orderer = configtx(tmp_path, orgs)["Profiles"]["FedcoreBFT"]["Orderer"]
    assert orderer["OrdererType"] == "BFT" and [c["ID"] for c in orderer["ConsenterMapping"]] == [1, 2, 3, 4]
    package, package_id = chaincode_package(orgs[1], "fedcore-ledger_1.0")
    assert package_id == "fedcore-ledger_1.0:" + hashlib.sha256(package).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(package)) as outer:
        assert json.loads(outer.extractfile("metadata.json").read())["type"] == "ccaas"  # type: ignore[union-attr]
        with tarfile.open(fileobj=io.BytesIO(outer.extractfile("code.tar.gz").read())) as code:  # type: ignore[union-attr]
            assert json.loads(code.extractfile("connection.json").read())["address"] == "127.0.0.1:17066"  # type: ignore[union-attr]
