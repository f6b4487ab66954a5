"""The coordinator (ServerApp logic) and the site (ClientApp) in one process through a FAKE grid.

``FakeGrid`` is a fake of Flower's ``Grid``, for fast checks only: it hands each
message straight to fedcore's real ClientApp in this process (each site with
its own site file, state folder and signing key) instead of crossing a
SuperLink. It checks the coordinator's quorum, dropout, refusal and resume
logic in seconds; ``test_deploy_e2e.py`` runs the same code over Flower's real
SuperLink and SuperNodes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the deploy extra (flwr) is not installed")

from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedcore.plugins.deploy.certs import FederationCerts, make_certs  # noqa: E402
from fedcore.plugins.deploy.client import app as client_app  # noqa: E402
from fedcore.plugins.deploy.demo import write_demo_sites  # noqa: E402
from fedcore.plugins.deploy.server import Log, coordinate  # noqa: E402
from fedcore.plugins.deploy.wire import pack, unpack  # noqa: E402
from fedcore import releases  # noqa: E402
from fedcore.errors import RunFailure  # noqa: E402
from fedcore.types import ClientUpdate  # noqa: E402
from fedcore.spec import load_experiment, resolved_yaml  # noqa: E402

SITES = ["hospital-0", "hospital-1", "hospital-2"]


class FakeGrid:
    """FAKE Flower grid (tests only): delivers every message to the real ClientApp in this process."""

    def __init__(self, sites_dir: Path, drop: Callable[[str, Message], bool] = lambda *_: False,
                 tamper: Callable[[str, Message, Message], Message] = lambda _, __, reply: reply) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.names = {100 + i: name for i, name in enumerate(SITES)}
        self.contexts = {
            node: Context(1, node, {"data": str(sites_dir / f"{name}.yaml"), "site": name}, RecordDict(), {})
            for node, name in self.names.items()
        }
        self.drop, self.tamper = drop, tamper
        self.sent = 0
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.names)

    def create_message(self, content: RecordDict, kind: str, node: int, group: str) -> Message:
        return Message(content, dst_node_id=node, message_type=kind)

    def push_messages(self, messages: list[Message]) -> list[str]:
        """Each site answers at once; a dropped site never does (its reply stays missing)."""
        ids = []
        for message in messages:
            name = self.names[message.metadata.dst_node_id]
            self.sent += 1
            message_id = f"message-{self.sent}"
            message.metadata.__dict__["_message_id"] = message_id  # as Flower's grid does when it pushes
            ids.append(message_id)
            if self.drop(name, message):
                continue  # that site's SuperNode is gone: no reply within the timeout
            reply = self.tamper(name, message, client_app(message, self.contexts[message.metadata.dst_node_id]))
            self.replies[reply.metadata.reply_to_message_id] = reply
        return ids

    def pull_messages(self, message_ids: set[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[FederationCerts, Path]:
    root = tmp_path_factory.mktemp("fake")
    certs = make_certs(root / "certs", SITES)
    write_demo_sites(root / "sites", certs.root, 3, 120, 7)
    return certs, root / "sites"


def _run_dir(tmp_path: Path, training: str, extra: str = "") -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: fake\nseed: 3\nrepeats: 1\ndata: {use: site-tables}\nmodel: {use: mlp, settings: {hidden: [16]}}\n"
        f"training: {{local_epochs: 1, batch_size: 32, {training}}}\naggregator: {{use: fedavg}}\nledger: {{use: sqlite-chain}}\n"
        + extra
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "spec.resolved.yaml").write_text(resolved_yaml(load_experiment(spec).spec))
    (run_dir / "deployment.json").write_text(json.dumps({"study": tmp_path.name[-12:].replace("_", "-") + "x"}))
    return run_dir


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


def _ledger(run_dir: Path) -> list[tuple]:
    with sqlite3.connect(run_dir / "ledger" / "main-r0" / "ledger.sqlite") as conn:
        return list(conn.execute("SELECT seq, round, kind, metadata FROM entries ORDER BY seq"))


def _is_train(message: Message, from_round: int) -> bool:
    kind = message.metadata.message_type
    return kind in ("train.fedcore", "evaluate") and unpack(message.content, "c")[0].get("round", 0) >= from_round


def test_quorum_carries_a_round_without_a_dropped_site(world: tuple[FederationCerts, Path], tmp_path: Path) -> None:
    certs, sites = world
    run_dir = _run_dir(tmp_path, "rounds: 3, min_sites: 2, round_timeout_s: 1")
    grid = FakeGrid(sites, drop=lambda name, m: name == "hospital-2" and _is_train(m, 2))
    coordinate(grid, run_dir, certs, 10, Log(run_dir))  # type: ignore[arg-type]
    records = _rounds(run_dir)
    assert [r["sites"] for r in records] == [SITES, SITES[:2], SITES[:2]]
    assert [r["absent_sites"] for r in records] == [[], ["hospital-2"], ["hospital-2"]]
    dropouts = [json.loads(m) for _, r, kind, m in _ledger(run_dir) if kind == "dropout"]
    assert [(d["site"], d["reason"]) for d in dropouts] == [("hospital-2", "no update in time")] * 2
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 3


def test_below_quorum_stops_naming_the_missing_site_after_retries(world: tuple[FederationCerts, Path], tmp_path: Path) -> None:
    certs, sites = world
    run_dir = _run_dir(tmp_path, "rounds: 3, round_retries: 2, round_timeout_s: 1")
    asked: list[int] = []

    def drop(name: str, message: Message) -> bool:
        if name == "hospital-1" and message.metadata.message_type == "train.fedcore":
            asked.append(1)
            return True
        return False

    with pytest.raises(RunFailure, match=r"round 1: only 2 of 3 sites .*quorum 3.* after 3 tries.*missing: hospital-1"):
        coordinate(FakeGrid(sites, drop=drop), run_dir, certs, 10, Log(run_dir))  # type: ignore[arg-type]
    assert len(asked) == 3  # asked once, then retried twice
    assert not (run_dir / "rounds.jsonl").read_text().strip()
    assert [kind for _, _, kind, _ in _ledger(run_dir) if kind in ("site-update", "aggregate")] == []


def test_an_update_whose_signature_does_not_verify_is_refused(world: tuple[FederationCerts, Path], tmp_path: Path) -> None:
    certs, sites = world
    run_dir = _run_dir(tmp_path, "rounds: 2, min_sites: 2")

    def forge(name: str, message: Message, reply: Message) -> Message:
        if name != "hospital-1" or message.metadata.message_type != "train.fedcore":
            return reply
        meta, tensors = unpack(reply.content, name)
        meta["signature"] = meta["signature"][:-8] + "AAAAAAA="
        content = pack(meta, tensors)
        return Message(content, reply_to=message)

    coordinate(FakeGrid(sites, tamper=forge), run_dir, certs, 10, Log(run_dir))  # type: ignore[arg-type]
    assert all(r["absent_sites"] == ["hospital-1"] for r in _rounds(run_dir))
    refused = [json.loads(m) for _, _, kind, m in _ledger(run_dir) if kind == "dropout"]
    assert refused and all("signature" in d["reason"] and d["site"] == "hospital-1" for d in refused)
    assert "refused the update of site 'hospital-1'" in (run_dir / "coordinator.log").read_text()
    updates = [json.loads(m)["site"] for _, _, kind, m in _ledger(run_dir) if kind == "site-update"]
    assert "hospital-1" not in updates and len(updates) == 4


def test_resume_continues_after_the_last_checkpoint(world: tuple[FederationCerts, Path], tmp_path: Path) -> None:
    certs, sites = world
    run_dir = _run_dir(tmp_path, "rounds: 3")

    class Crash(BaseException):
        pass

    def crash(name: str, message: Message) -> bool:
        if _is_train(message, 2) and message.metadata.message_type == "evaluate":
            raise Crash()  # the coordinator dies after the sites trained round 2, before it completes
        return False

    with pytest.raises(Crash):
        coordinate(FakeGrid(sites, drop=crash), run_dir, certs, 10, Log(run_dir))  # type: ignore[arg-type]
    assert [r["round"] for r in _rounds(run_dir)] == [1]
    coordinate(FakeGrid(sites), run_dir, certs, 10, Log(run_dir), resume=True)  # type: ignore[arg-type]
    assert [r["round"] for r in _rounds(run_dir)] == [1, 2, 3]
    rows = _ledger(run_dir)
    assert [r[0] for r in rows] == list(range(len(rows)))
    assert sum(1 for r in rows if r[2] == "global-model") == 1  # the opening is not written twice
    # Round 2 was aggregated (and recorded) before the crash, during its evaluation, and redone after the
    # resume: the ledger says both happened, in order, and nothing that did not.
    assert [r[1] for r in rows if r[2] == "aggregate"] == [1, 2, 2, 3]
    assert [r[1] for r in rows if r[2] == "site-update"] == [1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3]
    assert "resumed after round 1" in (run_dir / "coordinator.log").read_text()


def test_a_round_lost_by_the_coordinator_is_replayed_by_the_sites_not_trained_twice(
    world: tuple[FederationCerts, Path], tmp_path: Path
) -> None:
    """Under record-level DP with a budget for 3 rounds, a coordinator crash after the sites released
    round 2 must not make them spend round 2 twice (that would refuse round 3): they resend it."""
    certs, sites = world
    dp = "privacy: [{use: gaussian, settings: {level: record, epsilon: 1.0, delta: 1.0e-5, max_grad_norm: 1.0}}]\n"
    run_dir = _run_dir(tmp_path, "rounds: 3", dp)
    released: dict[str, list[bytes]] = {}

    class Crash(BaseException):
        pass

    def crash(name: str, message: Message) -> bool:
        if _is_train(message, 2) and message.metadata.message_type == "evaluate":
            raise Crash()
        return False

    def keep(name: str, message: Message, reply: Message) -> Message:
        if message.metadata.message_type == "train.fedcore" and unpack(message.content, "c")[0]["round"] == 2:
            tensors = unpack(reply.content, "c")[1]
            released.setdefault(name, []).append(b"".join(tensors[k].to_bytes() for k in sorted(tensors)))
        return reply

    with pytest.raises(Crash):
        coordinate(FakeGrid(sites, drop=crash, tamper=keep), run_dir, certs, 10, Log(run_dir))  # type: ignore[arg-type]
    coordinate(FakeGrid(sites, tamper=keep), run_dir, certs, 10, Log(run_dir), resume=True)  # type: ignore[arg-type]
    assert [r["round"] for r in _rounds(run_dir)] == [1, 2, 3]
    assert sorted(released) == SITES
    assert all(len(v) == 2 and v[0] == v[1] for v in released.values())  # the same release, sent twice
    text = (run_dir / "summary.json").read_text()
    assert "stopped in round" not in text and "budget" not in text.lower()


def test_the_ledger_holds_hiding_commitments_that_each_site_alone_can_open(
    world: tuple[FederationCerts, Path], tmp_path: Path
) -> None:
    """A deployed site-update entry is SHA-256(salt || update), the salt kept in the site's own folder:
    the site's openings open every one of its entries; the plain digest of the update is on no entry."""
    from fedcore.plugins.ledgers.verify import verify_openings

    certs, sites = world
    run_dir = _run_dir(tmp_path, "rounds: 2")
    plain: list[str] = []

    def keep(name: str, message: Message, reply: Message) -> Message:
        if message.metadata.message_type == "train.fedcore":
            tensors = unpack(reply.content, "c")[1]
            meta = unpack(reply.content, "c")[0]
            assert len(bytes.fromhex(meta["salt"])) == 16 and meta["commitment"] != meta["salt"]
            # every field beside the update itself is declared (fedcore.releases)
            rest = {k: v for k, v in meta.items() if k not in ClientUpdate.model_fields}
            assert rest and releases.undeclared("DeployedTrainReply", rest) == []
            plain.append(hashlib.sha256(tensors["delta"].to_bytes()).hexdigest())  # the update's plain digest
        return reply

    coordinate(FakeGrid(sites, tamper=keep), run_dir, certs, 10, Log(run_dir))  # type: ignore[arg-type]
    study = json.loads((run_dir / "deployment.json").read_text())["study"]
    entries = [r for r in _ledger(run_dir) if r[2] == "site-update"]
    assert len(entries) == 6
    for name in SITES:
        opened, problem = verify_openings(run_dir, sites / "state" / name / f"{study}-r0")
        assert problem is None and opened == 2, problem
    with sqlite3.connect(run_dir / "ledger" / "main-r0" / "ledger.sqlite") as conn:
        committed = {row[0] for row in conn.execute("SELECT payload_sha256 FROM entries WHERE kind = 'site-update'")}
    assert len(committed) == 6 and len(plain) == 6 and not committed & set(plain)
    # an opening claimed for another site is refused: the entry names whose update it is
    forged = tmp_path / "forged"
    shutil.copytree(sites / "state" / SITES[0] / f"{study}-r0" / "openings", forged / "openings")
    lines = (forged / "openings" / "main-r0" / "openings.jsonl").read_text().replace(SITES[0], SITES[1])
    (forged / "openings" / "main-r0" / "openings.jsonl").write_text(lines)
    _, problem = verify_openings(run_dir, forged)
    assert problem is not None and "no entry of the ledger holds this commitment" in problem


def test_a_train_message_names_the_model_a_site_stored_when_it_evaluated_it(
    world: tuple[FederationCerts, Path], tmp_path: Path
) -> None:
    """Round 1 sends the initial model; after that each site trains from the model it evaluated, which
    the train message names by digest instead of sending again (one model each way per round)."""
    certs, sites = world
    run_dir = _run_dir(tmp_path, "rounds: 3")
    carried: list[tuple[int, str, bool]] = []

    def watch(name: str, message: Message, reply: Message) -> Message:
        if message.metadata.message_type == "train.fedcore":
            meta, tensors = unpack(message.content, "c")
            carried.append((meta["round"], name, "global" in tensors))
        return reply

    coordinate(FakeGrid(sites, tamper=watch), run_dir, certs, 10, Log(run_dir))  # type: ignore[arg-type]
    assert sorted(carried) == sorted((r, n, r == 1) for r in (1, 2, 3) for n in SITES)
    assert [r["round"] for r in _rounds(run_dir)] == [1, 2, 3]
    # a site that lost the model it stored is refused by name, never trains on something else
    study = json.loads((run_dir / "deployment.json").read_text())["study"]
    from fedcore.plugins.deploy.site import SiteStore, load_site_config

    store = SiteStore(load_site_config(sites / "hospital-0.yaml"), f"{study}-r0")
    with pytest.raises(Exception, match="does not hold"):
        store.global_model(None, "0" * 64)


def test_the_spec_s_evaluation_metrics_are_scored_at_each_deployed_site(
    world: tuple[FederationCerts, Path], tmp_path: Path
) -> None:
    certs, sites = world
    run_dir = _run_dir(tmp_path, "rounds: 1", "evaluation: {metrics: [auroc, balanced_accuracy], primary: auroc}\n")
    coordinate(FakeGrid(sites), run_dir, certs, 10, Log(run_dir))  # type: ignore[arg-type]
    record = _rounds(run_dir)[0]
    assert "auroc" in json.dumps(record["test"]) and "balanced_accuracy" in json.dumps(record["test"])
    assert all("auroc" in json.dumps(site["test"]) for site in record["per_site"])
