"""Hiding commitments for the audit ledger, and the openings their makers keep.

A ledger entry about a payload (a site's released update, the coordinator's
aggregate, a preprocessing statistic) holds ``SHA-256(salt || canonical bytes)``,
never a plain digest: a plain digest is a deterministic function of the data, so
anyone holding the ledger could confirm a guess about a record by hashing it.
The salt is 16 bytes (128 bits) from :func:`fedcore.randomness.secret_bytes`,
fresh per entry (derived from the seed only under ``execution.reproducible_noise``).

The opening -- the salt and the canonical bytes -- stays with the party that made
the payload: in simulation ``RUN/sites/<site>/openings/<ledger>/`` for a site and
``RUN/openings/<ledger>/`` for the coordinator (``<ledger>`` is the ledger's
directory name, e.g. ``main-r0``). Each holds ``openings.jsonl`` (one line per
entry: kind, round, writer, name, commitment, salt in hex, payload file) and the
payload files. An auditor given a holder's folder checks every opening against
the ledger (``fedcore ledger verify RUN --openings FOLDER``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from fedcore.randomness import secret_bytes
from fedcore.rundir import atomic_write_bytes, atomic_write_text
from fedcore.types import ClientUpdate

#: bytes of salt per commitment (128 bits)
SALT_BYTES = 16
OPENINGS_DIR = "openings"
OPENINGS_FILE = "openings.jsonl"


def commitment(salt: bytes, payload: bytes) -> str:
    """``SHA-256(salt || payload)`` in hex."""
    return hashlib.sha256(salt + payload).hexdigest()


def holder_dir(run_dir: Path, holder: str) -> Path:
    """A party's own folder: the run directory for the coordinator (``server``), ``sites/<name>`` for a site."""
    return run_dir if holder == "server" else run_dir / "sites" / holder


@dataclass(frozen=True)
class Opening:
    """One line of ``openings.jsonl``: what a commitment on the ledger hides, and where its bytes are."""

    kind: str
    round: int
    writer: str
    name: str
    commitment: str
    salt: str
    payload_file: str

    def check(self, folder: Path) -> str | None:
        """Why this opening does not open its commitment, or None."""
        try:
            salt = bytes.fromhex(self.salt)
            payload = (folder / self.payload_file).read_bytes()
        except (ValueError, OSError) as exc:
            return f"unreadable opening ({type(exc).__name__})"
        if len(salt) < SALT_BYTES:
            return f"salt shorter than {SALT_BYTES} bytes"
        if commitment(salt, payload) != self.commitment:
            return "SHA-256(salt || payload) is not the commitment"
        return None


class Committer:
    """Commits one training's ledger payloads; each opening is left with the party that made it.

    :param ledger_dir: the ledger's directory (``RUN/ledger/<name>``), or None for a run
        without a ledger (commitments are then computed and nothing is kept).
    :param reproducible: ``execution.reproducible_noise`` (salts from the seed).
    :param seed: the spec's seed.
    :param arm: the sweep arm's label.
    :param repeat: the repeat index.
    :param holder_root: the one party's own folder that keeps every opening this committer
        makes (a deployed site's folder on its own disk); default: each writer's folder in
        the run directory (:func:`holder_dir`).
    """

    def __init__(
        self,
        ledger_dir: Path | str | None,
        reproducible: bool,
        seed: int,
        arm: str,
        repeat: int,
        holder_root: Path | None = None,
    ) -> None:
        self.ledger_dir = Path(ledger_dir) if ledger_dir is not None else None
        self.reproducible = reproducible
        self.seed = seed
        self.arm = arm
        self.repeat = repeat
        self.holder_root = holder_root

    def commit(self, writer: str, kind: str, round: int, payload: bytes, name: str = "") -> str:
        """The commitment to ``payload``; its opening goes to ``writer``'s folder."""
        return self.open_commit(writer, kind, round, payload, name)[0]

    def open_commit(self, writer: str, kind: str, round: int, payload: bytes, name: str = "") -> tuple[str, bytes]:
        """The commitment to ``payload`` and its salt; the opening is kept as :meth:`commit` keeps it."""
        label = ("ledger-salt", self.arm, self.repeat, writer, kind, round, name)
        salt = secret_bytes(SALT_BYTES, self.reproducible, self.seed, *label)
        digest = commitment(salt, payload)
        if self.ledger_dir is not None:
            folder = self._folder(writer)
            payload_file = f"{kind}-r{round}{'-' + _slug(name) if name else ''}.bin"
            atomic_write_bytes(folder / payload_file, payload)
            opening = Opening(kind, round, writer, name, digest, salt.hex(), payload_file)
            with open(folder / OPENINGS_FILE, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(asdict(opening), sort_keys=True) + "\n")
        return digest, salt

    def _folder(self, holder: str) -> Path:
        """Where ``holder``'s openings of this ledger are kept (``ledger_dir`` is set)."""
        assert self.ledger_dir is not None
        root = self.holder_root if self.holder_root is not None else holder_dir(self.ledger_dir.parent.parent, holder)
        return root / OPENINGS_DIR / self.ledger_dir.name

    def forget_after(self, holder: str, round: int) -> None:
        """Drop ``holder``'s openings of rounds after ``round`` (a resumed run redoes them; their payload files are rewritten).

        The holder's own folder only; a round cut short may have left openings whose entries never
        reached the ledger, and a redone round's payload files replace the cut one's.
        """
        if self.ledger_dir is None:
            return
        path = self._folder(holder) / OPENINGS_FILE
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line)["round"] <= round]
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(kept))

    def update(self, writer: str, update: ClientUpdate) -> str:
        """The commitment to a site's released update (its opening kept by the site)."""
        return self.commit(writer, "site-update", update.round, update.canonical_bytes())


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def openings_under(folder: Path) -> Iterator[tuple[str, Path, list[Opening]]]:
    """(ledger directory name, opening folder, openings) for every ``openings.jsonl`` under ``folder``.

    A malformed line is a :class:`ValueError` naming the file and line.
    """
    for path in sorted(folder.rglob(OPENINGS_FILE)):
        openings = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                openings.append(Opening(**json.loads(line)))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not an opening ({exc})") from None
        yield path.parent.name, path.parent, openings
