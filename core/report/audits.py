"""The report's audits: measured leakage beside the accounted epsilon (a table, a figure, red flags).

Reads only ``summary.json`` (each federated run's ``audits``: :class:`fedcore.components.AuditResult`
as JSON), so ``fedcore report DIR`` rebuilds it. Intervals are 95 % t intervals over repeats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedcore.audit import FPR_LEVELS, mean_ci

#: the words a bound above the accounted epsilon is flagged with (red where Markdown renders HTML)
FLAG = "AUDIT BOUND EXCEEDS THE ACCOUNTED EPSILON"


def _runs(arm: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in arm["federated"]["runs"] if r.get("audits")]


def audit_names(summary: dict[str, Any]) -> list[str]:
    """Every audit name in the run, in first-seen order."""
    names: dict[str, None] = {}
    for arm in summary["arms"]:
        for run in _runs(arm):
            names.update((a["audit"], None) for a in run["audits"])
    return list(names)


def _results(arm: dict[str, Any], audit: str) -> list[dict[str, Any]]:
    return [a for run in _runs(arm) for a in run["audits"] if a["audit"] == audit]


def _stat(values: Sequence[float | None], scale: float = 1.0, fmt: str = "{:.3f}") -> str:
    mean, half = mean_ci([v for v in values if v is not None])
    if math.isnan(mean):
        return "n/a"
    if math.isinf(mean):
        return "∞"
    text = fmt.format(scale * mean)
    return text if math.isnan(half) else f"{text} ± {fmt.format(scale * half)}"


def _accounted(result: dict[str, Any]) -> float | None:
    bound = result.get("bound")
    return bound.get("accounted_epsilon") if bound else None


def flags(summary: dict[str, Any]) -> list[str]:
    """One line per (arm, repeat, audit) whose empirical lower bound exceeds the accounted epsilon."""
    lines = []
    for arm in summary["arms"]:
        for run in _runs(arm):
            for result in run["audits"]:
                bound = result.get("bound")
                if bound and bound.get("exceeds_accounted"):
                    lines.append(
                        f'**<span style="color:red">🔴 {FLAG}: arm {arm["label"]}, repeat {run["repeat"]}: '
                        f"{result['audit']} from {bound['attack']} proves ε ≥ {bound['epsilon']:.3f} "
                        f"(at {100 * bound['confidence']:g} % confidence) but the accountant computed "
                        f"ε = {bound['accounted_epsilon']:.3f}. One of them is wrong: the accounting, the mechanism "
                        "or the audit.</span>**"
                    )
    return lines


def _summary_table(summary: dict[str, Any]) -> str:
    """One row per (arm, attack): its pooled success and the lower bounds computed from it."""
    lines = [
        "| Arm | Attack | AUC | TPR @ FPR 1 % (%) | TPR @ FPR 0.1 % (%) | ε lower bound | Accounted ε | Time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in summary["arms"]:
        accounted = [p["epsilon"] for r in arm["federated"]["runs"] for p in r.get("privacy", [])]
        accounted_text = f"{max(accounted):.3f}" if accounted else "none (no DP)"
        bounds: dict[str, list[float]] = {}
        for run in _runs(arm):
            for result in run["audits"]:
                if result.get("bound"):
                    bounds.setdefault(result["bound"]["attack"], []).append(result["bound"]["epsilon"])
        for audit in audit_names(summary):
            pooled = [r["pooled"] for r in _results(arm, audit) if r.get("pooled")]
            if not pooled:
                continue
            seconds = [r["seconds"] for r in _results(arm, audit)]
            lines.append(
                f"| {arm['label']} | `{audit}` | {_stat([p['auc'] for p in pooled])} "
                f"| {_stat([p['tpr_at_fpr_1pct'] for p in pooled], 100, '{:.2f}')} "
                f"| {_stat([p['tpr_at_fpr_01pct'] for p in pooled], 100, '{:.2f}')} "
                f"| {_stat(bounds.get(audit, []))} | {accounted_text} | {_stat(seconds, fmt='{:.1f}')} |"
            )
    return "\n".join(lines)


def _per_site_table(summary: dict[str, Any]) -> str:
    names = {s["site"]: s["name"] for s in summary["data"]["sites"]}
    lines = ["| Arm | Audit | Site | Attack AUC | TPR @ FPR 1 % (%) | TPR @ FPR 0.1 % (%) |", "|---|---|---|---|---|---|"]
    rows = 0
    for arm in summary["arms"]:
        for audit in audit_names(summary):
            per_site: dict[int, list[dict[str, Any]]] = {}
            for result in _results(arm, audit):
                for metrics in result.get("per_site", []):
                    per_site.setdefault(metrics["site"], []).append(metrics)
            for site, values in sorted(per_site.items()):
                rows += 1
                lines.append(
                    f"| {arm['label']} | `{audit}` | {names.get(site, site)} | {_stat([v['auc'] for v in values])} "
                    f"| {_stat([v['tpr_at_fpr_1pct'] for v in values], 100, '{:.2f}')} "
                    f"| {_stat([v['tpr_at_fpr_01pct'] for v in values], 100, '{:.2f}')} |"
                )
    return "\n".join(lines) if rows else ""


def _bound_details(summary: dict[str, Any]) -> list[str]:
    lines = []
    for arm in summary["arms"]:
        for run in _runs(arm):
            for result in run["audits"]:
                b = result.get("bound")
                if not b:
                    continue
                rate = "TPR/FPR" if b["direction"] == "tpr/fpr" else "TNR/FNR"
                lines.append(
                    f"- {arm['label']}, repeat {run['repeat']}: ε ≥ {b['epsilon']:.3f} from `{b['attack']}`'s "
                    f"{rate} at FPR level {b['fpr_level']:g}: TPR {b['tpr']:.3f} "
                    f"[{b['tpr_interval'][0]:.3f}, {b['tpr_interval'][1]:.3f}], FPR {b['fpr']:.4f} "
                    f"[{b['fpr_interval'][0]:.4f}, {b['fpr_interval'][1]:.4f}] on {b['n_members']} members and "
                    f"{b['n_nonmembers']} non-members, δ = {b['delta']:.1e}"
                )
    return lines


def audits_section(summary: dict[str, Any]) -> str:
    """The report's audits section (empty when the run had no audits)."""
    if not audit_names(summary):
        return ""
    out = flags(summary)
    if out:
        out.append("")
    out += [
        "Attacks on each (arm, repeat)'s final global model. Members: a random subset of each site's training "
        "rows; non-members: as many of the same site's validation rows (never the test split). Pooled: an "
        "attacker with one threshold per site. Mean ± 95 % t interval over repeats. An AUC of 0.5 and TPR = FPR "
        "are chance; the ε lower bound is what the attack proves at 95 % confidence, the accounted ε what the "
        "accountant computed (an upper bound). See docs/audits.md for what these numbers do not prove.",
        "",
        _summary_table(summary),
    ]
    per_site = _per_site_table(summary)
    if per_site:
        out += ["", "Per site:", "", per_site]
    details = _bound_details(summary)
    if details:
        out += ["", "Each lower bound's (TPR, FPR) pair, Clopper-Pearson intervals:", "", *details]
    notes = dict.fromkeys(n for arm in summary["arms"] for run in _runs(arm) for a in run["audits"] for n in a["notes"])
    levels = ", ".join(f"{100 * f:g} %" for f in FPR_LEVELS)
    out += [
        "",
        "Released by each site, per membership audit, outside the DP guarantee: the counts of members and "
        "non-members audited, the attack's AUC, its TPR at fixed FPR levels and the numbers of members and "
        f"non-members flagged at thresholds set on half the non-members (levels {levels}). Per-row scores never "
        "leave a site.",
        *[f"- {note}" for note in notes],
    ]
    return "\n".join(out)


def _value(result: dict[str, Any], key: str) -> float | None:
    if key == "bound":
        return result["bound"]["epsilon"] if result.get("bound") else None
    return result["pooled"][key] if result.get("pooled") else None


def _series(summary: dict[str, Any], audit: str, key: str) -> list[tuple[float | None, float, float]]:
    """(accounted epsilon or None, mean, CI half-width) per arm of one audit's pooled ``key`` or ``bound``."""
    points = []
    for arm in summary["arms"]:
        values = [v for v in (_value(r, key) for r in _results(arm, audit)) if v is not None]
        if not values:
            continue
        points.append((arm["federated"]["aggregate"].get("epsilon_max"), *mean_ci(values)))
    return points


def leakage_figure(run_dir: Path, summary: dict[str, Any]) -> list[str]:
    """Accuracy, attack AUC and the empirical epsilon lower bound against accounted epsilon (one figure)."""
    names = audit_names(summary)
    dp_arms = [a for a in summary["arms"] if a["federated"]["aggregate"].get("epsilon_max") is not None]
    if not names or not dp_arms or len(summary["arms"]) < 2:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [a["federated"]["aggregate"]["epsilon_max"] for a in dp_arms]
    none_x = max(finite) * 4  # where the arm without DP is drawn, labelled "none"

    def draw(ax: Any, points: list[tuple[float | None, float, float]], label: str, scale: float = 1.0) -> None:
        """DP arms joined by a line, the arm without DP a lone point of the same colour at "none"."""

        def bars(pts: list[tuple[float | None, float, float]]) -> list[float]:
            return [0.0 if math.isnan(p[2]) else scale * p[2] for p in pts]

        dp = sorted((p for p in points if p[0] is not None), key=lambda p: p[0])  # type: ignore[arg-type, return-value]
        lone = [p for p in points if p[0] is None]
        line = ax.errorbar([p[0] for p in dp], [scale * p[1] for p in dp], yerr=bars(dp), marker="o", capsize=3, label=label)
        if lone:
            ax.errorbar([none_x] * len(lone), [scale * p[1] for p in lone], yerr=bars(lone), marker="s", capsize=3,
                        linestyle="none", color=line[0].get_color())  # fmt: skip

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    accuracy = []
    for arm in summary["arms"]:
        acc = [r["test"]["accuracy"] for r in arm["federated"]["runs"]]
        accuracy.append((arm["federated"]["aggregate"].get("epsilon_max"), *mean_ci(acc)))
    draw(axes[0], accuracy, "federated", 100)
    axes[0].set_ylabel("test accuracy (%)")
    for audit in names:
        auc = _series(summary, audit, "auc")
        if auc:
            draw(axes[1], auc, audit)
        bound = _series(summary, audit, "bound")
        if bound:
            draw(axes[2], bound, f"{audit} ({_bound_attack(summary, audit)})")
    axes[1].axhline(0.5, color="gray", linestyle=":", label="chance")
    axes[1].set_ylabel("membership attack AUC (pooled)")
    grid = sorted(set(finite))
    axes[2].plot(grid, grid, color="black", linestyle="--", marker="x", label="accounted ε (upper bound)")
    axes[2].set_ylabel("empirical ε lower bound (95 %)")
    for ax in axes:
        ax.set_xscale("log")
        ticks = sorted(set(finite)) + [none_x]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:.2g}" for t in ticks[:-1]] + ["none"])
        ax.minorticks_off()
        ax.set_xlabel("accounted ε (whole run)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{summary['name']}: accuracy and measured leakage against privacy (error bars: 95 % CI over repeats)")
    fig.tight_layout()
    (run_dir / "figures").mkdir(exist_ok=True)
    fig.savefig(run_dir / "figures" / "leakage.png", dpi=120)
    plt.close(fig)
    return ["figures/leakage.png"]


def _bound_attack(summary: dict[str, Any], audit: str) -> str:
    for arm in summary["arms"]:
        for result in _results(arm, audit):
            if result.get("bound"):
                return f"from {result['bound']['attack']}"
    return ""
