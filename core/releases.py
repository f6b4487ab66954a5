"""Everything that leaves a site, declared once: per message type and field, inside the DP
guarantee or released outside it.

A site sends these kinds of message (in simulation they are objects the engine hands
over; deployed, they cross the network):

- ``ClientUpdate`` every round (its ``extras`` by name),
- ``SiteEvaluation`` every round (the global model's metrics on the site's splits),
- ``SiteSummary`` once, during federated preprocessing (``FederatedData.released_statistics``),
- ``SiteDescription`` once: the site's name and split sizes, shown in the report's data table,
- ``SiteAttackStats`` once per membership audit (``audits:`` in the spec): the attack's
  aggregate success on the site's own rows.

Each field is a :class:`Release`: what it is, and under which protection it is inside
the guarantee (``"record"``: record-level DP-SGD at the site; ``"site"``: site-level
noise at the site; ``"central"``: central DP, the coordinator noises the sum;
``"none"``: no DP). A field inside the guarantee under every protection, ``"none"``
included, carries nothing about the data (ids, round numbers). The report's
"released outside the guarantee" list is :func:`outside_guarantee`; the test
``tests/test_privacy_releases.py`` captures every message the sites of each bundled
spec send and fails on any field not declared here.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

#: every protection a run can have
PROTECTIONS = frozenset({"none", "record", "site", "central"})
#: inside the guarantee under every protection: carries nothing about the data
PUBLIC = PROTECTIONS
#: inside the guarantee wherever a DP mechanism protects the update
DP = frozenset({"record", "site", "central"})
#: never inside the guarantee
OUTSIDE: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Release:
    """One field of one message a site sends.

    :ivar message: the message type (``ClientUpdate``, ``SiteEvaluation``, ...).
    :ivar field: the field's dotted path; ``*`` stands for any one name (a column, an extra).
    :ivar what: what it tells a reader, for the report.
    :ivar inside: the protections under which it is inside the DP guarantee.
    :ivar sent_with: the component (its ``use`` name) whose presence makes sites send it
        (:data:`EVALUATION`: a spec's ``evaluation.metrics``), or None when every run sends it.
    """

    message: str
    field: str
    what: str
    inside: frozenset[str]
    sent_with: str | None = None

    def matches(self, message: str, path: str) -> bool:
        return message == self.message and fnmatch.fnmatchcase(path, self.field)


_METRICS = ("n", "loss", "accuracy", "precision", "recall", "f1")
#: the ``sent_with`` of releases that only a spec with ``evaluation.metrics`` makes sites send
EVALUATION = "evaluation.metrics"

RELEASES: tuple[Release, ...] = (
    Release("ClientUpdate", "site", "the site's index", PUBLIC),
    Release("ClientUpdate", "round", "the round number", PUBLIC),
    Release("ClientUpdate", "delta", "the model update (clipped and noised under DP)", DP),
    Release(
        "ClientUpdate",
        "n_samples",
        "the training-set size, as the update's weight (a constant 1 under site-level and central DP)",
        frozenset({"site", "central"}),
    ),
    Release(
        "ClientUpdate",
        "local_steps",
        "the number of local steps, which reveals the training-set size divided by the batch size",
        OUTSIDE,
    ),
    Release("ClientUpdate", "train_loss", "the mean training loss at the site", OUTSIDE),
    Release("ClientUpdate", "train_seconds", "the local training time (a timing side channel)", OUTSIDE),
    Release(
        "ClientUpdate",
        "extras.scaffold.control_delta",
        "SCAFFOLD's control-variate change (post-processing of DP-SGD under record-level DP)",
        frozenset({"record"}),
        "scaffold",
    ),
    Release(
        "ClientUpdate",
        "extras.central-dp.unclipped",
        "adaptive clipping's unclipped bit (only its noised, accounted sum is used)",
        frozenset({"central"}),
        "central-dp",
    ),
    Release("SiteEvaluation", "site", "the site's index", PUBLIC),
    *(
        Release("SiteEvaluation", f"{split}.{metric}", "the global model's exact metrics on the site's splits", OUTSIDE)
        for split in ("validation", "test")
        for metric in _METRICS
    ),
    *(
        Release(
            "SiteEvaluation",
            f"{split}.scores.*",
            "the global model's exact metrics of `evaluation.metrics` on the site's splits (AUROC, per-class recall, ...)",
            OUTSIDE,
            EVALUATION,
        )
        for split in ("validation", "test")
    ),
    *(
        Release(
            "SiteEvaluation",
            f"{split}_histogram",
            "with AUROC in `evaluation.metrics`: per class, the counts of its predicted probability in 1000 bins "
            "on the site's splits (for the pooled AUROC)",
            OUTSIDE,
            EVALUATION,
        )
        for split in ("validation", "test")
    ),
    *(
        Release(
            "SiteEvaluation",
            f"{split}_confusion",
            "the exact confusion matrices on the site's splits (their class counts included)",
            OUTSIDE,
        )
        for split in ("validation", "test")
    ),
    Release("SiteSummary", "site", "the site's name", PUBLIC),
    Release("SiteSummary", "rows", "preprocessing: the site's training rows", OUTSIDE),
    Release("SiteSummary", "continuous.*.count", "preprocessing: non-missing values per column", OUTSIDE),
    Release("SiteSummary", "continuous.*.missing", "preprocessing: missing values per column", OUTSIDE),
    Release("SiteSummary", "continuous.*.total", "preprocessing: the sum of each continuous column", OUTSIDE),
    Release(
        "SiteSummary", "continuous.*.total_of_squares", "preprocessing: the sum of squares of each continuous column", OUTSIDE
    ),
    Release("SiteSummary", "categorical.*.counts.*", "preprocessing: exact category counts per column", OUTSIDE),
    Release("SiteSummary", "categorical.*.missing", "preprocessing: missing values per categorical column", OUTSIDE),
    Release("SiteDescription", "name", "the site's name", PUBLIC),
    # Deployed only (fedcore run --federation): what a site's train reply carries beside its
    # ClientUpdate. The commitment hides the update (128-bit salt); the salt goes to the
    # coordinator only, which holds the update anyway, and is withheld under secagg-plus.
    Release("DeployedTrainReply", "site_name", "the site's name", PUBLIC),
    Release("DeployedTrainReply", "commitment", "SHA-256(salt || update): hides the update", PUBLIC),
    Release("DeployedTrainReply", "salt", "random bytes opening the commitment (coordinator only)", PUBLIC),
    Release("DeployedTrainReply", "signature", "the site's signature over round ids and the commitment", PUBLIC),
    Release("DeployedTrainReply", "privacy", "the site's accountant's report (computed from public settings)", PUBLIC),
    # A membership audit's release from each site (fedcore.components.SiteAttackStats):
    # aggregates of the attack on the site's own rows, never a per-row score.
    *(
        Release("SiteAttackStats", path, what, inside, audit)
        for audit in ("membership-loss", "membership-lira")
        for path, what, inside in (
            ("site", "the site's index", PUBLIC),
            ("fpr_levels", "the audit's fixed false-positive levels", PUBLIC),
            ("n_members", "audit: how many training rows were attacked", OUTSIDE),
            ("n_nonmembers", "audit: how many held-out rows were compared", OUTSIDE),
            ("auc", "audit: the attack's exact ROC AUC on the site's rows", OUTSIDE),
            ("tpr_at_fpr", "audit: the attack's exact true-positive rates at the fixed FPR levels", OUTSIDE),
            ("*.n_members", "audit: attacked training rows per half", OUTSIDE),
            ("*.n_nonmembers", "audit: compared held-out rows per half", OUTSIDE),
            ("*.true_positives", "audit: exact true-positive counts per threshold and half", OUTSIDE),
            ("*.false_positives", "audit: exact false-positive counts per threshold and half", OUTSIDE),
        )
    ),
    *(
        Release("SiteDescription", split, "the exact sizes of the site's splits", OUTSIDE)
        for split in ("train", "validation", "test")
    ),
)


#: dataset report sections (by title) that hold no per-site counts: the only ones a run
#: with a DP arm keeps (the others -- class balance, imputed values, split sizes by
#: dataset plugin -- are withheld from summary.json and the report)
SECTIONS_WITHOUT_COUNTS = frozenset({"Data: column types"})


def declaration(message: str, path: str) -> Release | None:
    """The declared release of ``message``'s field ``path``, or None when undeclared."""
    return next((r for r in RELEASES if r.matches(message, path)), None)


def field_paths(value: Any, prefix: str = "") -> Iterator[str]:
    """Every leaf field of a message as a dotted path (a tensor bundle is one leaf).

    Pydantic models and mappings are walked by name; lists, numbers, strings and
    :class:`~fedcore.types.Weights` are leaves.
    """
    from fedcore.types import Weights

    if isinstance(value, Weights) or not isinstance(value, BaseModel | Mapping):
        yield prefix
        return
    items = value.items() if isinstance(value, Mapping) else ((k, getattr(value, k)) for k in type(value).model_fields)
    for key, item in items:
        yield from field_paths(item, f"{prefix}.{key}" if prefix else str(key))


def undeclared(message: str, value: Any) -> list[str]:
    """The fields of one captured message that :data:`RELEASES` does not declare."""
    return [path for path in field_paths(value) if declaration(message, path) is None]


def protections(privacy: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """The protections a run's ``privacy`` list gives (``{"none"}`` without a DP mechanism)."""
    found = set()
    for ref in privacy:
        use, settings = ref.get("use"), ref.get("settings") or {}
        if use == "gaussian":
            found.add(settings.get("level", "record"))
        elif use == "central-dp":
            found.add("central")
    return frozenset(found) or frozenset({"none"})


def outside_guarantee(protection: frozenset[str], uses: Iterable[str] | None = None) -> list[Release]:
    """The declared fields released outside the guarantee under ``protection``.

    A field is inside when every protection the run has covers it.

    :param protection: from :func:`protections`.
    :param uses: the run's component names; a field sent only with a component not
        among them is left out (default: every field).
    """
    present = None if uses is None else set(uses)
    return [
        r
        for r in RELEASES
        if not protection <= r.inside and (present is None or r.sent_with is None or r.sent_with in present)
    ]


def outside_text(protection: frozenset[str], uses: Iterable[str] | None = None) -> list[str]:
    """:func:`outside_guarantee` as report lines: per message, the fields that share a description."""
    groups: dict[tuple[str, str], list[str]] = {}
    for release in outside_guarantee(protection, uses):
        groups.setdefault((release.message, release.what), []).append(release.field)
    return [f"`{message}` {', '.join(f'`{f}`' for f in fields)}: {what}" for (message, what), fields in groups.items()]
