"""Deployment end to end: Flower's own SuperLink and SuperNodes as processes, TLS and node auth on.

* the shrunk paper spec deployed on 3 SuperNodes gives the simulation's metrics and the same
  update digests in order; every byte a site sends is checked for planted canaries; when run as
  root, the coordinator and each SuperNode live in their own network namespace (veth + bridge);
* a SuperNode killed mid-run with quorum 2 of 3: the run completes and says who took part;
* a SuperNode whose key is not registered is refused; a site with mismatched columns is named.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
import pytest
import yaml

pytest.importorskip("flwr", reason="the deploy extra (flwr) is not installed")

from fedcore.plugins.deploy.certs import FederationCerts, make_certs  # noqa: E402
from fedcore.plugins.deploy.demo import write_demo_sites  # noqa: E402
from fedcore.plugins.deploy.local import LocalFederation  # noqa: E402
from fedcore.plugins.deploy.processes import free_port, launch, supernode_command  # noqa: E402
from fedcore.plugins.deploy.site import statement  # noqa: E402
from fedcore.plugins.ledgers.keys import load_public_pem, verify_signature  # noqa: E402
from fedcore.plugins.datasets.synthetic import CATEGORICAL, CONTINUOUS, TARGET  # noqa: E402


pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

FEDCORE = str(Path(sys.executable).parent / "fedcore")
SITES = ["hospital-0", "hospital-1", "hospital-2"]
CANARY_FLOAT = 98765.4321
CANARY_TEXT = "CANARY-7f3e-do-not-leak"
COORD_IP = "10.77.0.1"

COMMON = """
seed: 2024
repeats: 1
model: {use: mlp, settings: {hidden: [128, 64, 32]}}
aggregator: {use: fedavg}
ledger: {use: sqlite-chain}
"""
DP = """
privacy:
  - use: gaussian
    settings: {level: record, epsilon: 1.0, delta: 1.0e-5, max_grad_norm: 1.0, accountant: prv}
"""


def training(rounds: int, extra: str = "") -> str:
    return f"training: {{rounds: {rounds}, local_epochs: 1, batch_size: 32, optimizer: adam, learning_rate: 0.001{extra}}}\n"


def deployed_spec(path: Path, name: str, body: str) -> Path:
    path.write_text(f"name: {name}\n{COMMON}data: {{use: site-tables}}\nexecution: {{reproducible_noise: true, progress: false}}\n{body}")
    return path


def simulated_spec(path: Path, sites_dir: Path, body: str) -> Path:
    files = {s: str(sites_dir / f"{s}.csv") for s in SITES}
    data = {
        "use": "ehr-csv",
        "settings": {"site_files": files, "target": TARGET, "continuous": list(CONTINUOUS), "categorical": list(CATEGORICAL),
                     "drop_columns": ["note"]},
    }
    path.write_text(
        f"name: simulated\n{COMMON}data: {json.dumps(data)}\n"
        "execution: {reproducible_noise: true, progress: false, engine: sequential, workers: 1}\n" + body
    )
    return path


def make_world(root: Path, hosts: list[str], patients: int = 250) -> tuple[FederationCerts, Path]:
    certs = make_certs(root / "certs", SITES, hosts)
    sites = root / "sites"
    write_demo_sites(sites, certs.root, len(SITES), patients, 2024)
    # Canaries at hospital-1: a unique value in a feature column, a free-text column the site drops.
    # Every site's table carries the note column (same columns everywhere); the site files drop it.
    for name in SITES:
        table = sites / f"{name}.csv"
        frame = pd.read_csv(table)
        frame["note"] = "routine"
        if name == "hospital-1":
            frame.loc[5, "glucose"] = CANARY_FLOAT
            frame.loc[7, "note"] = CANARY_TEXT
        frame.to_csv(table, index=False)
        config = yaml.safe_load((sites / f"{name}.yaml").read_text())
        config["data"]["drop_columns"] = ["note"]
        (sites / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return certs, sites


def run_cli(args: list[str], prefix: list[str] = (), timeout: float = 1500, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, FEDCORE, *args], capture_output=True, text=True, timeout=timeout, env=env)


def ledger_rows(run_dir: Path) -> list[tuple]:
    db = next((run_dir / "ledger").glob("*/ledger.sqlite"))
    with sqlite3.connect(db) as conn:
        return list(conn.execute("SELECT seq, round, kind, payload_sha256, metadata FROM entries ORDER BY seq"))


def rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]


# ------------------------------------------------------------ network namespaces


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextmanager
def namespaces(names: list[str]) -> Iterator[dict[str, tuple[str, str]]]:
    """One network namespace per name, joined by a bridge in a switch namespace; name -> (netns, ip)."""
    tag = f"fc{os.getpid() % 100000}"
    switch = f"{tag}-sw"
    made: list[str] = []
    out: dict[str, tuple[str, str]] = {}
    try:
        _ip("netns", "add", switch)
        made.append(switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        for i, name in enumerate(names):
            ns = f"{tag}-{i}"
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{i}", "netns", switch)
            _ip("-n", switch, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", switch, "link", "set", f"p{i}", "up")
            address = f"10.77.0.{1 if i == 0 else 10 + i}"
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            out[name] = (ns, address)
        yield out
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def can_use_netns() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root); this run uses loopback instead"
    if shutil.which("ip") is None:
        return "iproute2's 'ip' is not installed"
    return None


def rx_bytes(ns: str) -> int:
    return int(subprocess.run(["ip", "netns", "exec", ns, "cat", "/sys/class/net/eth0/statistics/rx_bytes"],
                              capture_output=True, text=True, timeout=30, check=True).stdout)


# ------------------------------------------------------------------------ tests


def test_deployed_run_equals_simulation_in_separate_namespaces(tmp_path: Path) -> None:
    reason = can_use_netns()
    if reason is not None:
        pytest.skip(reason)
    certs, sites = make_world(tmp_path, [COORD_IP])
    body = DP + training(2, ", round_timeout_s: 300")
    deploy = deployed_spec(tmp_path / "deploy.yaml", "deployed", body)
    audit = tmp_path / "audit"
    os.environ["FEDCORE_SITE_AUDIT_DIR"] = str(audit)  # inherited by the SuperNodes and their ClientApps
    try:
        with namespaces(["coordinator", *SITES]) as net:
            coord_ns = net["coordinator"][0]
            prefix = {name: ["ip", "netns", "exec", ns] for name, (ns, _) in net.items()}
            fed = LocalFederation(certs, tmp_path / "fed", host=COORD_IP, port=9092,
                                  prefixes=lambda who: prefix["coordinator" if who == "superlink" else who])
            try:
                fed.start_link()
                done = run_cli(["federation", "register", "--superlink", f"{COORD_IP}:9092", "--certs", str(certs.root)],
                               prefix["coordinator"], timeout=120)
                assert done.returncode == 0, done.stderr
                for site in SITES:
                    fed.start_node(site, sites / f"{site}.yaml")
                before = {s: rx_bytes(net[s][0]) for s in SITES}
                done = run_cli(["run", str(deploy), "--federation", f"{COORD_IP}:9092", "--certs", str(certs.root),
                                "--out", str(tmp_path / "deployed")], prefix["coordinator"])
                assert done.returncode == 0, done.stderr + (tmp_path / "deployed" / "coordinator.log").read_text()
                received = {s: rx_bytes(net[s][0]) - before[s] for s in SITES}
            finally:
                fed.stop()
        assert coord_ns
    finally:
        os.environ.pop("FEDCORE_SITE_AUDIT_DIR", None)
    # Traffic crossed each site's own interface: at least the two global models it received.
    model_bytes = 15427 * 4
    assert all(n > 2 * model_bytes for n in received.values()), received
    _check_same_as_simulation(tmp_path, sites, certs, body)
    _check_no_canary(audit)


def _check_same_as_simulation(tmp_path: Path, sites: Path, certs: FederationCerts, body: str) -> None:
    sim = run_cli(["run", str(simulated_spec(tmp_path / "sim.yaml", sites, body)), "--out", str(tmp_path / "simulated")])
    assert sim.returncode == 0, sim.stderr
    deployed, simulated = rounds(tmp_path / "deployed"), rounds(tmp_path / "simulated")
    assert [r["round"] for r in deployed] == [1, 2] == [r["round"] for r in simulated]
    for d, s in zip(deployed, simulated, strict=True):
        for split in ("validation", "test"):
            for metric in ("loss", "accuracy", "precision", "recall", "f1", "n"):
                assert d[split][metric] == pytest.approx(s[split][metric], rel=1e-9, abs=1e-12), (split, metric)
        assert d["train_loss"] == pytest.approx(s["train_loss"], rel=1e-9)
        assert d["privacy"][0]["epsilon"] == pytest.approx(s["privacy"][0]["epsilon"], rel=1e-12)
        assert d["sites"] == SITES and d["absent_sites"] == []
    # Both ledgers hold hiding commitments; each site's openings give the payloads under them.
    ours = _update_payloads(tmp_path / "deployed", sites.rglob("openings.jsonl"))
    theirs = _update_payloads(tmp_path / "simulated", (tmp_path / "simulated" / "sites").glob("*/openings/*/openings.jsonl"))
    assert ours == theirs and len(ours) == 6
    # Every site-update entry carries its site's signature over the commitment, which verifies with
    # the site's registered key.
    study = json.loads((tmp_path / "deployed" / "deployment.json").read_text())["study"]
    registry = certs.registry()
    for _, round_, _, committed, metadata in (r for r in ledger_rows(tmp_path / "deployed") if r[2] == "site-update"):
        meta = json.loads(metadata)
        site = meta["site"]
        message = statement(f"{study}-r0", "main", 0, round_, site, committed, meta["n_samples"])
        assert verify_signature(load_public_pem(registry[site]["signing_public_key"]), base64.b64decode(meta["site_signature"]), message)


def _update_payloads(run_dir: Path, opening_files: Iterable[Path]) -> list[tuple[int, str]]:
    """(round, SHA-256 of the update's canonical bytes) of each site-update entry of a run's ledger.

    The ledger holds hiding commitments, SHA-256(salt || bytes); each site keeps the opening
    (salt and bytes) in its own folder, from which the plain digest is recomputed.
    """
    payloads: dict[str, str] = {}
    for path in opening_files:
        for line in path.read_text().splitlines():
            opening = json.loads(line)
            if opening["kind"] == "site-update":
                payloads[opening["commitment"]] = hashlib.sha256((path.parent / opening["payload_file"]).read_bytes()).hexdigest()
    return [(r[1], payloads[r[3]]) for r in ledger_rows(run_dir) if r[2] == "site-update"]


def _check_no_canary(audit: Path) -> None:
    files = list(audit.glob("hospital-1-*.bin"))
    assert len(files) >= 5, files  # hello, summary, preprocess, 2 x (train, evaluate)
    sent = b"".join(f.read_bytes() for f in audit.glob("*.bin"))
    patterns = [CANARY_TEXT.encode(), repr(CANARY_FLOAT).encode(), str(CANARY_FLOAT).encode(), b"98765.43",
                np.float32(CANARY_FLOAT).tobytes(), np.float64(CANARY_FLOAT).tobytes()]
    for pattern in patterns:
        assert pattern not in sent, pattern


def test_dropout_with_quorum_unregistered_node_and_mismatched_columns(tmp_path: Path) -> None:
    certs, sites = make_world(tmp_path, [], patients=200)
    port = free_port()
    fed = LocalFederation(certs, tmp_path / "fed", port=port)
    try:
        fed.start(sites)
        address = fed.address
        # A site whose declared columns differ: named, exit 2, nothing trained.
        good = (sites / "hospital-1.yaml").read_text()
        bad = yaml.safe_load(good)
        bad["data"]["continuous"] = [c for c in bad["data"]["continuous"] if c != "sodium"]
        bad["data"]["categorical"] = [*bad["data"]["categorical"], "sodium"]
        (sites / "hospital-1.yaml").write_text(yaml.safe_dump(bad))
        # Two rounds: the second waits round_timeout_s for the killed site, then carries on without it.
        spec = deployed_spec(tmp_path / "q.yaml", "quorum", training(2, ", min_sites: 2, round_timeout_s: 100"))
        done = run_cli(["run", str(spec), "--federation", address, "--certs", str(certs.root), "--out", str(tmp_path / "mismatch")], timeout=900)
        assert done.returncode == 2, done.stderr
        assert "hospital-1" in done.stderr and "columns" in done.stderr and len(done.stderr.strip().splitlines()) <= 2
        assert not (tmp_path / "mismatch" / "rounds.jsonl").exists() or not rounds(tmp_path / "mismatch")
        (sites / "hospital-1.yaml").write_text(good)

        # Kill hospital-2's SuperNode (by pid) after round 1; quorum 2 of 3 carries the run.
        run_dir = tmp_path / "dropout"
        process = subprocess.Popen([FEDCORE, "run", str(spec), "--federation", address, "--certs", str(certs.root),
                                    "--out", str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 900
        log = run_dir / "coordinator.log"
        while time.monotonic() < deadline and not (log.exists() and "round 1 done" in log.read_text()):
            assert process.poll() is None, process.communicate()
            time.sleep(1)
        os.kill(fed.nodes["hospital-2"].pid, signal.SIGKILL)
        out, err = process.communicate(timeout=900)
        assert process.returncode == 0, err + log.read_text()
        records = rounds(run_dir)
        assert [r["round"] for r in records] == [1, 2]
        assert records[0]["sites"] == SITES and records[0]["absent_sites"] == []
        for record in records[1:]:
            assert record["sites"] == ["hospital-0", "hospital-1"] and record["absent_sites"] == ["hospital-2"]
            assert len(record["per_site"]) == 2 and len(record["update_bytes"]) == 2
        dropouts = [json.loads(r[4]) for r in ledger_rows(run_dir) if r[2] == "dropout"]
        assert [d["site"] for d in dropouts] == ["hospital-2"]

        # A SuperNode whose key the coordinator never registered is refused by the SuperLink.
        intruder = make_certs(tmp_path / "intruder", ["intruder"])
        shutil.copy(certs.ca, intruder.site("intruder") / "ca.crt")
        command = supernode_command(intruder.site("intruder"), address, sites / "hospital-0.yaml", "intruder",
                                    free_port(), retries=2, wait_s=10)
        node = launch("intruder", command, tmp_path / "intruder.log", tmp_path / "intruder-home")
        assert node.popen.wait(180) != 0
        assert "Failed to activate SuperNode" in (tmp_path / "intruder.log").read_text()
    finally:
        fed.stop()


def test_site_start_refuses_wrong_certs_and_unreachable_superlink(tmp_path: Path) -> None:
    certs, sites = make_world(tmp_path, [], patients=60)
    port = free_port()
    done = run_cli(["site", "start", "--superlink", f"127.0.0.1:{port}", "--certs", str(certs.site("hospital-0")),
                    "--data", str(sites / "hospital-0.yaml")], timeout=120)
    assert done.returncode == 1 and "site 'hospital-0': cannot reach the SuperLink" in done.stderr
    fed = LocalFederation(certs, tmp_path / "fed", port=port)
    try:
        fed.start_link()
        other = make_certs(tmp_path / "other", ["hospital-0"])
        done = run_cli(["site", "start", "--superlink", fed.address, "--certs", str(other.site("hospital-0")),
                        "--data", str(sites / "hospital-0.yaml")], timeout=120)
        assert done.returncode == 2 and "does not vouch for" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    finally:
        fed.stop()




def test_site_start_stops_its_supernode_when_its_executor_dies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from fedcore.cli import cli
    from fedcore.plugins.deploy import processes

    certs, sites = make_world(tmp_path, [], patients=60)
    fed = LocalFederation(certs, tmp_path / "fed", port=free_port())
    try:
        fed.start_link()
        # An executor that cannot start (exit 3): the real SuperNode would take messages nobody runs.
        monkeypatch.setattr(processes, "site_executor", lambda port, secret: lambda pid: [sys.executable, "-c", "raise SystemExit(3)"])
        started = time.monotonic()
        result = CliRunner().invoke(cli, ["site", "start", "--superlink", fed.address, "--certs", str(certs.site("hospital-0")),
                                          "--data", str(sites / "hospital-0.yaml")])
        assert result.exit_code == 1, result.output
        assert "site 'hospital-0': its ClientApp executor stopped (exit 3), so its SuperNode was stopped too" in result.stderr
        assert time.monotonic() - started < 60
    finally:
        fed.stop()


def test_coordinator_killed_mid_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    certs, sites = make_world(tmp_path, [], patients=150)
    fed = LocalFederation(certs, tmp_path / "fed", port=free_port())
    try:
        fed.start(sites)
        spec = deployed_spec(tmp_path / "r.yaml", "resumed", DP + training(3, ", round_timeout_s: 120"))
        run_dir = tmp_path / "run"
        args = ["run", str(spec), "--federation", fed.address, "--certs", str(certs.root)]
        process = subprocess.Popen([FEDCORE, *args, "--out", str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        log = run_dir / "coordinator.log"
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and not (log.exists() and "round 1 done" in log.read_text()):
            assert process.poll() is None, process.communicate()
            time.sleep(0.5)
        assert fed.superlink is not None
        # The coordinator's SuperLink, mid-run. Flower starts its SuperExec and the ServerApp in a session of their
        # own: they outlive it by seconds, and the stale ServerApp may finish the old run at the restarted SuperLink
        # while the sites fetch that run's last messages (fedcore.plugins.deploy.transport.drop_messages_of_stopped_runs).
        os.killpg(fed.superlink.pid, signal.SIGKILL)
        fed.superlink.popen.wait(30)
        _, err = process.communicate(timeout=300)
        assert process.returncode == 1 and "--resume" in err, err
        assert list((run_dir / "checkpoints" / "federated-main-r0").glob("round-*.pt"))
        fed.start_link()  # the same database: the SuperLink comes back with its registered nodes
        done = run_cli([*args, "--resume", str(run_dir)], timeout=1200)
        assert done.returncode == 0, done.stderr + log.read_text()
        assert "resumed after round" in log.read_text()
        assert [r["round"] for r in rounds(run_dir)] == [1, 2, 3]
        rows = ledger_rows(run_dir)
        assert [r[0] for r in rows] == list(range(len(rows)))  # the chain continues without a gap
        assert sum(1 for r in rows if r[2] == "spec") == 1  # the opening is written once
        assert sorted(set(r[1] for r in rows if r[2] == "aggregate")) == [1, 2, 3]
        verify = run_cli(["ledger", "verify", str(run_dir)], timeout=120)
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        fed.stop()


def test_secagg_plus_hides_every_update_that_the_control_run_shows(tmp_path: Path) -> None:
    certs, sites = make_world(tmp_path, [], patients=150)
    fed = LocalFederation(certs, tmp_path / "fed", port=free_port())
    try:
        fed.start(sites)
        base = training(1, ", round_timeout_s: 300")
        outcomes = {}
        for name, extra in (("control", ""), ("secure", "secure_aggregation: {use: secagg-plus, settings: {timeout_s: 300}}\n")):
            spec = deployed_spec(tmp_path / f"{name}.yaml", name, base + extra)
            done = run_cli(["run", str(spec), "--federation", fed.address, "--certs", str(certs.root), "--out", str(tmp_path / name)])
            log = (tmp_path / name / "coordinator.log").read_text() if (tmp_path / name / "coordinator.log").exists() else ""
            assert done.returncode == 0, done.stderr + log
            outcomes[name] = (rounds(tmp_path / name), log)
        control, secure = outcomes["control"], outcomes["secure"]
        # The control run: the coordinator held every site's individual update.
        assert control[1].count("individual tensor bytes") == 3 and "(0 individual" not in control[1]
        assert f"({15427 * 4} individual tensor bytes)" in control[1]
        # SecAgg+: it held none, only the sum; the model is the same up to SecAgg+'s quantization.
        assert secure[1].count("sent its update masked (0 individual tensor bytes)") == 3
        assert f"({15427 * 4} individual" not in secure[1]
        c, s = control[0][0], secure[0][0]
        assert s["sites"] == SITES
        assert abs(c["validation"]["loss"] - s["validation"]["loss"]) < 1e-3
        # The ledger still records every site's signed commitment to its update, in site order, as without
        # secure aggregation (reproducible mode: the same salts, so the same commitments).
        digests = lambda run: [r[3] for r in ledger_rows(tmp_path / run) if r[2] == "site-update"]  # noqa: E731
        assert digests("control") == digests("secure")
    finally:
        fed.stop()
