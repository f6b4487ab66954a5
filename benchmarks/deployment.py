"""Deployment over local SuperNodes against the sequential simulation of the same spec, in one run.

    .venv/bin/python benchmarks/deployment.py [--patients 50000] [--rounds 2] [--local-epochs 5] [--no-dp]
        [--skip-flower] [--insecure] [--trace-http]

The paper workload (3 sites x 50,000 rows, one repeat, 2 rounds; the paper's
MLP, Adam, batch 32, record-level DP at epsilon 1) is run three ways on this
machine: the sequential simulation (``ehr-csv`` over the sites' tables), the
deployment (Flower SuperLink + 3 SuperNodes with TLS and node auth, fedcore's
ServerApp/ClientApp), and a plain Flower app running the same loop (train +
evaluate messages, FedAvg, plain PyTorch training; no DP) so the reader sees
fedcore's overhead over Flower itself. Bytes are counted on each site's socket
(both directions) by a TCP relay in front of the SuperLink, over the last
round (steady state: broadcast, update, evaluation broadcast, metrics, and
Flower's own polling).

It also prints where the last round's train and evaluate messages spent their
time at the sites (median of the sites: Flower's polls and process start, the
imports, each step of fedcore's handler, the reply's way back; from the lines
the ClientApp and ServerApp write when ``FEDCORE_DEPLOY_TIMINGS`` is set) and
fedcore's own payload per message. With ``--insecure`` (plaintext, no SuperNode
authentication) the relays also count the bytes per Flower HTTP path; with
``--trace-http`` the SuperNodes log each request's plaintext bytes
(``benchmarks/http_trace/sitecustomize.py``), which counts them per path with TLS on.

Targets: deployed round <= 1.2 x the simulation's; bytes per site per round
<= 1.1 x twice the model's float32 size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

MODEL_FLOATS = 15427


def breakdown(folder: Path, sites: list[str], round_: int) -> list[str]:
    """Where the deployed round ``round_`` went: each message's timeline, median over the sites.

    Read from the timing lines the ClientApp and the ServerApp write when ``FEDCORE_DEPLOY_TIMINGS``
    is set (:func:`fedcore.plugins.deploy.wire.note_timing`).
    """
    import statistics

    def lines(who: str) -> list[dict]:
        path = folder / f"{who}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    coordinator = lines("coordinator")
    rows: list[str] = []
    for kind in ("train.fedcore", "evaluate"):
        phases: dict[str, list[float]] = {}
        payload: dict[str, list[int]] = {"to site": [], "from site": []}
        for site in sites:
            sent = [c for c in coordinator if c.get("site") == site and c["kind"] == kind and c.get("round") == round_]
            if not sent:
                continue
            c = sent[-1]
            mine = [t for t in lines(site) if abs(t["created"] - c["created"]) < 1e-3]
            if not mine:
                continue
            t = mine[-1]
            points = [("coordinator sent", c["sent"])]
            if t["process_start"]:
                points.append(("ClientApp process started (SuperNode + SuperExec polls)", t["process_start"]))
            points += [("python + flwr started, task pulled (0: forked by the warm executor)", t["import_start"]),
                       ("fedcore ClientApp imported (torch, fedcore; 0: forked warm)", t["imported"])]
            points += [(name, at) for name, at in t["marks"]]
            points.append(("reply at the coordinator (push, SuperNode + ServerApp polls)", c["received"]))
            for (_, before), (name, at) in zip(points, points[1:]):
                phases.setdefault(name, []).append(at - before)
            phases.setdefault("total", []).append(c["received"] - c["sent"])
            payload["to site"].append(c["bytes_out"])
            payload["from site"].append(c["bytes_in"])
        if not phases:
            continue
        rows.append(f"  {kind} message, round {round_} (median of {len(phases['total'])} sites; seconds):")
        rows += [f"    {statistics.median(v):7.2f}  {name}" for name, v in phases.items()]
        rows.append(f"    payload (fedcore's records): {int(statistics.median(payload['to site']))} bytes to the site, "
                    f"{int(statistics.median(payload['from site']))} bytes back")
    marks = {(c["kind"], c["round"]): c["time"] for c in coordinator if "time" in c}
    if ("round start", round_) in marks and ("checkpointed", round_ - 1) in marks:
        rows.append(f"  coordinator between rounds {round_ - 1} and {round_}: "
                    f"{marks[('round start', round_)] - marks[('checkpointed', round_ - 1)]:.2f} s; checkpoint of round {round_ - 1}: "
                    f"{marks[('checkpointed', round_ - 1)] - marks[('round end', round_ - 1)]:.2f} s")
    return rows


class HttpCounter:
    """Bytes per HTTP/1.1 path on one plaintext connection (``--insecure``): Flower's Fleet API is protobuf over HTTP.

    Requests and responses alternate on a connection (no pipelining), so a response's bytes
    go to the path of the oldest unanswered request. Handles Content-Length and chunked bodies.
    """

    def __init__(self, totals: dict[str, list[int]], lock: threading.Lock) -> None:
        self.totals, self.lock = totals, lock
        self.pending: list[str] = []
        self.state = {0: [b"", None, 0], 1: [b"", None, 0]}  # direction -> [buffer, path, body bytes left (-1: chunked)]

    def feed(self, direction: int, chunk: bytes) -> None:
        """``direction`` 0: site -> SuperLink (requests), 1: SuperLink -> site (responses)."""
        state = self.state[direction]
        state[0] += chunk
        while state[0]:
            buffer, path, left = state
            if path is None:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head, state[0] = buffer[: end + 4], buffer[end + 4 :]
                lines = head.decode("latin-1").split("\r\n")
                if direction == 0:
                    path = lines[0].split(" ")[1] if " " in lines[0] else "?"
                    self.pending.append(path)
                else:
                    path = self.pending.pop(0) if self.pending else "?"
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                left = -1 if headers.get("transfer-encoding", "").lower() == "chunked" else int(headers.get("content-length", "0"))
                state[1], state[2] = path, left
                self._count(path, direction, len(head))
                if left == 0:
                    state[1] = None
                continue
            if left > 0:
                take = min(left, len(buffer))
                self._count(path, direction, take)
                state[0], state[2] = buffer[take:], left - take
                if state[2] == 0:
                    state[1] = None
                continue
            # chunked: "<size hex>\r\n<data>\r\n", ending with a zero-size chunk and a blank line
            end = buffer.find(b"\r\n")
            if end < 0:
                return
            size = int(buffer[:end].split(b";")[0] or b"0", 16)
            need = end + 2 + size + 2
            if len(buffer) < need:
                return
            self._count(path, direction, need)
            state[0] = buffer[need:]
            if size == 0:
                state[1] = None

    def _count(self, path: str, direction: int, n: int) -> None:
        with self.lock:
            self.totals.setdefault(path, [0, 0])[direction] += n


class ByteRelay:
    """A TCP relay (127.0.0.1:port -> target) counting bytes in both directions; TLS passes through untouched.

    With ``http`` (a plaintext ``--insecure`` federation) it also counts bytes per HTTP path.
    """

    def __init__(self, target: tuple[str, int], http: bool = False) -> None:
        self.target = target
        self.http = http
        self.sent = 0  # site -> SuperLink
        self.received = 0  # SuperLink -> site
        self.connections = 0  # TCP connections the site opened (each a TLS handshake with TLS)
        self.paths: dict[str, list[int]] = {}  # HTTP path -> [site -> SuperLink, SuperLink -> site]
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def total(self) -> int:
        with self.lock:
            return self.sent + self.received

    def both(self) -> tuple[int, int, int]:
        """(site -> SuperLink bytes, SuperLink -> site bytes, connections opened) so far."""
        with self.lock:
            return self.sent, self.received, self.connections

    def by_path(self) -> dict[str, tuple[int, int]]:
        with self.lock:
            return {path: (up, down) for path, (up, down) in self.paths.items()}

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.connections += 1
            counter = HttpCounter(self.paths, self.lock) if self.http else None
            threading.Thread(target=self._pump, args=(conn, upstream, "sent", counter, 0), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, conn, "received", counter, 1), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, counter: str, http: HttpCounter | None, direction: int) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
                with self.lock:
                    setattr(self, counter, getattr(self, counter) + len(chunk))
                if http is not None:
                    http.feed(direction, chunk)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def watch_rounds(
    done: "callable[[int], bool]", relays: dict[str, ByteRelay], rounds: int, stop: threading.Event
) -> tuple[dict[int, dict[str, tuple[int, int, int]]], dict[int, dict[str, dict[str, tuple[int, int]]]], dict[int, float]]:
    """Relay totals (and per-path totals, ``--insecure``) at the moment each round is seen done (polled every 0.2 s),
    and that moment (epoch seconds)."""
    marks: dict[int, dict[str, tuple[int, int, int]]] = {}
    paths: dict[int, dict[str, dict[str, tuple[int, int]]]] = {}
    times: dict[int, float] = {}

    def run() -> None:
        while not stop.is_set() and len(marks) < rounds:
            for r in range(1, rounds + 1):
                if r not in marks and done(r):
                    marks[r] = {s: relay.both() for s, relay in relays.items()}
                    paths[r] = {s: relay.by_path() for s, relay in relays.items()}
                    times[r] = time.time()
            time.sleep(0.2)

    threading.Thread(target=run, daemon=True).start()
    return marks, paths, times


def traced_paths(folder: Path, ports: dict[str, int], start: float, end: float) -> dict[str, dict[str, list[int]]]:
    """Per site, per Flower path: [requests, plaintext bytes up, plaintext bytes down] that ended in (start, end]
    (from the lines ``benchmarks/http_trace/sitecustomize.py`` writes; the site's requests go to its relay's port)."""
    sites = {port: site for site, port in ports.items()}
    out: dict[str, dict[str, list[int]]] = {site: {} for site in ports}
    for path in folder.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            event = json.loads(line)
            if event["port"] in sites and start < event["t"] <= end:
                row = out[sites[event["port"]]].setdefault(event["path"], [0, 0, 0])
                row[0] += 1
                row[1] += event["up"]
                row[2] += event["down"]
    return out


def spec_text(name: str, data: str, rounds: int, epochs: int, dp: bool, extra: str = "") -> str:
    privacy = (
        "privacy:\n  - use: gaussian\n    settings: {level: record, epsilon: 1.0, delta: 1.0e-5, max_grad_norm: 1.0, accountant: prv}\n"
        if dp else ""
    )
    return (
        f"name: {name}\nseed: 2024\nrepeats: 1\ndata: {data}\nmodel: {{use: mlp, settings: {{hidden: [128, 64, 32]}}}}\n"
        f"training: {{rounds: {rounds}, local_epochs: {epochs}, batch_size: 32, optimizer: adam, learning_rate: 0.001, round_timeout_s: 3600}}\n"
        f"aggregator: {{use: fedavg}}\n{privacy}ledger: {{use: sqlite-chain}}\n"
        f"execution: {{reproducible_noise: true, progress: false, engine: sequential, workers: 1{extra}}}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=50000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--no-dp", action="store_true")
    parser.add_argument("--skip-flower", action="store_true", help="skip the plain Flower baseline")
    parser.add_argument("--insecure", action="store_true",
                        help="plaintext federation (no TLS, no SuperNode auth), so the relays also count bytes per HTTP path")
    parser.add_argument("--trace-http", action="store_true",
                        help="the SuperNodes log each request's plaintext bytes: bytes per Flower path with TLS on")
    args = parser.parse_args()

    from fedcore.plugins.deploy.certs import make_certs
    from fedcore.plugins.deploy.control import control_client, register_sites, run_status
    from fedcore.plugins.deploy.demo import write_demo_sites
    from fedcore.plugins.deploy.local import start_superlink, start_supernode
    from fedcore.plugins.deploy.processes import free_port
    from fedcore.plugins.deploy.study import run_study
    from fedcore.plugins.deploy.wire import TIMINGS_ENV
    from fedcore.engine.runner import run_experiment
    from fedcore.plugins.datasets.synthetic import CATEGORICAL, CONTINUOUS, TARGET
    from fedcore.spec import load_experiment

    sites = ["hospital-0", "hospital-1", "hospital-2"]
    work = Path(tempfile.mkdtemp(prefix="fedcore-deploy-bench-"))
    certs = make_certs(work / "certs", sites)
    write_demo_sites(work / "sites", certs.root, 3, args.patients, 2024)
    dp = not args.no_dp

    # 1. the sequential simulation
    files = {s: str(work / "sites" / f"{s}.csv") for s in sites}
    data = json.dumps({"use": "ehr-csv", "settings": {"site_files": files, "target": TARGET, "continuous": list(CONTINUOUS),
                                                       "categorical": list(CATEGORICAL)}})
    (work / "sim.yaml").write_text(spec_text("simulated", data, args.rounds, args.local_epochs, dp))
    start = time.perf_counter()
    sim_dir = run_experiment(load_experiment(work / "sim.yaml"), out=work / "simulated", workers=1, progress=False)
    sim_wall = time.perf_counter() - start
    sim_rounds = [json.loads(line) for line in (sim_dir / "rounds.jsonl").read_text().splitlines()]

    # 2. the deployment, each site's traffic through its own relay; the sites and the coordinator note timings
    os.environ[TIMINGS_ENV] = str(work / "timings")
    if args.trace_http:  # the Flower processes started from here on import benchmarks/http_trace/sitecustomize.py
        (work / "http-trace").mkdir()
        os.environ["FEDCORE_HTTP_TRACE"] = str(work / "http-trace")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent / "http_trace"), os.environ.get("PYTHONPATH")]))
    port = free_port()
    link = start_superlink(certs, work / "fed", "127.0.0.1", port, insecure=args.insecure)
    client = control_client(f"127.0.0.1:{port}", None if args.insecure else certs.ca)
    register_sites(client, certs)
    relays = {s: ByteRelay(("127.0.0.1", port), http=args.insecure) for s in sites}
    print("relay ports: " + ", ".join(f"{s} {relay.port}" for s, relay in relays.items()), flush=True)
    nodes = [start_supernode(certs, s, work / "sites" / f"{s}.yaml", f"127.0.0.1:{relays[s].port}", work / "fed", insecure=args.insecure)
             for s in sites]
    (work / "deploy.yaml").write_text(spec_text("deployed", "{use: site-tables}", args.rounds, args.local_epochs, dp))
    log = work / "deployed" / "coordinator.log"
    stop = threading.Event()
    marks, paths, times = watch_rounds(lambda r: log.exists() and f"round {r} done" in log.read_text(), relays, args.rounds, stop)
    start = time.perf_counter()
    try:
        run_dir = run_study(work / "deploy.yaml", (), f"127.0.0.1:{port}", certs.root, work / "deployed", insecure=args.insecure)
    finally:
        stop.set()
        for node in nodes:
            node.stop()
    deploy_wall = time.perf_counter() - start
    deploy_rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    last = args.rounds
    before = marks[last - 1] if last > 1 else {s: (0, 0, 0) for s in sites}
    deploy_dir = {s: tuple(now - then for now, then in zip(marks[last][s], before[s])) for s in sites}
    deploy_bytes = {s: deploy_dir[s][0] + deploy_dir[s][1] for s in sites}

    # 3. a plain Flower app with the same loop (no fedcore code in it)
    flower: dict[str, object] = {}
    if not args.skip_flower:
        from flwr.cli.build import build_fab_from_files
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab

        app = (Path(__file__).parent / "flower_baseline_app.py").read_bytes()
        pyproject = (
            b'[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n[project]\nname = "flower-baseline"\n'
            b'version = "1.0.0"\ndescription = "baseline"\nlicense = "Apache-2.0"\ndependencies = []\n[tool.flwr.app]\npublisher = "fedcore"\n'
            b'[tool.flwr.app.components]\nserverapp = "flower_baseline_app:server"\nclientapp = "flower_baseline_app:client"\n'
            b'[tool.flwr.app.config]\nsites = 3\nrounds = 2\nfeatures = 1\nclasses = 3\nout = ""\n'
        )
        fab = build_fab_from_files({"pyproject.toml": pyproject, "flower_baseline_app.py": app})[0]
        n_train = int(0.8 * args.patients)
        relays_b = {s: ByteRelay(("127.0.0.1", port)) for s in sites}
        from fedcore.plugins.deploy.processes import launch

        n_features = json.loads((run_dir / "summary.json").read_text())["data"]["features"]
        nodes_b = []
        for s in sites:
            command = ["flower-supernode", "--superlink", f"127.0.0.1:{relays_b[s].port}", "--port", str(free_port()),
                       *(["--insecure"] if args.insecure else ["--root-certificates", str(certs.ca.resolve()),
                                                               "--auth-supernode-private-key", str((certs.site(s) / "node.key").resolve())]),
                       "--node-config", f"rows={n_train} features={n_features} classes=3 epochs={args.local_epochs}"]
            nodes_b.append(launch(f"baseline {s}", command, work / "fed" / f"baseline-{s}.log", work / "fed" / f"baseline-{s}-home"))
        out = work / "flower-baseline.json"
        config = {"sites": 3, "rounds": args.rounds, "features": n_features, "classes": 3, "out": str(out)}
        response = client.StartRun(StartRunRequest(fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
                                                   override_config=user_config_to_proto(config)))
        stop_b = threading.Event()
        marks_b, _, _ = watch_rounds(lambda r: out.exists() and len(json.loads(out.read_text() or "[]")) >= r, relays_b, args.rounds, stop_b)
        start = time.perf_counter()
        while run_status(client, response.run_id)[0] != "finished" and time.perf_counter() - start < 7200:
            time.sleep(1)
        stop_b.set()
        for node in nodes_b:
            node.stop()
        flower = {"rounds": json.loads(out.read_text()) if out.exists() else [], "bytes": {}}
        if out.exists() and args.rounds in marks_b and (args.rounds - 1) in marks_b:
            flower["bytes"] = {s: sum(marks_b[args.rounds][s][:2]) - sum(marks_b[args.rounds - 1][s][:2]) for s in sites}
        else:
            flower["bytes"] = {s: relays_b[s].total() // args.rounds for s in sites}
    link.stop()

    model_bytes = 4 * MODEL_FLOATS
    sim_round = sum(r["round_seconds"] for r in sim_rounds) / len(sim_rounds)
    dep_round = sum(r["round_seconds"] for r in deploy_rounds) / len(deploy_rounds)
    print(f"workload: 3 sites x {args.patients} patients, {args.rounds} rounds x {args.local_epochs} local epochs, "
          f"{'record-level DP eps=1' if dp else 'no DP'}; work dir {work}")
    print(f"simulation (sequential): round {sim_round:.2f} s (train+aggregate, mean), wall {sim_wall:.1f} s")
    print(f"deployment (3 SuperNodes, {'plaintext' if args.insecure else 'TLS'}): round {dep_round:.2f} s, wall {deploy_wall:.1f} s "
          f"-> ratio {dep_round / sim_round:.2f} (target <= 1.2)")
    for s in sites:
        print(f"  {s}: {deploy_bytes[s]} bytes in round {args.rounds} on its socket ({deploy_dir[s][1]} to the site, "
              f"{deploy_dir[s][0]} from it; {deploy_dir[s][2]} connections opened) = {deploy_bytes[s] / (2 * model_bytes):.2f} x "
              f"twice the model ({2 * model_bytes} bytes; target <= 1.1)")
    if args.insecure:
        print(f"  bytes in round {args.rounds} by HTTP path (median of the sites; site -> SuperLink / SuperLink -> site):")
        before_paths = paths[last - 1] if last > 1 else {s: {} for s in sites}
        names = sorted({p for s in sites for p in paths[last][s]})
        for name in names:
            up = sorted(paths[last][s].get(name, (0, 0))[0] - before_paths[s].get(name, (0, 0))[0] for s in sites)[1]
            down = sorted(paths[last][s].get(name, (0, 0))[1] - before_paths[s].get(name, (0, 0))[1] for s in sites)[1]
            if up or down:
                print(f"    {up:8d} / {down:8d}  {name}")
    if args.trace_http and last > 1:
        traced = traced_paths(work / "http-trace", {s: relays[s].port for s in sites}, times[last - 1], times[last])
        print(f"  requests in round {args.rounds} by Flower path, plaintext bytes (median of the sites; "
              "site -> SuperLink / SuperLink -> site):")
        for name in sorted({p for rows in traced.values() for p in rows}):
            count, up, down = (sorted(traced[s].get(name, [0, 0, 0])[i] for s in sites)[1] for i in range(3))
            print(f"    {count:3d} requests {up:8d} / {down:8d}  {name}")
        plain = sorted(sum(up + down for _, up, down in traced[s].values()) for s in sites)[1]
        print(f"    plaintext {plain} of {sorted(deploy_bytes.values())[1]} bytes on the socket: "
              f"{sorted(deploy_bytes.values())[1] - plain} bytes of TLS (handshakes, records)")
    print("\n".join(breakdown(work / "timings", sites, args.rounds)))
    if flower:
        rounds_b = flower["rounds"]  # type: ignore[assignment]
        if rounds_b:
            b_round = sum(r["round_seconds"] for r in rounds_b) / len(rounds_b)  # type: ignore[index]
            print(f"plain Flower app, same loop (no DP): round {b_round:.2f} s -> fedcore deployed / Flower {dep_round / b_round:.2f}")
        for s, n in flower["bytes"].items():  # type: ignore[union-attr]
            print(f"  {s}: {n} bytes per round = {n / (2 * model_bytes):.2f} x twice the model")


if __name__ == "__main__":
    main()
