"""A local Hyperledger Fabric network with SmartBFT ordering, run as plain processes (no Docker).

Layout (docs/ledger.md, "The network"): every participant is an organization
with its own CA, one peer and one orderer: ``coordinator`` (MSP
``CoordinatorMSP``, participant ``server``) and ``site-<i>`` (``Site<i>MSP``,
participant ``site-<i>``). With three sites that is 4 SmartBFT orderers, which
tolerate one faulty orderer. One channel (``fedcore``) whose config says
``BFT``; fedcore's Node chaincode is installed, approved by every organization
and committed through ``peer lifecycle``, and runs as a chaincode-as-a-service
process per organization (``fabric-chaincode-node server``), reached through the
external builder in ``ccaas/bin`` (three shell scripts: detect, build,
release). A site's entries are endorsed by its own peer and the coordinator's
(:func:`endorsement_policy`).

Everything lives under one directory (``fedcore fabric up --dir``; default
``~/.local/state/fedcore/fabric-network``): crypto material, configs, ledgers,
logs, ``state.json`` (the processes started, by pid and start time) and
``network.json`` (what a client needs: endpoints, TLS roots, identities).
Fabric's binaries are built once from its Go module (:func:`build`) into
``~/.cache/fedcore/fabric/<version>/bin``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedcore.cache import cache_root
from fedcore.errors import FedcoreUserError

FABRIC_VERSION = "3.1.1"
# Fabric's module path has no /v3 suffix, so its v3 tags are not module versions; this is the
# pseudo-version of the v3.1.1 tag's commit (435a7f1a780a, 2025-05-10 20:00:36 UTC). The Go
# module proxy refuses v3.1.2 to v3.1.5 ("403: This module version is not available").
FABRIC_MODULE = "github.com/hyperledger/fabric"
FABRIC_MODULE_VERSION = "v1.4.0-rc1.0.20250510200036-435a7f1a780a"
BINARIES = ("peer", "orderer", "osnadmin", "configtxgen")
CHANNEL = "fedcore"
CHAINCODE = "fedcore-ledger"
CHAINCODE_VERSION = "1.0"
PACKAGE_DIR = Path(__file__).resolve().parent
CHAINCODE_DIR = PACKAGE_DIR / "chaincode"
CCAAS_BUILDER_DIR = PACKAGE_DIR / "ccaas"
DEFAULT_BASE_PORT = 17050
STEP_TIMEOUT = 60.0

# SmartBFT batching for the study's workload: a round is ~4 small transactions (one per writer,
# each < 4 KB). A block is cut when 10 requests are waiting or 100 ms after the first one, so a
# lone transaction waits at most 100 ms for its block and a round's transactions share one.
BATCH_MAX_COUNT = 10
BATCH_MAX_INTERVAL = "100ms"
BATCH_ABSOLUTE_MAX_BYTES = 10 * 1024 * 1024
# Failure detection: how soon followers complain about a silent leader (defaults are 20 s to 1 min).
SMARTBFT_TIMEOUTS = {
    "RequestForwardTimeout": "2s",
    "RequestComplainTimeout": "6s",
    "RequestAutoRemoveTimeout": "3m0s",
    "ViewChangeResendInterval": "2s",
    "ViewChangeTimeout": "10s",
    "LeaderHeartbeatTimeout": "6s",
    "LeaderHeartbeatCount": 10,
    "CollectTimeout": "1s",
}


def bin_dir() -> Path:
    """Where :func:`build` puts Fabric's binaries (``FEDCORE_FABRIC_BIN`` overrides)."""
    override = os.environ.get("FEDCORE_FABRIC_BIN")
    return Path(override) if override else cache_root() / "fabric" / FABRIC_VERSION / "bin"


def default_network_dir() -> Path:
    override = os.environ.get("FEDCORE_FABRIC_NETWORK")
    return Path(override) if override else Path.home() / ".local" / "state" / "fedcore" / "fabric-network"


class NetworkError(FedcoreUserError):
    """The local network cannot be built, started or reached; one line naming the process and its log."""


# --------------------------------------------------------------------------- build


def missing_binaries(directory: Path | None = None) -> list[str]:
    directory = directory or bin_dir()
    return [b for b in BINARIES if not (directory / b).is_file()]


def build(log: Any = print, force: bool = False) -> Path:
    """Build peer, orderer, osnadmin and configtxgen (CGO off) from Fabric's Go module, once per version."""
    target = bin_dir()
    if not force and not missing_binaries(target):
        log(f"Fabric {FABRIC_VERSION} binaries already built in {target}")
        return target
    go = shutil.which("go")
    if go is None:
        raise NetworkError("the Go toolchain is not on PATH", hint="install Go >= 1.24 (the machine image has it)")
    work = target.parent / "module"
    work.mkdir(parents=True, exist_ok=True)
    (work / "go.mod").write_text(f"module fedcore.local/fabricbuild\n\ngo 1.24\n\nrequire {FABRIC_MODULE} {FABRIC_MODULE_VERSION}\n")
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod -buildvcs=false"}
    partial = target.parent / "bin.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    started = time.monotonic()
    log(f"building Fabric {FABRIC_VERSION} ({FABRIC_MODULE}@{FABRIC_MODULE_VERSION}) into {target}: minutes on 2 cores")
    steps = [
        [go, "get", f"{FABRIC_MODULE}@{FABRIC_MODULE_VERSION}"],
        [go, "build", "-trimpath", "-ldflags", f"-X {FABRIC_MODULE}/common/metadata.Version={FABRIC_VERSION}",
         "-o", str(partial) + "/", *(f"{FABRIC_MODULE}/cmd/{b}" for b in BINARIES)],
    ]
    for command in steps:
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise NetworkError(f"`{' '.join(command[1:3])} ...` failed in {work}: {last}")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    log(f"built in {time.monotonic() - started:.0f} s")
    return target


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Org:
    """One organization: its CA, one peer, one orderer and one chaincode server, all on loopback."""

    index: int
    name: str
    msp_id: str
    participant: str
    base_port: int

    @property
    def orderer_port(self) -> int:
        return self.base_port + 10 * self.index

    @property
    def orderer_admin_port(self) -> int:
        return self.orderer_port + 1

    @property
    def orderer_operations_port(self) -> int:
        return self.orderer_port + 2

    @property
    def peer_port(self) -> int:
        return self.orderer_port + 3

    @property
    def peer_chaincode_port(self) -> int:
        return self.orderer_port + 4

    @property
    def peer_operations_port(self) -> int:
        return self.orderer_port + 5

    @property
    def chaincode_port(self) -> int:
        return self.orderer_port + 6

    @property
    def peer_name(self) -> str:
        return f"peer.{self.name}"

    @property
    def orderer_name(self) -> str:
        return f"orderer.{self.name}"


def organizations(sites: int, base_port: int) -> list[Org]:
    orgs = [Org(0, "coordinator", "CoordinatorMSP", "server", base_port)]
    orgs += [Org(i + 1, f"site-{i}", f"Site{i}MSP", f"site-{i}", base_port) for i in range(sites)]
    return orgs


def endorsement_policy(orgs: list[Org]) -> str:
    """The coordinator's peer and at least one hospital's peer (a site's client asks its own)."""
    sites = ",".join(f"'{o.msp_id}.peer'" for o in orgs[1:])
    return f"AND('{orgs[0].msp_id}.peer',OR({sites}))"


def bft_quorum(n: int) -> int:
    """SmartBFT's quorum for n orderers: ceil((n + f + 1) / 2) with f = (n - 1) // 3."""
    f = (n - 1) // 3
    return (n + f + 2) // 2


# --------------------------------------------------------------------------- crypto material


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _node_ous() -> dict[str, Any]:
    unit = {"Certificate": "cacerts/ca.pem"}
    return {
        "NodeOUs": {
            "Enable": True,
            "ClientOUIdentifier": {**unit, "OrganizationalUnitIdentifier": "client"},
            "PeerOUIdentifier": {**unit, "OrganizationalUnitIdentifier": "peer"},
            "AdminOUIdentifier": {**unit, "OrganizationalUnitIdentifier": "admin"},
            "OrdererOUIdentifier": {**unit, "OrganizationalUnitIdentifier": "orderer"},
        }
    }


def _write_msp(directory: Path, ca_pem: bytes, identity: Any | None) -> None:
    """An MSP folder: cacerts, tlscacerts, NodeOUs config and, for a signer, signcerts + keystore."""
    from fedcore.plugins.ledgers.fabric.devca import private_key_pem

    _write(directory / "cacerts" / "ca.pem", ca_pem)
    _write(directory / "tlscacerts" / "ca.pem", ca_pem)
    _write(directory / "config.yaml", yaml.safe_dump(_node_ous(), sort_keys=False).encode())
    if identity is not None:
        _write(directory / "signcerts" / "cert.pem", identity.certificate_pem)
        _write(directory / "keystore" / "key.pem", private_key_pem(identity), 0o600)


def _write_pair(directory: Path, identity: Any) -> None:
    from fedcore.plugins.ledgers.fabric.devca import private_key_pem

    _write(directory / "cert.pem", identity.certificate_pem)
    _write(directory / "key.pem", private_key_pem(identity), 0o600)


def generate_crypto(root: Path, orgs: list[Org]) -> None:
    """One CA per organization (NodeOUs); peer, orderer, admin and participant identities, TLS pairs."""
    from fedcore.plugins.ledgers.fabric.devca import DevCA

    hosts = ("127.0.0.1", "localhost")
    for org in orgs:
        ca = DevCA(org.msp_id, organization=org.name, days=3650)
        base = root / "orgs" / org.name
        _write(base / "ca" / "ca.pem", ca.certificate_pem)
        _write_msp(base / "msp", ca.certificate_pem, None)
        for role, common_name, unit in (
            ("peer", org.peer_name, "peer"),
            ("orderer", org.orderer_name, "orderer"),
            ("admin", f"admin.{org.name}", "admin"),
            (f"users/{org.participant}", org.participant, "client"),
        ):
            _write_msp(base / role / "msp", ca.certificate_pem, ca.issue(common_name, unit=unit, days=3650))
            tls_names = (*hosts, common_name) if role in ("peer", "orderer") else ()
            _write_pair(base / role / "tls", ca.issue(common_name, tls_names, days=3650))


# --------------------------------------------------------------------------- configs


def _org_policies(msp_id: str, orderer: bool = False) -> dict[str, Any]:
    rules = {
        "Readers": f"OR('{msp_id}.member')",
        "Writers": f"OR('{msp_id}.member')",
        "Admins": f"OR('{msp_id}.admin')",
    }
    if not orderer:
        rules["Endorsement"] = f"OR('{msp_id}.peer')"
    return {k: {"Type": "Signature", "Rule": v} for k, v in rules.items()}


def _implicit(rules: dict[str, str]) -> dict[str, Any]:
    return {k: {"Type": "ImplicitMeta", "Rule": v} for k, v in rules.items()}


def configtx(root: Path, orgs: list[Org]) -> dict[str, Any]:
    """configtx.yaml for one application channel ordered by SmartBFT (Fabric 3: no system channel)."""
    def org_entry(org: Org, orderer: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "Name": org.msp_id,
            "ID": org.msp_id,
            "MSPDir": str(root / "orgs" / org.name / "msp"),
            "Policies": _org_policies(org.msp_id, orderer),
        }
        if orderer:
            entry["OrdererEndpoints"] = [f"127.0.0.1:{org.orderer_port}"]
        else:
            entry["AnchorPeers"] = [{"Host": "127.0.0.1", "Port": org.peer_port}]
        return entry

    consenters = [
        {
            "ID": org.index + 1,
            "Host": "127.0.0.1",
            "Port": org.orderer_port,
            "MSPID": org.msp_id,
            "Identity": str(root / "orgs" / org.name / "orderer" / "msp" / "signcerts" / "cert.pem"),
            "ClientTLSCert": str(root / "orgs" / org.name / "orderer" / "tls" / "cert.pem"),
            "ServerTLSCert": str(root / "orgs" / org.name / "orderer" / "tls" / "cert.pem"),
        }
        for org in orgs
    ]
    smartbft = {
        "RequestBatchMaxInterval": BATCH_MAX_INTERVAL,
        "IncomingMessageBufferSize": 200,
        "RequestPoolSize": 100000,
        "SyncOnStart": True,
        "SpeedUpViewChange": False,
        **SMARTBFT_TIMEOUTS,
    }
    profile = {
        "Policies": _implicit({"Readers": "ANY Readers", "Writers": "ANY Writers", "Admins": "MAJORITY Admins"}),
        "Capabilities": {"V3_0": True},
        "Orderer": {
            "OrdererType": "BFT",
            "BatchTimeout": "1s",  # not used by SmartBFT (RequestBatchMaxInterval is); required by the schema
            "BatchSize": {
                "MaxMessageCount": BATCH_MAX_COUNT,
                "AbsoluteMaxBytes": BATCH_ABSOLUTE_MAX_BYTES,
                "PreferredMaxBytes": 2 * 1024 * 1024,
            },
            "ConsenterMapping": consenters,
            "SmartBFT": smartbft,
            "Organizations": [org_entry(o, True) for o in orgs],
            "Policies": _implicit(
                {"Readers": "ANY Readers", "Writers": "ANY Writers", "Admins": "MAJORITY Admins", "BlockValidation": "ANY Writers"}
            ),
            "Capabilities": {"V2_0": True},
        },
        "Application": {
            "Organizations": [org_entry(o, False) for o in orgs],
            "Policies": _implicit(
                {
                    "Readers": "ANY Readers",
                    "Writers": "ANY Writers",
                    "Admins": "MAJORITY Admins",
                    "LifecycleEndorsement": "MAJORITY Endorsement",
                    "Endorsement": "MAJORITY Endorsement",
                }
            ),
            "Capabilities": {"V2_5": True},
        },
    }
    return {"Profiles": {"FedcoreBFT": profile}}


def core_yaml(root: Path, org: Org, orgs: list[Org]) -> dict[str, Any]:
    """The peer's core.yaml: TLS with client authentication, gateway on, CCaaS builder, goleveldb."""
    base = root / "orgs" / org.name / "peer"
    address = f"127.0.0.1:{org.peer_port}"
    return {
        "peer": {
            "id": org.peer_name,
            "networkId": "fedcore",
            "listenAddress": address,
            "address": address,
            "chaincodeListenAddress": f"127.0.0.1:{org.peer_chaincode_port}",
            "addressAutoDetect": False,
            "gateway": {"enabled": True, "endorsementTimeout": "30s", "broadcastTimeout": "30s", "dialTimeout": "10s"},
            "keepalive": {
                "interval": "7200s", "timeout": "20s", "minInterval": "60s",
                "client": {"interval": "60s", "timeout": "20s"},
                "deliveryClient": {"interval": "60s", "timeout": "20s"},
            },
            "gossip": {
                "bootstrap": address,
                "endpoint": address,
                "externalEndpoint": address,
                "useLeaderElection": False,
                "orgLeader": True,
                "membershipTrackerInterval": "5s",
                "maxBlockCountToStore": 10,
                "maxPropagationBurstLatency": "10ms",
                "maxPropagationBurstSize": 10,
                "propagateIterations": 1,
                "propagatePeerNum": 3,
                "pullInterval": "4s",
                "pullPeerNum": 3,
                "requestStateInfoInterval": "4s",
                "publishStateInfoInterval": "4s",
                "publishCertPeriod": "10s",
                "skipBlockVerification": False,
                "dialTimeout": "3s",
                "connTimeout": "2s",
                "recvBuffSize": 20,
                "sendBuffSize": 200,
                "digestWaitTime": "1s",
                "requestWaitTime": "1500ms",
                "responseWaitTime": "2s",
                "aliveTimeInterval": "2s",
                "aliveExpirationTimeout": "25s",
                "reconnectInterval": "5s",
                "maxConnectionAttempts": 120,
                "msgExpirationFactor": 20,
                "election": {
                    "startupGracePeriod": "15s", "membershipSampleInterval": "1s",
                    "leaderAliveThreshold": "10s", "leaderElectionDuration": "5s",
                },
                "pvtData": {
                    "pullRetryThreshold": "60s", "transientstoreMaxBlockRetention": 20000, "pushAckTimeout": "3s",
                    "btlPullMargin": 10, "reconcileBatchSize": 10, "reconcileSleepInterval": "1m",
                    "reconciliationEnabled": True, "skipPullingInvalidTransactionsDuringCommit": False,
                    "implicitCollectionDisseminationPolicy": {"requiredPeerCount": 0, "maxPeerCount": 1},
                },
                "state": {"enabled": False, "checkInterval": "10s", "responseTimeout": "3s", "batchSize": 10,
                          "blockBufferSize": 20, "maxRetries": 3},
            },
            "tls": {
                "enabled": True,
                "clientAuthRequired": True,
                "cert": {"file": str(base / "tls" / "cert.pem")},
                "key": {"file": str(base / "tls" / "key.pem")},
                "rootcert": {"file": str(root / "orgs" / org.name / "ca" / "ca.pem")},
                "clientRootCAs": {"files": [str(root / "orgs" / o.name / "ca" / "ca.pem") for o in orgs]},
                "clientCert": {"file": str(base / "tls" / "cert.pem")},
                "clientKey": {"file": str(base / "tls" / "key.pem")},
            },
            "authentication": {"timewindow": "15m"},
            "fileSystemPath": str(root / "data" / org.peer_name),
            "BCCSP": {"Default": "SW", "SW": {"Hash": "SHA2", "Security": 256, "FileKeyStore": {"KeyStore": None}}},
            "mspConfigPath": str(base / "msp"),
            "localMspId": org.msp_id,
            "localMspType": "bccsp",
            "client": {"connTimeout": "3s"},
            "deliveryclient": {
                "blockGossipEnabled": False,
                "reconnectTotalTimeThreshold": "3600s",
                "connTimeout": "3s",
                "reConnectBackoffThreshold": "10s",
                "blockCensorshipTimeoutKey": "30s",
                "minimalReconnectInterval": "100ms",
                "policy": "cluster",
            },
            "profile": {"enabled": False},
            "handlers": {
                "authFilters": [{"name": "DefaultAuth"}, {"name": "ExpirationCheck"}, {"name": "TimeWindowCheck"}],
                "decorators": [{"name": "DefaultDecorator"}],
                "endorsers": {"escc": {"name": "DefaultEndorsement"}},
                "validators": {"vscc": {"name": "DefaultValidation"}},
            },
            "discovery": {
                "enabled": True, "authCacheEnabled": True, "authCacheMaxSize": 1000,
                "authCachePurgeRetentionRatio": 0.75, "orgMembersAllowedAccess": False,
            },
            "limits": {"concurrency": {"endorserService": 2500, "deliverService": 2500, "gatewayService": 500}},
            "maxRecvMsgSize": 104857600,
            "maxSendMsgSize": 104857600,
        },
        # No Docker here: an empty endpoint turns the Docker builder off; chaincode runs as a service.
        "vm": {"endpoint": ""},
        "chaincode": {
            "externalBuilders": [{"name": "ccaas", "path": str(CCAAS_BUILDER_DIR), "propagateEnvironment": []}],
            "installTimeout": "60s",
            "startuptimeout": "60s",
            "executetimeout": "30s",
            "mode": "net",
            "keepalive": 0,
            "system": {"_lifecycle": "enable", "cscc": "enable", "lscc": "enable", "qscc": "enable"},
            "logging": {"level": "info", "shim": "warning", "format": "%{time:15:04:05.000} [%{module}] %{level:.4s} %{message}"},
            "runtimeParams": {"useWriteBatch": True, "maxSizeWriteBatch": 1000, "useGetMultipleKeys": True,
                              "maxSizeGetMultipleKeys": 1000},
        },
        "ledger": {
            "state": {"stateDatabase": "goleveldb", "totalQueryLimit": 100000},
            "history": {"enableHistoryDatabase": False},
            "pvtdataStore": {
                "collElgProcMaxDbBatchSize": 5000, "collElgProcDbBatchesInterval": 1000,
                "deprioritizedDataReconcilerInterval": "60m", "purgeInterval": 100, "purgedKeyAuditLogging": True,
            },
            "snapshots": {"rootDir": str(root / "data" / org.peer_name / "snapshots")},
        },
        "operations": {"listenAddress": f"127.0.0.1:{org.peer_operations_port}", "tls": {"enabled": False}},
        "metrics": {"provider": "disabled"},
    }


def orderer_yaml(root: Path, org: Org, orgs: list[Org]) -> dict[str, Any]:
    """orderer.yaml: TLS on the client/cluster listener, mutual TLS on the admin (osnadmin) endpoint."""
    base = root / "orgs" / org.name / "orderer"
    cas = [str(root / "orgs" / o.name / "ca" / "ca.pem") for o in orgs]
    tls = {"Certificate": str(base / "tls" / "cert.pem"), "PrivateKey": str(base / "tls" / "key.pem")}
    return {
        "General": {
            "ListenAddress": "127.0.0.1",
            "ListenPort": org.orderer_port,
            "TLS": {"Enabled": True, **tls, "RootCAs": cas, "ClientAuthRequired": False, "ClientRootCAs": cas},
            "Keepalive": {"ServerMinInterval": "60s", "ServerInterval": "7200s", "ServerTimeout": "20s"},
            "Backoff": {"BaseDelay": "200ms", "Multiplier": 1.6, "MaxDelay": "5s"},
            "MaxRecvMsgSize": 104857600,
            "MaxSendMsgSize": 104857600,
            "Cluster": {
                "SendBufferSize": 100,
                "ClientCertificate": tls["Certificate"],
                "ClientPrivateKey": tls["PrivateKey"],
            },
            "BootstrapMethod": "none",
            "LocalMSPDir": str(base / "msp"),
            "LocalMSPID": org.msp_id,
            "BCCSP": {"Default": "SW", "SW": {"Hash": "SHA2", "Security": 256, "FileKeyStore": {"KeyStore": None}}},
            "Authentication": {"TimeWindow": "15m"},
        },
        "FileLedger": {"Location": str(root / "data" / org.orderer_name)},
        "Operations": {"ListenAddress": f"127.0.0.1:{org.orderer_operations_port}", "TLS": {"Enabled": False}},
        "Metrics": {"Provider": "disabled"},
        "Admin": {
            "ListenAddress": f"127.0.0.1:{org.orderer_admin_port}",
            "TLS": {"Enabled": True, **tls, "ClientAuthRequired": True, "ClientRootCAs": cas},
        },
        "ChannelParticipation": {"Enabled": True, "MaxRequestBodySize": "1 MB"},
        "Consensus": {"WALDir": str(root / "data" / org.orderer_name / "wal"),
                      "SnapDir": str(root / "data" / org.orderer_name / "snap")},
    }


def chaincode_package(org: Org, label: str) -> tuple[bytes, str]:
    """A CCaaS chaincode package (metadata.json + code.tar.gz with connection.json) and its package id."""
    def tar(files: dict[str, bytes]) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w:gz") as archive:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                archive.addfile(info, io.BytesIO(data))
        return out.getvalue()

    connection = {"address": f"127.0.0.1:{org.chaincode_port}", "dial_timeout": "10s", "tls_required": False}
    code = tar({"connection.json": json.dumps(connection).encode()})
    package = tar({"metadata.json": json.dumps({"type": "ccaas", "label": label}).encode(), "code.tar.gz": code})
    return package, f"{label}:{hashlib.sha256(package).hexdigest()}"


# --------------------------------------------------------------------------- processes


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(entry: dict[str, Any]) -> bool:
    ticks = _start_ticks(int(entry["pid"]))
    if ticks is None or ticks != entry.get("start_ticks"):
        return False
    try:
        state = Path(f"/proc/{entry['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _port_open(port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _last_line(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


class LocalNetwork:
    """The network under ``root``: generate it, start and stop its processes, say what runs."""

    def __init__(
        self, root: Path | None = None, sites: int = 3, base_port: int = DEFAULT_BASE_PORT, keep_layout: bool = True
    ) -> None:
        """``keep_layout``: an existing network keeps its number of sites and ports (not when recreating it)."""
        self.root = Path(root or default_network_dir()).resolve()
        profile = self.profile()
        if profile is not None and keep_layout:
            sites, base_port = len(profile["organizations"]) - 1, int(profile["base_port"])
        if sites < 1:
            raise NetworkError(f"a network needs at least one site, got {sites}", where="--sites")
        self.orgs = organizations(sites, base_port)
        self.base_port = base_port

    # --- files
    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def profile_file(self) -> Path:
        return self.root / "network.json"

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def profile(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.root / "network.json").read_text())
        except (OSError, ValueError):
            return None

    def _state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {"processes": {}}

    def _save_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        tmp.replace(self.state_file)

    @contextlib.contextmanager
    def lock(self, timeout: float = 300.0) -> Iterator[None]:
        """An exclusive lock on the network directory (``fcntl.flock``), waited for at most ``timeout`` seconds."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("w") as handle:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise NetworkError(f"{self.root} stayed locked for {timeout:.0f} s by another fedcore process") from None
                    time.sleep(0.2)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # --- process control
    def running(self) -> dict[str, dict[str, Any]]:
        return {n: e for n, e in self._state()["processes"].items() if _alive(e)}

    def node_names(self) -> list[str]:
        names = [o.orderer_name for o in self.orgs] + [o.peer_name for o in self.orgs]
        return names + [f"chaincode.{o.name}" for o in self.orgs]

    def _binary(self, name: str) -> str:
        path = bin_dir() / name
        if not path.is_file():
            raise NetworkError(f"Fabric binary '{name}' not found in {bin_dir()}",
                               hint="build them once with `fedcore fabric build`")
        return str(path)

    def _command(self, name: str) -> tuple[list[str], dict[str, str], Path, list[int]]:
        """Command line, environment, working directory and ports of node ``name``."""
        org = next(o for o in self.orgs if name.endswith("." + o.name))
        config = self.root / "config" / name
        env = {**os.environ, "FABRIC_CFG_PATH": str(config), "FABRIC_LOGGING_SPEC": "info"}
        if name.startswith("orderer."):
            return [self._binary("orderer")], env, config, [org.orderer_port, org.orderer_admin_port]
        if name.startswith("peer."):
            return [self._binary("peer"), "node", "start"], env, config, [org.peer_port]
        shim = CHAINCODE_DIR / "node_modules" / ".bin" / "fabric-chaincode-node"
        if not shim.exists():
            raise NetworkError(f"the chaincode's node modules are missing ({shim})",
                               hint=f"run `npm ci --prefix {CHAINCODE_DIR}`")
        package_id = (self.root / "chaincode" / f"{org.name}.id").read_text().strip()
        command = [str(shim), "server", "--chaincode-address", f"127.0.0.1:{org.chaincode_port}",
                   "--chaincode-id", package_id, "--module-path", str(CHAINCODE_DIR)]
        return command, {**os.environ, "CORE_CHAINCODE_LOGGING_LEVEL": "info"}, CHAINCODE_DIR, [org.chaincode_port]

    def start_node(self, name: str, timeout: float = STEP_TIMEOUT) -> None:
        """Start node ``name`` (e.g. ``orderer.site-2``) and wait until it listens; one-line error if not."""
        if name not in self.node_names():
            raise NetworkError(f"no node '{name}' in this network", hint=f"one of: {', '.join(self.node_names())}")
        state = self._state()
        if name in state["processes"] and _alive(state["processes"][name]):
            return
        command, env, cwd, ports = self._command(name)
        busy = [p for p in ports if not _port_free(p)]
        if busy:
            raise NetworkError(f"cannot start {name}: port {busy[0]} on 127.0.0.1 is in use",
                               hint=f"stop what listens there, or `fedcore fabric up --base-port N` (log: {self.log(name)})")
        self.log(name).parent.mkdir(parents=True, exist_ok=True)
        with self.log(name).open("ab") as out:
            process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        state["processes"][name] = {"pid": process.pid, "start_ticks": _start_ticks(process.pid), "ports": ports,
                                    "log": str(self.log(name))}
        self._save_state(state)
        deadline = time.monotonic() + timeout
        while not all(_port_open(p) for p in ports):
            code = process.poll()
            if code is not None:
                raise NetworkError(f"{name} exited with code {code} while starting: {_last_line(self.log(name))}",
                                   hint=f"see {self.log(name)}")
            if time.monotonic() > deadline:
                raise NetworkError(f"{name} did not listen on port(s) {ports} within {timeout:.0f} s",
                                   hint=f"see {self.log(name)}")
            time.sleep(0.1)

    def stop_node(self, name: str, timeout: float = 15.0) -> bool:
        """Stop one node by its pid (SIGTERM, then SIGKILL); False if it was not running."""
        state = self._state()
        entry = state["processes"].get(name)
        if entry is None or not _alive(entry):
            return False
        pid = int(entry["pid"])
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        deadline = time.monotonic() + timeout
        while _alive(entry) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(entry):
            os.killpg(pid, signal.SIGKILL)
            while _alive(entry) and time.monotonic() < deadline + 5:
                time.sleep(0.05)
        try:  # reap it when it is our child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return True

    # --- the network
    def status(self) -> dict[str, Any]:
        state = self._state()["processes"]
        nodes = {}
        for name in self.node_names():
            entry = state.get(name)
            alive = entry is not None and _alive(entry)
            nodes[name] = {"running": alive, "pid": entry["pid"] if alive else None,
                           "ports": entry["ports"] if entry else None, "log": str(self.log(name))}
        orderers = [o.orderer_name for o in self.orgs]
        up = sum(nodes[n]["running"] for n in orderers)
        return {"dir": str(self.root), "ready": bool((self.profile() or {}).get("ready")), "nodes": nodes,
                "orderers_running": up, "orderers": len(orderers), "quorum": bft_quorum(len(orderers))}

    def down(self) -> list[str]:
        """Stop every process this network started (stale entries included); the names stopped."""
        stopped = [n for n in reversed(list(self._state()["processes"])) if self.stop_node(n)]
        if self.state_file.exists():
            self._save_state({"processes": {}})
        return stopped

    def up(self, log: Any = print, fresh: bool = False) -> dict[str, Any]:
        """Start the network (set it up first when new or ``fresh``); refuse over a running one."""
        live = self.running()
        if live:
            raise NetworkError(f"a Fabric network is already running in {self.root} ({len(live)} processes)",
                               hint="`fedcore fabric status` shows it; `fedcore fabric down` stops it")
        self.down()  # stale entries
        for b in BINARIES:
            self._binary(b)
        started = time.monotonic()
        profile = self.profile()
        try:
            if fresh or profile is None or not profile.get("ready"):
                self._setup(log)
            else:
                log(f"restarting the network in {self.root}")
                for name in self.node_names():
                    self.start_node(name)
                self._check_ready(log)
        except BaseException:
            self.down()
            raise
        log(f"network up in {time.monotonic() - started:.1f} s: {len(self.orgs)} organizations, "
            f"{len(self.orgs)} SmartBFT orderers (tolerates {(len(self.orgs) - 1) // 3} faulty), channel '{CHANNEL}'")
        return self.profile() or {}

    def _setup(self, log: Any) -> None:
        if self.root.exists():
            for sub in ("orgs", "config", "data", "chaincode", "logs", "network.json", "channel.block", "state.json"):
                target = self.root / sub
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        log(f"generating crypto material and configs in {self.root}")
        generate_crypto(self.root, self.orgs)
        for org in self.orgs:
            for name, content in ((org.peer_name, core_yaml(self.root, org, self.orgs)),
                                  (org.orderer_name, orderer_yaml(self.root, org, self.orgs))):
                _write(self.root / "config" / name / ("core.yaml" if name.startswith("peer") else "orderer.yaml"),
                       yaml.safe_dump(content, sort_keys=False).encode())
        _write(self.root / "config" / "configtx" / "configtx.yaml",
               yaml.safe_dump(configtx(self.root, self.orgs), sort_keys=False).encode())
        block = self.root / "channel.block"
        self._tool("configtxgen", [self._binary("configtxgen"), "-profile", "FedcoreBFT", "-channelID", CHANNEL,
                                   "-outputBlock", str(block), "-configPath", str(self.root / "config" / "configtx")])
        log("starting 4 SmartBFT orderers" if len(self.orgs) == 4 else f"starting {len(self.orgs)} SmartBFT orderers")
        for org in self.orgs:
            self.start_node(org.orderer_name)
        for org in self.orgs:
            admin = self.root / "orgs" / org.name / "admin" / "tls"
            self._tool(f"osnadmin-join.{org.name}", [
                self._binary("osnadmin"), "channel", "join", "--channelID", CHANNEL, "--config-block", str(block),
                "-o", f"127.0.0.1:{org.orderer_admin_port}", "--ca-file", str(self.root / "orgs" / org.name / "ca" / "ca.pem"),
                "--client-cert", str(admin / "cert.pem"), "--client-key", str(admin / "key.pem")])
        log("starting peers and joining them to the channel")
        for org in self.orgs:
            self.start_node(org.peer_name)
        for org in self.orgs:
            self._peer_cli(org, f"join.{org.name}", ["channel", "join", "-b", str(block)])
        log("installing the chaincode (chaincode as a service) and approving it in every organization")
        label = f"{CHAINCODE}_{CHAINCODE_VERSION}"
        for org in self.orgs:
            package, package_id = chaincode_package(org, label)
            path = _write(self.root / "chaincode" / f"{org.name}.tgz", package)
            _write(self.root / "chaincode" / f"{org.name}.id", package_id.encode())
            self._peer_cli(org, f"install.{org.name}", ["lifecycle", "chaincode", "install", str(path)])
            self.start_node(f"chaincode.{org.name}")
        policy = endorsement_policy(self.orgs)
        definition = ["--channelID", CHANNEL, "--name", CHAINCODE, "--version", CHAINCODE_VERSION, "--sequence", "1",
                      "--signature-policy", policy]
        approvals = []
        for org in self.orgs:
            package_id = (self.root / "chaincode" / f"{org.name}.id").read_text().strip()
            approvals.append(self._peer_cli(
                org, f"approve.{org.name}", ["lifecycle", "chaincode", "approveformyorg", *definition,
                                             "--package-id", package_id, *self._orderer_args(org)], wait=False))
        for name, process in approvals:
            self._finish(name, process)
        coordinator = self.orgs[0]
        peers: list[str] = []
        for org in self.orgs:
            peers += ["--peerAddresses", f"127.0.0.1:{org.peer_port}",
                      "--tlsRootCertFiles", str(self.root / "orgs" / org.name / "ca" / "ca.pem")]
        log("committing the chaincode definition")
        self._peer_cli(coordinator, "commit", ["lifecycle", "chaincode", "commit", *definition, *peers,
                                               *self._orderer_args(coordinator)])
        self._write_profile(ready=False)
        self._check_ready(log)
        self._write_profile(ready=True)

    def _orderer_args(self, org: Org) -> list[str]:
        return ["-o", f"127.0.0.1:{org.orderer_port}", "--tls", "--cafile",
                str(self.root / "orgs" / org.name / "ca" / "ca.pem")]

    def _tool(self, name: str, command: list[str], env: dict[str, str] | None = None) -> str:
        _, process = self._spawn(name, command, env)
        return self._finish(name, process)

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None) -> tuple[str, subprocess.Popen[bytes]]:
        self.log(name).parent.mkdir(parents=True, exist_ok=True)
        with self.log(name).open("wb") as out:
            process = subprocess.Popen(command, env=env or dict(os.environ), stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        return name, process

    def _finish(self, name: str, process: subprocess.Popen[bytes], timeout: float = STEP_TIMEOUT) -> str:
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise NetworkError(f"{name} did not finish within {timeout:.0f} s", hint=f"see {self.log(name)}") from None
        if code != 0:
            raise NetworkError(f"{name} failed (exit {code}): {_last_line(self.log(name))}", hint=f"see {self.log(name)}")
        return self.log(name).read_text(errors="replace")

    def _peer_cli(self, org: Org, name: str, args: list[str], wait: bool = True) -> Any:
        """The ``peer`` CLI as the organization's admin, against its own peer (mutual TLS)."""
        admin = self.root / "orgs" / org.name / "admin"
        env = {
            **os.environ,
            "FABRIC_CFG_PATH": str(self.root / "config" / org.peer_name),
            "FABRIC_LOGGING_SPEC": "warning",
            "CORE_PEER_MSPCONFIGPATH": str(admin / "msp"),
            "CORE_PEER_LOCALMSPID": org.msp_id,
            "CORE_PEER_ADDRESS": f"127.0.0.1:{org.peer_port}",
            "CORE_PEER_TLS_ENABLED": "true",
            "CORE_PEER_TLS_ROOTCERT_FILE": str(self.root / "orgs" / org.name / "ca" / "ca.pem"),
            "CORE_PEER_TLS_CLIENTAUTHREQUIRED": "true",
            "CORE_PEER_TLS_CLIENTCERT_FILE": str(admin / "tls" / "cert.pem"),
            "CORE_PEER_TLS_CLIENTKEY_FILE": str(admin / "tls" / "key.pem"),
        }
        spawned = self._spawn(name, [self._binary("peer"), *args], env)
        return self._finish(*spawned) if wait else spawned

    def _write_profile(self, ready: bool) -> None:
        orgs = []
        for org in self.orgs:
            base = self.root / "orgs" / org.name
            user = base / "users" / org.participant
            orgs.append({
                "name": org.name,
                "msp_id": org.msp_id,
                "participant": org.participant,
                "peer": f"127.0.0.1:{org.peer_port}",
                "peer_server_name": org.peer_name,
                "orderer": f"127.0.0.1:{org.orderer_port}",
                "orderer_admin": f"127.0.0.1:{org.orderer_admin_port}",
                "tls_ca_cert": str(base / "ca" / "ca.pem"),
                "identity": {"msp_id": org.msp_id, "cert": str(user / "msp" / "signcerts" / "cert.pem"),
                             "key": str(user / "msp" / "keystore" / "key.pem")},
                "tls_client": {"cert": str(user / "tls" / "cert.pem"), "key": str(user / "tls" / "key.pem")},
            })
        profile = {"format": "fedcore-fabric-network-v1", "fabric_version": FABRIC_VERSION, "channel": CHANNEL,
                   "chaincode": CHAINCODE, "base_port": self.base_port, "endorsement_policy": endorsement_policy(self.orgs),
                   "organizations": orgs, "ready": ready}
        tmp = self.profile_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(profile, indent=1))
        tmp.replace(self.profile_file)

    def _check_ready(self, log: Any, timeout: float = STEP_TIMEOUT) -> None:
        """Every participant reads through its own peer, then submits one transaction that commits."""
        from fedcore.plugins.ledgers.fabric.client import FabricTransactionError

        profile = self.profile()
        assert profile is not None
        run_id = f"network-check-{time.time_ns()}"
        with connect(profile) as clients:
            deadline = time.monotonic() + timeout
            for participant, client in clients.items():
                while True:
                    try:
                        client.evaluate("GetRunEntries", run_id)
                        break
                    except FabricTransactionError as exc:
                        if time.monotonic() > deadline:
                            raise NetworkError(f"the chaincode does not answer {participant}'s peer: {exc}",
                                               hint=f"see {self.log('peer.' + _org_of(profile, participant)['name'])}") from None
                        time.sleep(0.5)
            for participant, client in clients.items():
                entry = [{"round": 0, "kind": "spec", "writer": participant, "payloadSha256": "0" * 64,
                          "metadata": {"check": "network up"}}]
                while True:
                    try:
                        client.submit("RecordEntries", run_id, json.dumps(entry))
                        break
                    except FabricTransactionError as exc:
                        # Discovery needs a few gossip rounds before a gateway knows the other organizations.
                        if time.monotonic() > deadline:
                            raise NetworkError(f"a check transaction by {participant} did not commit: {exc}",
                                               hint=f"see the logs in {self.root / 'logs'}") from None
                        time.sleep(1.0)
        log("every participant endorsed, ordered and committed a check transaction")


def _org_of(profile: dict[str, Any], participant: str) -> dict[str, Any]:
    for org in profile["organizations"]:
        if org["participant"] == participant:
            return org
    raise KeyError(participant)


class _Clients(dict):  # type: ignore[type-arg]
    def __enter__(self) -> _Clients:
        return self

    def __exit__(self, *exc: Any) -> None:
        for client in self.values():
            client.close()


def connect(profile: dict[str, Any], timeout: float = 30.0, commit_timeout: float = 30.0) -> _Clients:
    """A Gateway client per participant, each through its own organization's peer, with mutual TLS."""
    from fedcore.plugins.ledgers.fabric.client import GatewayClient
    from fedcore.plugins.ledgers.fabric.protocol import Identity

    coordinator = profile["organizations"][0]["msp_id"]
    clients = _Clients()
    for org in profile["organizations"]:
        identity = Identity.from_files(org["identity"]["msp_id"], org["identity"]["cert"], org["identity"]["key"])
        endorsers = () if org["msp_id"] == coordinator else (org["msp_id"], coordinator)
        clients[org["participant"]] = GatewayClient(
            org["peer"], identity, profile["channel"], profile["chaincode"],
            tls_ca_pem=Path(org["tls_ca_cert"]).read_bytes(), server_name=org["peer_server_name"], timeout=timeout,
            tls_client_cert_pem=Path(org["tls_client"]["cert"]).read_bytes(),
            tls_client_key_pem=Path(org["tls_client"]["key"]).read_bytes(),
            endorsing_organizations=endorsers, commit_timeout=commit_timeout,
        )
    return clients


def iter_logs(root: Path) -> Iterator[Path]:
    yield from sorted((root / "logs").glob("*.log"))


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="fedcore-fabric-"))
