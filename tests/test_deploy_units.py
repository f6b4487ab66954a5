"""Deployment: certificates, message codec, site files, signatures, refusals (no Flower processes)."""

from __future__ import annotations

import os
import socket
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the deploy extra (flwr) is not installed")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from fedcore.plugins.deploy.certs import make_certs  # noqa: E402
from fedcore.plugins.deploy.processes import check_superlink, free_port  # noqa: E402
from fedcore.plugins.deploy.server import RemoteSite, refusal_reason  # noqa: E402
from fedcore.commitments import commitment  # noqa: E402
from fedcore.plugins.deploy.site import load_site_config, sign_statement, statement  # noqa: E402
from fedcore.plugins.deploy.study import check_deployable  # noqa: E402
from fedcore.plugins.deploy.wire import MalformedMessage, pack, parse_update, unpack, update_message  # noqa: E402
from fedcore.errors import DataError, PluginError, RunFailure, SpecError  # noqa: E402
from fedcore.spec import load_experiment  # noqa: E402
from fedcore.types import ClientUpdate, Weights  # noqa: E402

SITES = ["hospital-0", "hospital-1"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory):
    return make_certs(tmp_path_factory.mktemp("certs"), SITES, ["10.77.0.1", "coord.example"])


def _update(site: int = 0, round_: int = 1) -> ClientUpdate:
    delta = Weights(arrays={"w": np.arange(6, dtype=np.float32).reshape(2, 3) / 7, "b": np.ones(2, dtype=np.float32)})
    return ClientUpdate(site=site, round=round_, delta=delta, n_samples=40, local_steps=3, train_loss=0.5)


def test_certs_chain_to_the_ca_and_keep_private_keys_private(certs) -> None:
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coord.example" in names.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "10.77.0.1"}
    for private in [certs.server_key, certs.root / "ca.key", *(certs.site(s) / n for s in SITES for n in ("node.key", "signing.key"))]:
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    registry = certs.registry()
    assert sorted(registry) == SITES
    for name in SITES:  # the node key is an SSH EC key (Flower's format); the registry holds only public halves
        serialization.load_ssh_public_key((certs.site(name) / "node.pub").read_bytes())
        assert "PRIVATE" not in str(registry[name])


@pytest.mark.parametrize("names", [["a b"], ["server"], ["x", "x"], [""]])
def test_bad_site_names_are_refused(tmp_path: Path, names: list[str]) -> None:
    with pytest.raises(DataError):
        make_certs(tmp_path / "c", names)


def test_update_round_trips_with_its_digest() -> None:
    update = _update()
    decoded, meta = parse_update(update_message(update, {"signature": "x"}), "hospital-0", update.delta)
    assert decoded.digest() == update.digest() and decoded.n_samples == 40 and meta["signature"] == "x"


def test_malformed_messages_are_refused_naming_the_site() -> None:
    update = _update()
    other = Weights(arrays={"w": np.zeros((3, 2), dtype=np.float32), "b": np.ones(2, dtype=np.float32)})
    with pytest.raises(MalformedMessage, match="hospital-1.*do not match"):
        parse_update(update_message(update, {}), "hospital-1", other)
    nan = ClientUpdate(site=0, round=1, delta=update.delta.map(lambda a: a * np.nan), n_samples=4)
    with pytest.raises(MalformedMessage, match="hospital-1.*non-finite"):
        parse_update(update_message(nan, {}), "hospital-1", update.delta)
    with pytest.raises(MalformedMessage, match="hospital-1.*without a delta"):
        parse_update(pack({"site": 0}), "hospital-1", update.delta)
    with pytest.raises(MalformedMessage, match="hospital-1.*malformed update"):
        parse_update(update_message(update, {"n_samples": -3}), "hospital-1", update.delta)
    with pytest.raises(MalformedMessage, match="hospital-1' sent a .*above the 100-byte limit"):
        unpack(update_message(update, {}), "hospital-1", max_bytes=100)


def test_a_bad_site_signature_or_a_commitment_that_does_not_open_is_refused(certs) -> None:
    update = _update(site=1)
    key = serialization.load_pem_private_key((certs.site("hospital-1") / "signing.key").read_bytes(), None)
    wrong = serialization.load_pem_private_key((certs.site("hospital-0") / "signing.key").read_bytes(), None)
    pem = certs.registry()["hospital-1"]["signing_public_key"]
    site = RemoteSite("hospital-1", 1, 7)
    salt = bytes(range(16))
    committed = commitment(salt, update.canonical_bytes())

    def reply(signer, study: str = "s1", **changes: str) -> dict[str, str]:
        signature = sign_statement(signer, statement(study, "main", 0, 1, "hospital-1", committed, update.n_samples))
        return {"signature": signature, "commitment": committed, "salt": salt.hex(), **changes}

    def reason(meta: dict[str, str], which: ClientUpdate = update, to: RemoteSite = site, sealed: bool = False) -> str:
        return str(refusal_reason(pem, "s1", "main", 0, 1, to, which, meta, sealed))

    assert refusal_reason(pem, "s1", "main", 0, 1, site, update, reply(key)) is None
    assert "does not verify" in reason(reply(wrong))
    # a valid signature over another round or study is no signature for this one
    assert "does not verify" in reason(reply(key, study="s2"))
    assert "not base64" in reason(reply(key, signature="%%%"))
    assert "claims site" in reason(reply(key), to=RemoteSite("hospital-1", 0, 7))
    # the update the coordinator received is not the one the site committed to and signed
    tampered = ClientUpdate(site=1, round=1, delta=update.delta.scale(2.0), n_samples=40)
    assert "does not open" in reason(reply(key), which=tampered)
    assert "does not open" in reason(reply(key, salt=bytes(16).hex()))
    assert "not hex" in reason(reply(key, salt="zz"))
    # under secure aggregation the coordinator has no update and no salt: the signature alone is checked
    sealed = {k: v for k, v in reply(key).items() if k != "salt"}
    assert refusal_reason(pem, "s1", "main", 0, 1, site, update, sealed, sealed=True) is None
    assert "does not verify" in reason({**sealed, "signature": reply(wrong)["signature"]}, sealed=True)


def test_site_file_errors_are_one_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("site: h0\ndata: {path: t.csv, target: y}\n")
    with pytest.raises(DataError, match=r"site.yaml: signing_key: Field required"):
        load_site_config(path)
    path.write_text("site: h0\ndata: {path: t.csv, target: y, split: [0.5, 0.25, 0.25]}\nsigning_key: k\n")
    with pytest.raises(DataError, match="data.split belongs in the coordinator's spec"):
        load_site_config(path)
    path.write_text("site: [unclosed\n")
    with pytest.raises(DataError, match="not valid YAML"):
        load_site_config(path)
    with pytest.raises(DataError, match="cannot read the site file"):
        load_site_config(tmp_path / "missing.yaml")


def _spec(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(
        "name: t\nseed: 1\nrepeats: 1\ndata: {use: site-tables}\nmodel: {use: mlp}\n"
        "training: {rounds: 1, local_epochs: 1}\naggregator: {use: fedavg}\n" + extra
    )
    return path


def test_deployment_refuses_crypten_and_coordinator_read_data(tmp_path: Path) -> None:
    experiment = load_experiment(_spec(tmp_path, ""))
    check_deployable(experiment.spec)
    crypten = experiment.spec.model_copy(update={"secure_aggregation": experiment.spec.aggregator.model_copy(update={"use": "crypten"})})
    with pytest.raises(PluginError, match="crypten.*simulation-only.*secagg-plus"):
        check_deployable(crypten)
    synthetic = experiment.spec.model_copy(update={"data": experiment.spec.data.model_copy(update={"use": "synthetic-ehr"})})
    with pytest.raises(SpecError, match="read by the coordinator"):
        check_deployable(synthetic)


def test_site_tables_is_refused_in_simulation(tmp_path: Path) -> None:
    from fedcore.engine.runner import run_experiment

    with pytest.raises(DataError, match="site-tables.*--federation"):
        run_experiment(load_experiment(_spec(tmp_path, "")), out=tmp_path / "run", progress=False)


def test_unreachable_superlink_is_one_line_not_a_hang(certs) -> None:
    port = free_port()
    with pytest.raises(RunFailure, match=f"cannot reach the SuperLink at 127.0.0.1:{port}"):
        check_superlink(f"127.0.0.1:{port}", certs.ca, "site 'hospital-0'", timeout_s=5)


def test_wrong_ca_is_named(certs, tmp_path: Path) -> None:
    """A TLS server whose certificate another CA signed: the error names the CA file and the fix."""
    import ssl
    import threading

    other = make_certs(tmp_path / "other", ["x"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(other.server_cert, other.server_key)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        try:
            context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            pass
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(DataError, match="certificate this CA does not vouch for.*ca.crt"):
            check_superlink(f"127.0.0.1:{port}", certs.ca, "coordinator", timeout_s=5)
    finally:
        thread.join(5)
        server.close()


def test_the_cli_reports_bad_input_in_one_line(tmp_path: Path, certs) -> None:
    import subprocess

    fedcore = str(Path(sys.executable).parent / "fedcore")
    spec = _spec(tmp_path, "")
    port = free_port()
    done = subprocess.run(
        [fedcore, "run", str(spec), "--federation", f"127.0.0.1:{port}", "--certs", str(certs.root)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "cannot reach the SuperLink" in done.stderr
    done = subprocess.run([fedcore, "run", str(spec), "--federation", "nonsense"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--certs" in done.stderr


def test_a_site_keeps_its_dp_calibrations_on_its_disk_and_reads_them_back(tmp_path: Path) -> None:
    """Flower starts a process per message: a site reads its PRV calibration back instead of searching again."""
    import json

    from fedcore.plugins.privacy import accounting

    budget = {"target_epsilon": 1.0, "delta": 1e-5, "sample_rate": 0.02, "steps": 300, "accountant": "rdp", "eps_error": 0.01}
    accounting.calibrate_noise_multiplier.cache_clear()
    fresh = accounting.calibrate_noise_multiplier(**budget)
    assert not list(tmp_path.iterdir())  # outside the block nothing is kept on disk
    accounting.calibrate_noise_multiplier.cache_clear()
    with accounting.calibrations_kept_in(tmp_path):
        kept = accounting.calibrate_noise_multiplier(**budget, where="privacy[gaussian]")
    assert kept == fresh
    (file,) = tmp_path.glob("calibration-*.json")
    assert json.loads(file.read_text()) == {"noise_multiplier": fresh}
    # A new process (empty in-memory cache) reads the file: proven by a planted value coming back.
    file.write_text(json.dumps({"noise_multiplier": 7.5}))
    accounting.calibrate_noise_multiplier.cache_clear()
    with accounting.calibrations_kept_in(tmp_path):
        assert accounting.calibrate_noise_multiplier(**budget) == 7.5
        other = accounting.calibrate_noise_multiplier(**{**budget, "steps": 301})  # another budget: its own search and file
    assert other != 7.5 and len(list(tmp_path.glob("calibration-*.json"))) == 2
    accounting.calibrate_noise_multiplier.cache_clear()


def test_an_insecure_supernode_is_started_without_the_node_key_flower_refuses_without_tls(tmp_path: Path) -> None:
    from fedcore.plugins.deploy.processes import supernode_command

    secure = supernode_command(tmp_path, "127.0.0.1:9092", tmp_path / "site.yaml", "hospital-0", 9094)
    assert "--auth-supernode-private-key" in secure and "--root-certificates" in secure and "--insecure" not in secure
    insecure = supernode_command(tmp_path, "127.0.0.1:9092", tmp_path / "site.yaml", "hospital-0", 9094, insecure=True)
    assert "--insecure" in insecure and "--auth-supernode-private-key" not in insecure and "--root-certificates" not in insecure


def test_a_supernode_with_an_executor_secret_runs_in_process_isolation(tmp_path: Path) -> None:
    from fedcore.plugins.deploy.processes import site_executor, supernode_command, write_executor_secret

    secret = write_executor_secret(tmp_path / "home" / "superexec.secret")
    assert len(secret.read_bytes()) == 32 and secret.stat().st_mode & 0o077 == 0  # owner-only, random
    assert secret.read_bytes() != write_executor_secret(tmp_path / "other.secret").read_bytes()
    command = supernode_command(tmp_path, "127.0.0.1:9092", tmp_path / "site.yaml", "hospital-0", 9094, executor_secret=secret)
    assert command[command.index("--isolation") + 1] == "process"
    assert command[command.index("--superexec-auth-secret-file") + 1] == str(secret)
    assert "--isolation" not in supernode_command(tmp_path, "127.0.0.1:9092", tmp_path / "site.yaml", "hospital-0", 9094)
    executor = site_executor(9094, secret)(4242)
    assert executor[1:3] == ["-m", "fedcore.plugins.deploy.executor"]
    assert executor[executor.index("--runtime-api-address") + 1] == "127.0.0.1:9094"
    assert executor[executor.index("--supernode-pid") + 1] == "4242"


def test_the_warm_executor_forks_clientapp_tasks_only_and_reaps_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResultStatus

    from fedcore.plugins.deploy import executor as executor_mod

    # Flower's SuperExec loop and its executor factory, which the executor replaces, are where the pinned flwr has them.
    superexec = importlib.import_module(executor_mod.SUPEREXEC_MODULE)
    assert callable(superexec.get_executor) and callable(superexec.run_superexec)

    def child(spec: ExecutionSpec) -> None:  # fake task body (the real one is Flower's run_clientapp; e2e tests run it)
        (tmp_path / spec.token).write_text(str(os.getpid()))
        os._exit(0)

    monkeypatch.setattr(executor_mod, "_run_task", child)
    spec = dict(runtime_api_address="127.0.0.1:9094", insecure=True, root_certificates_path=None,
                runtime_dependency_install=False, parent_pid=os.getpid(), suppress_output=False, task_id=1)
    forks = executor_mod.ForkExecutor()
    refused = forks.launch(ExecutionSpec(task_type=TaskType.SERVER_APP, token="server", **spec))
    assert refused.status == LaunchResultStatus.FAILED and "ClientApps only" in str(refused.message)
    assert forks.launch(ExecutionSpec(task_type=TaskType.CLIENT_APP, token="client", **spec)).status == LaunchResultStatus.ACCEPTED
    deadline = time.monotonic() + 30
    while forks.children and time.monotonic() < deadline:
        forks.reconcile()
        time.sleep(0.05)
    assert not forks.children  # reaped
    assert int((tmp_path / "client").read_text()) != os.getpid() and not (tmp_path / "server").exists()


def test_a_supernode_whose_executor_died_is_not_alive(tmp_path: Path) -> None:
    from fedcore.plugins.deploy.processes import launch

    node = launch("node", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "node.log", tmp_path / "home",
                  companion=lambda pid: [sys.executable, "-c", f"import sys; sys.exit(0 if {pid} > 0 else 1)"])
    try:
        assert node.popen.poll() is None and len(node.companions) == 1
        node.companions[0].wait(30)
        assert not node.alive()  # the node runs, but nobody would run its messages
    finally:
        node.stop()
    assert node.popen.poll() is not None
