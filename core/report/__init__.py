"""summary.json, report.md and figures of a run directory.

:func:`build_report` reads only files (``summary.json``, ``rounds.jsonl``), so
``fedcore report DIR`` rebuilds the same report later.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fedcore.errors import FedcoreUserError
from fedcore.metrics import mean_sd, metric_value
from fedcore.releases import EVALUATION, SECTIONS_WITHOUT_COUNTS, outside_text, protections
from fedcore.report.audits import audits_section, leakage_figure
from fedcore.report.summary import METRICS, Summary, baseline_key, write_summary
from fedcore.types import RoundRecord

__all__ = ["Summary", "baseline_key", "build_report", "write_summary"]


# -------------------------------------------------------------------- rendering


def _pct(stat: dict[str, float]) -> str:
    if stat is None or math.isnan(stat["mean"]):
        return "n/a"
    return f"{100 * stat['mean']:.2f} ± {100 * stat['sd']:.2f}"


def _num(stat: dict[str, float] | None, fmt: str = "{:.1f}") -> str:
    if stat is None or stat["mean"] is None or math.isnan(stat["mean"]):
        return "n/a"
    return f"{fmt.format(stat['mean'])} ± {fmt.format(stat['sd'])}"


#: column titles of the metrics ``evaluation.metrics`` may name
METRIC_TITLES = {
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "auroc": "AUROC",
    "f1": "Macro F1",
    "precision": "Macro precision",
    "recall": "Macro recall",
}


def _metric_keys(summary: dict[str, Any], aggregates: Sequence[dict[str, Any]] = ()) -> list[str]:
    """The metrics the tables show: the primary first, then ``evaluation.metrics`` in order
    (``per_class_recall`` as one ``recall_class_<i>`` per class); the default four without them."""
    names = summary.get("metrics") or []
    if not names:
        return list(METRICS)
    keys: list[str] = []
    for name in [summary.get("primary", "accuracy"), *names]:
        if name == "per_class_recall":
            found = {k.removeprefix("scores.") for agg in aggregates for k in agg if k.startswith("scores.recall_class_")}
            keys += sorted(found, key=lambda k: int(k.rsplit("_", 1)[1]))
        elif name not in keys:
            keys.append(name)
    return keys


def _metric_title(key: str) -> str:
    if key.startswith("recall_class_"):
        return f"Recall of class {key.rsplit('_', 1)[1]}"
    return METRIC_TITLES.get(key, key)


def _metric_unit(key: str) -> str:
    """AUROC as a number in [0, 1]; every other metric in percent."""
    return "" if key == "auroc" else " (%)"


def _metric_stat(summary: dict[str, Any], aggregate: dict[str, Any], key: str) -> dict[str, Any] | None:
    """Mean ± sd of ``key`` over repeats; None when no repeat has it defined."""
    stat = aggregate.get(f"scores.{key}") if summary.get("metrics") else aggregate.get(key)
    if stat is None or stat["mean"] is None or math.isnan(stat["mean"]):
        return None
    return stat


def _metric_cell(summary: dict[str, Any], aggregate: dict[str, Any], key: str) -> str:
    """One metric's cell: percent (AUROC: three decimals) ± sd; ``undefined`` where no repeat defines it."""
    if not summary.get("metrics"):
        return _pct(aggregate.get(key))
    stat = _metric_stat(summary, aggregate, key)
    if stat is None:
        return "undefined"
    scale, fmt = (1, "{:.3f}") if key == "auroc" else (100, "{:.2f}")
    return f"{fmt.format(scale * stat['mean'])} ± {fmt.format(scale * stat['sd'])}"


def _privacy_text(arm: dict[str, Any]) -> str:
    runs = arm["federated"]["runs"]
    reports = [p for r in runs for p in r.get("privacy", [])]
    if not reports:
        return "none"
    worst = max(reports, key=lambda p: p["epsilon"])
    return f"ε = {worst['epsilon']:.3f}, δ = {worst['delta']:.0e} ({worst['unit']}, {worst['accountant']})"


#: the local-only and cyclic baselines' column titles, in table order
BASELINE_TITLES = {"local": "Local only", "cyclic": "Cyclic"}


def _table_one(summary: dict[str, Any], arm: dict[str, Any]) -> str:
    """Table I: the centralized (and local-only, cyclic) baselines beside the federated arm."""
    fed = arm["federated"]["aggregate"]
    cen = arm["centralized"]["aggregate"] if arm["centralized"] else None
    others = [arm[mode]["aggregate"] for mode in BASELINE_TITLES if arm.get(mode)]
    titles = [title for mode, title in BASELINE_TITLES.items() if arm.get(mode)]

    def row(title: str, cen_cell: str, other_cells: Sequence[str], fed_cell: str, dev: str) -> str:
        return f"| {title} | {cen_cell} | " + "".join(f"{c} | " for c in other_cells) + f"{fed_cell} | {dev} |".replace("|  |", "| |")

    lines = [
        row("Metric", "Centralized", titles, "Federated", "Deviation (points)"),
        "|---|---|" + "---|" * len(others) + "---|---|",
    ]
    scored = bool(summary.get("metrics"))
    for key in _metric_keys(summary, [fed, cen or {}, *others]):
        if scored:
            title = _metric_title(key) + _metric_unit(key) + (" — primary" if key == summary.get("primary") else "")
            f_stat, c_stat = _metric_stat(summary, fed, key), _metric_stat(summary, cen, key) if cen else None
            scale, places = (1, 3) if key == "auroc" else (100, 2)
            dev = f"{scale * (f_stat['mean'] - c_stat['mean']):+.{places}f}" if f_stat and c_stat else "–"
        else:
            title = f"{key.capitalize()} (%)"
            dev = f"{100 * (fed[key]['mean'] - cen[key]['mean']):+.2f}" if cen else "–"
        cells = [_metric_cell(summary, agg, key) for agg in others]
        lines.append(row(title, _metric_cell(summary, cen, key) if cen else "–", cells, _metric_cell(summary, fed, key), dev))
    conv_c = _num(cen["convergence_epoch"]) if cen else "–"
    lines.append(row("Convergence (epochs)", conv_c, [_num(a["convergence_epoch"]) for a in others], _num(fed["convergence_epoch"]), ""))
    lines.append(row("Privacy loss", "none", ["none"] * len(others), _privacy_text(arm), ""))
    time_c = _num(cen["wall_seconds"]) if cen else "–"
    lines.append(
        row("Processing time (s per run)", time_c, [_num(a["wall_seconds"]) for a in others], _num(fed["wall_seconds"]), "")
    )
    kb = fed.get("bytes_per_update", {}).get("mean", 0) / 1024
    lines.append(row("Communication per update (KiB)", "–", ["–"] * len(others), f"{kb:.1f}", ""))
    return "\n".join(lines)


def _load_records(run_dir: Path) -> list[RoundRecord]:
    path = run_dir / "rounds.jsonl"
    if not path.is_file():
        return []
    return [RoundRecord.model_validate_json(line) for line in path.read_text().splitlines() if line.strip()]


def _curves(records: Sequence[RoundRecord], mode: str, arm: str, primary: str = "accuracy") -> tuple[list[int], list[float], list[float]]:
    by_epoch: dict[int, list[float]] = defaultdict(list)
    for r in records:
        if r.mode == mode and r.arm == arm:
            value = metric_value(r.validation, primary)
            by_epoch[r.epoch].append(float("nan") if value is None else value)
    epochs = sorted(by_epoch)
    means = [mean_sd(by_epoch[e])[0] for e in epochs]
    sds = [mean_sd(by_epoch[e])[1] for e in epochs]
    return epochs, means, sds


def _figure(run_dir: Path, summary: dict[str, Any], records: Sequence[RoundRecord]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = run_dir / "figures"
    figures.mkdir(exist_ok=True)
    written: list[str] = []
    primary = summary.get("primary", "accuracy")
    scale = 1 if primary == "auroc" else 100
    many = len(summary["arms"]) > 6
    fig, ax = plt.subplots(figsize=(11, 4.8) if many else (7, 4.2))
    drawn_baselines: set[str] = set()
    for arm in summary["arms"]:
        epochs, means, sds = _curves(records, "federated", arm["label"], primary)
        if epochs:
            label = "federated" if len(summary["arms"]) == 1 else arm["label"]
            ax.plot(epochs, [scale * m for m in means], marker="o", label=label)
            ax.fill_between(
                epochs, [scale * (m - s) for m, s in zip(means, sds)], [scale * (m + s) for m, s in zip(means, sds)], alpha=0.2
            )
        if arm["centralized"] and arm["centralized"]["of_arm"] not in drawn_baselines:
            drawn_baselines.add(arm["centralized"]["of_arm"])
            epochs, means, _ = _curves(records, "centralized", arm["centralized"]["of_arm"], primary)
            if epochs:
                ax.plot(epochs, [scale * m for m in means], linestyle="--", color="black", label="centralized")
        for mode, style in (("local", ":"), ("cyclic", "-.")):
            if arm.get(mode) and arm[mode]["of_arm"] == arm["label"]:
                epochs, means, _ = _curves(records, mode, arm["label"], primary)
                if epochs:
                    ax.plot(epochs, [scale * m for m in means], linestyle=style, color="gray", label=BASELINE_TITLES[mode].lower())
    name = "accuracy" if primary == "accuracy" else _metric_title(primary)
    ax.set_xlabel("epochs of local training (federated: round × local epochs)")
    ax.set_ylabel(f"validation {name}" + _metric_unit(primary))
    ax.set_title(f"{summary['name']}: validation {name}")
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figures / f"{primary}.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    written.append(f"figures/{primary}.png")
    return written


def _per_site_table(
    records: Sequence[RoundRecord], arm: str, site_names: dict[int, str], summary: dict[str, Any] | None = None, mode: str = "federated"
) -> str:
    """The final global model on each site's test split, mean ± sd over repeats
    (``evaluation.metrics``: each of them, ``undefined`` where no repeat defines it)."""
    last: dict[int, RoundRecord] = {}
    for r in records:
        if r.mode == mode and r.arm == arm and (r.repeat not in last or r.round > last[r.repeat].round):
            last[r.repeat] = r
    if not any(record.per_site for record in last.values()):
        return ""
    if summary is not None and summary.get("metrics"):
        return _per_site_scores(last.values(), site_names, summary)
    by_site: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for record in last.values():
        for evaluation in record.per_site:
            by_site[evaluation.site].append((evaluation.test.accuracy, evaluation.test.f1))
    lines = ["| Site | Test accuracy (%) | Test macro F1 (%) |", "|---|---|---|"]
    for site, values in sorted(by_site.items()):
        acc = dict(zip(("mean", "sd"), mean_sd([v[0] for v in values])))
        f1 = dict(zip(("mean", "sd"), mean_sd([v[1] for v in values])))
        lines.append(f"| {site_names.get(site, site)} | {_pct(acc)} | {_pct(f1)} |")
    return "\n".join(lines)


def _per_site_scores(last: Iterable[RoundRecord], site_names: dict[int, str], summary: dict[str, Any]) -> str:
    """Per site, every metric of ``evaluation.metrics`` on its test split, mean ± sd over repeats."""
    by_site: dict[int, dict[str, list[float | None]]] = defaultdict(lambda: defaultdict(list))
    for record in last:
        for evaluation in record.per_site:
            for key, value in evaluation.test.scores.items():
                by_site[evaluation.site][key].append(value)
    keys = _metric_keys(summary, [{f"scores.{k}": None for site in by_site.values() for k in site}])
    lines = [
        "| Site | " + " | ".join(f"Test {_metric_title(k)}{_metric_unit(k)}" for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for site, values in sorted(by_site.items()):
        cells = []
        for key in keys:
            mean, sd = mean_sd(values.get(key, []))
            cells.append(_metric_cell(summary, {f"scores.{key}": {"mean": mean, "sd": sd}}, key))
        lines.append(f"| {site_names.get(site, site)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _privacy_section(summary: dict[str, Any]) -> str:
    """What each arm's accountant computed, what it protects, and any run stopped by its budget."""
    lines: list[str] = []
    for arm in summary["arms"]:
        runs = arm["federated"]["runs"]
        reports = [p for r in runs for p in r.get("privacy", [])]
        stops = [f"repeat {r['repeat']}: {r['stopped_reason']}" for r in runs if r.get("stopped_reason")]
        if not reports and not stops:
            continue
        lines.append(f"- **{arm['label']}**")
        for mechanism in sorted({p["mechanism"] for p in reports}):
            mine = [p for p in reports if p["mechanism"] == mechanism]
            worst = max(mine, key=lambda p: p["epsilon"])
            sigma = f", noise multiplier {worst['noise_multiplier']:.4g}" if worst.get("noise_multiplier") else ""
            clip = f", clipping norm {worst['max_grad_norm']:g}" if worst.get("max_grad_norm") else ""
            lines.append(
                f"  - `{mechanism}`: accounted ε = {worst['epsilon']:.4f} (worst repeat), δ = {worst['delta']:.1e}, "
                f"unit: {worst['unit']}, accountant: {worst['accountant']}{sigma}{clip}, {worst['steps']} steps"
            )
            for note in dict.fromkeys(n for p in mine for n in p.get("notes", [])):
                lines.append(f"    - {note}")
        for stop in stops:
            lines.append(f"  - run stopped early, {stop}")
    return "\n".join(lines)


def _protection(summary: dict[str, Any]) -> frozenset[str]:
    """Every protection some arm of the run has (``{"none"}`` where none has DP)."""
    return frozenset().union(*(protections(arm.get("privacy_specs", [])) for arm in summary["arms"]))


def _releases_section(summary: dict[str, Any]) -> str:
    """What left the sites outside the DP guarantee (from :mod:`fedcore.releases`), seed
    exposure in the reproducible mode, and the non-private models in this directory."""
    lines: list[str] = []
    if summary.get("reproducible_noise"):
        lines += [
            f"**Not private against anyone who knows the seed ({summary['seed']}):** this run used "
            "`execution.reproducible_noise: true`, so its DP noise, DP sampling and ledger salts were derived "
            "from the seed. Use it for tests and exact replication only.",
            "",
        ]
    by_release: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for arm in summary["arms"]:
        privacy = arm.get("privacy_specs", [])
        protection = protections(privacy)
        if protection == {"none"}:
            by_release[("no DP mechanism: everything sites send is outside any guarantee",)].append(arm["label"])
            continue
        uses = {p.get("use") for p in privacy} | {(arm.get("aggregator") or {}).get("use")}
        if summary.get("metrics"):
            uses.add(EVALUATION)
        by_release[tuple(outside_text(protection, uses))].append(arm["label"])
    lines.append("Released outside the guarantee (every field sites send is declared in `fedcore.releases`):")
    for fields, labels in by_release.items():
        lines.append(f"- arm(s) {', '.join(labels)}:")
        lines += [f"  - {field}" for field in fields]
    centralized = [arm["label"] for arm in summary["arms"] if arm.get("centralized")]
    if centralized and _protection(summary) != {"none"}:
        lines += [
            "",
            "Non-private models in this directory: the centralized baseline (`checkpoints/centralized-*.npz`, "
            "trained on the pooled data without DP); share only the federated checkpoints of DP arms.",
        ]
    return "\n".join(lines)


def _privacy_figure(run_dir: Path, summary: dict[str, Any]) -> list[str]:
    """Test accuracy against the accounted ε, when several arms spend privacy (an ε sweep)."""
    points, references = [], []
    primary = summary.get("primary", "accuracy")
    for arm in summary["arms"]:
        eps = arm["federated"]["aggregate"].get("epsilon_max")
        acc = _metric_stat(summary, arm["federated"]["aggregate"], primary)
        if acc is None:
            continue
        (points if eps is not None else references).append((eps, acc, arm["label"]))
    if len(points) < 2:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points.sort(key=lambda p: p[0])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.errorbar(
        [p[0] for p in points], [100 * p[1]["mean"] for p in points], yerr=[100 * p[1]["sd"] for p in points],
        marker="o", capsize=3, label="with DP (accounted ε)",
    )
    for _, acc, label in references:
        ax.axhline(100 * acc["mean"], linestyle="--", color="gray", label=f"{label} (no DP)")
    ax.set_xscale("log")
    ax.set_xlabel("accounted ε (whole run)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{summary['name']}: accuracy against privacy")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "figures" / "privacy.png", dpi=120)
    plt.close(fig)
    return ["figures/privacy.png"]


def _comparison_rows(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any], str, int]]:
    """(label, aggregate, privacy, repeats) per arm, then, when the spec asks for the local-only
    or cyclic baseline, one row per baseline (centralized included) and the arms it serves."""
    rows = [
        (arm["label"], arm["federated"]["aggregate"], _privacy_text(arm), len(arm["federated"]["runs"])) for arm in summary["arms"]
    ]
    if not any(arm.get(mode) for arm in summary["arms"] for mode in BASELINE_TITLES):
        return rows
    shared = len({arm[mode]["of_arm"] for arm in summary["arms"] for mode in ("centralized", *BASELINE_TITLES) if arm.get(mode)}) == 1
    for mode, title in (("centralized", "Centralized"), *BASELINE_TITLES.items()):
        for arm in summary["arms"]:
            trainings = arm.get(mode)
            if trainings and trainings["of_arm"] == arm["label"]:
                suffix = "" if shared else f" ({arm['label']})"
                rows.append((f"baseline: {title.lower()}{suffix}", trainings["aggregate"], "none", len(trainings["runs"])))
    return rows


def _comparison_table(summary: dict[str, Any]) -> str:
    if summary.get("metrics"):
        keys = _metric_keys(summary, [arm["federated"]["aggregate"] for arm in summary["arms"]])
        lines = [
            "| Arm | " + " | ".join(f"{_metric_title(k)}{_metric_unit(k)}" for k in keys)
            + " | Convergence (epochs) | Time (s per run) | Privacy loss | Repeats |",
            "|---|" + "---|" * (len(keys) + 4),
        ]
        for label, agg, privacy, repeats in _comparison_rows(summary):
            cells = " | ".join(_metric_cell(summary, agg, k) for k in keys)
            lines.append(
                f"| {label} | {cells} | {_num(agg['convergence_epoch'])} | {_num(agg['wall_seconds'])} | {privacy} | {repeats} |"
            )
        return "\n".join(lines)
    lines = [
        "| Arm | Accuracy (%) | Macro F1 (%) | Convergence (epochs) | Time (s per run) | Privacy loss |",
        "|---|---|---|---|---|---|",
    ]
    for label, fed, privacy, _ in _comparison_rows(summary):
        lines.append(
            f"| {label} | {_pct(fed['accuracy'])} | {_pct(fed['f1'])} | {_num(fed['convergence_epoch'])} "
            f"| {_num(fed['wall_seconds'])} | {privacy} |"
        )
    return "\n".join(lines)


#: ledger summary keys shown in Table II, with their column titles
LEDGER_COLUMNS = (
    ("transactions", "Transactions"),
    ("entries", "Entries"),
    ("mean_transaction_ms", "Mean transaction (ms)"),
    ("transactions_per_minute", "Transactions per minute"),
    ("bytes_per_round", "Growth per round (bytes)"),
    ("bytes", "Size (bytes)"),
)


def _ledger_table(summary: dict[str, Any]) -> str:
    """Table II: what the ledger cost, one row per arm and repeat, and its final signed head."""
    rows = [(arm["label"], run) for arm in summary["arms"] for run in arm["federated"]["runs"] if run.get("ledger")]
    if not rows:
        return ""
    first = rows[0][1]["ledger"]
    lines = [
        f"Ledger `{first.get('ledger', '?')}`; consensus: {first.get('consensus', 'n/a')}; "
        f"signatures: {first.get('signature', 'n/a')}."
        + (f" Private signing keys: `{first['keys_dir']}` (outside the run directory)." if first.get("keys_dir") else ""),
        "",
        "| Arm | Repeat | " + " | ".join(title for _, title in LEDGER_COLUMNS) + " | Final head |",
        "|---|---|" + "---|" * len(LEDGER_COLUMNS) + "---|",
    ]
    for label, run in rows:
        ledger = run["ledger"]
        cells = [str(ledger.get(key, "n/a")) for key, _ in LEDGER_COLUMNS]
        lines.append(f"| {label} | {run['repeat']} | " + " | ".join(cells) + f" | `{ledger.get('head', 'n/a')}` |")
    return "\n".join(lines)


def _convergence_metric(summary: dict[str, Any]) -> str:
    primary = summary.get("primary", "accuracy")
    return "accuracy" if primary == "accuracy" else f"{_metric_title(primary)} (the primary metric)"


def build_report(run_dir: Path | str) -> Path:
    """(Re)write ``report.md`` and its figures from ``summary.json`` and ``rounds.jsonl``."""
    from fedcore.rundir import atomic_write_text, incomplete_report, read_status

    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    status = read_status(run_dir)
    if not summary_path.is_file() and (status is not None or (run_dir / "rounds.jsonl").is_file()):
        report = run_dir / "report.md"  # a run that stopped early: render what it holds, labelled incomplete
        atomic_write_text(report, incomplete_report(run_dir, status))
        return report
    if not summary_path.is_file():
        raise FedcoreUserError(
            f"no summary.json in {run_dir}", hint="pass the directory a finished `fedcore run` wrote"
        )
    try:
        summary = Summary.read(summary_path).model_dump()
    except json.JSONDecodeError as exc:
        raise FedcoreUserError(f"{summary_path} is not valid JSON ({exc.msg})", hint="re-run the experiment") from None
    except ValidationError as exc:
        where = ".".join(str(p) for p in exc.errors()[0]["loc"])
        raise FedcoreUserError(
            f"{summary_path}: {where}: {exc.errors()[0]['msg']}", hint="re-run the experiment (or `fedcore report` with this version)"
        ) from None
    records = _load_records(run_dir)
    figures = _figure(run_dir, summary, records)
    figures += _privacy_figure(run_dir, summary)
    figures += leakage_figure(run_dir, summary)
    data = summary["data"]
    out = [f"# fedcore report: {summary['name']}", ""]
    out.append(
        f"{summary['repeats']} repeat(s) of {summary['rounds']} rounds × {summary['local_epochs']} local epochs; "
        f"seed {summary['seed']}; total wall time {summary['total_seconds']:.1f} s."
    )
    out.append("")
    out.append("## Data")
    out.append("")
    out.append("| Site | Train | Validation | Test |")
    out.append("|---|---|---|---|")
    for s in data["sites"]:
        out.append(f"| {s['name']} | {s['train']} | {s['validation']} | {s['test']} |")
    out.append("")
    out.append(f"{data['features']} features; classes: {', '.join(map(str, data['classes']))}.")
    if data.get("released_statistics"):
        out.append(
            "Released by sites during preprocessing (outside any DP guarantee, commitments on the ledger): "
            + ", ".join(data["released_statistics"])
            + "."
        )
    private = _protection(summary) != {"none"}
    withheld = [t for t in data.get("sections", {}) if private and t not in SECTIONS_WITHOUT_COUNTS]
    withheld += [t for t in data.get("withheld_sections", []) if t not in withheld]
    for title, body in data.get("sections", {}).items():
        if title not in withheld:
            out += ["", f"### {title}", "", body]
    if withheld:
        out += ["", f"Withheld under DP (exact per-site counts): {', '.join(withheld)}."]
    out += ["", "## Setup", ""]
    for arm in summary["arms"]:
        setup = arm.get("setup")
        if setup:
            prefix = f"- **{arm['label']}**: " if len(summary["arms"]) > 1 else "- "
            out.append(
                f"{prefix}model `{setup['model']}`, aggregator `{setup['aggregator']}`, privacy "
                f"{', '.join(f'`{p}`' for p in setup['privacy'])}, secure aggregation `{setup['secure_aggregation']}`, "
                f"ledger `{setup['ledger']}`, attacks {', '.join(f'`{a}`' for a in setup['attacks'])}; "
                f"{setup['engine']} engine"
                + (f" ({setup['engine_reason']})" if setup.get("engine_reason") else "")
                + " (every setting: `spec.resolved.yaml`)"
            )
    for arm in summary["arms"]:
        title = "Table I: centralized vs federated" if len(summary["arms"]) == 1 else f"Table I — {arm['label']}"
        out += ["", f"## {title}", "", "Test split, pooled over sites; mean ± sd over repeats.", "", _table_one(summary, arm)]
        site_names = {s["site"]: s["name"] for s in data["sites"]}
        per_site = _per_site_table(records, arm["label"], site_names, summary)
        if per_site:
            out += ["", "Federated model per site (final round):", "", per_site]
        for mode, caption in (
            ("centralized", "Centralized model per site (final epoch):"),
            ("local", "Local-only models, each on its own centre (final epoch):"),
            ("cyclic", "Cyclic model per site (final round):"),
        ):
            if arm.get(mode) and arm[mode]["of_arm"] == arm["label"]:
                table = _per_site_table(records, arm["label"], site_names, summary, mode)
                out += ["", caption, "", table] if table else []
    if len(summary["arms"]) > 1:
        out += ["", "## Comparison of arms", "", _comparison_table(summary)]
    privacy = _privacy_section(summary)
    if privacy or private:
        out += ["", "## Privacy", "", "ε is what the accountant computed for the steps actually run.", "", privacy]
        out += ["", _releases_section(summary)]
    audits = audits_section(summary)
    if audits:
        out += ["", "## Audits: measured leakage", "", audits]
    ledger = _ledger_table(summary)
    if ledger:
        out += ["", "## Table II: ledger", "", ledger]
    out += ["", "## Figures", ""]
    out += [f"![{Path(f).stem}]({f})" for f in figures]
    out += [
        "",
        f"Convergence epoch: the first epoch at which validation {_convergence_metric(summary)} comes within 0.5 points of its "
        "final value and stays there (federated: round × local epochs). Processing time: wall time of a "
        "training; trainings the vectorized engine runs together are each charged an equal share.",
        "",
    ]
    report = run_dir / "report.md"
    report.write_text("\n".join(out))
    return report
