"""Benchmark results: ``results.csv`` rows per run, statistics over seeds, the summary tables and plots.

Per run and class the evaluation's means become a row of ``results.csv`` (:func:`result_rows`);
:func:`summarise` turns the rows into mean +- SD over seeds per budget, run and class, with the
Dice gain over ``lower`` and the share of the lower-upper gap closed; :func:`summary_markdown` and
:func:`plot_summary` present them; :func:`write_report` writes all of it into the results folder.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnunet_mixsup.fileio import atomic_write_csv, atomic_write_text
from nnunet_mixsup.lab.benchmark.config import (
    BASELINE_TRAINER,
    LOWER,
    UPPER,
    BenchmarkConfig,
    BenchmarkError,
    annotation_cost,
)

if TYPE_CHECKING:
    from nnunet_mixsup.lab.benchmark.runner import DenseDataset, Run, SimDataset

SUMMARY_COLUMNS = ("budget", "n_mask", "run", "trainer", "class", "n_seeds", "seeds", "dice_mean", "dice_sd",
                   "hd95_mean", "hd95_sd", "nsd_mean", "nsd_sd", "n_cases", "n_missed", "n_hallucinated", "cost",
                   "gain_mean", "gain_sd", "gap_closed")

RESULT_COLUMNS = ("budget", "seed", "run", "trainer", "class", "label", "dice", "hd95", "nsd", "n_cases", "n_missed",
                  "n_hallucinated", "n_mask", "n_box", "n_tags", "n_none", "cost", "dataset", "fold")


# ----------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------
def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample SD (ddof 1); NaN where undefined (no value, or one for the SD).

    A NaN or ``None`` among the values makes both NaN: a missing value is never skipped, which
    would silently average over fewer seeds than ``n_seeds`` says.
    """
    v = [math.nan if x is None else float(x) for x in values]
    if not v or any(math.isnan(x) for x in v):
        return math.nan, math.nan
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, math.nan
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def gap_closed(mixsup: float, lower: float, upper: float) -> float:
    """Share of the lower-upper gap a method closes: ``(mixsup - lower) / (upper - lower)``.

    1 = as good as full supervision, 0 = no better than the mask-only baseline, negative = worse.
    NaN when an input is NaN or ``upper <= lower`` (no gap to close).
    """
    if any(math.isnan(x) for x in (mixsup, lower, upper)) or upper - lower <= 0:
        return math.nan
    return (mixsup - lower) / (upper - lower)


def dice_gain_points(mixsup: float, lower: float) -> float:
    """Dice gain over the mask-only baseline in Dice points (``100 * (mixsup - lower)``)."""
    return 100.0 * (mixsup - lower)


def _num(v: Any) -> float:
    if v is None or v == "":
        return math.nan
    return float(v)


def result_rows(run: Run, summary: dict, dense: DenseDataset, costs: dict[str, float]) -> list[dict]:
    """results.csv rows of one run from an evaluation ``summary.json`` (per class and the mean).

    Refuses an evaluation made with other metric definitions than the current
    :data:`nnunet_mixsup.evaluation.METRICS_VERSION` (e.g. pooled HD95 with NaN for missed classes):
    its numbers are not comparable with the others.
    """
    from nnunet_mixsup.evaluation import METRICS_VERSION

    version = summary.get("settings", {}).get("metrics_version")
    if version != METRICS_VERSION:
        raise BenchmarkError(f"the evaluation of {run.key} was made with older metric definitions (metrics_version "
                             f"{version}, now {METRICS_VERSION}: HD95 was one percentile of both directions pooled "
                             "and NaN for a missed class); evaluate it again")
    base = {"budget": run.budget, "seed": run.seed, "run": run.run, "trainer": run.trainer,
            "n_mask": run.counts["mask"], "n_box": run.counts["box"], "n_tags": run.counts["tags"],
            "n_none": run.counts["none"], "cost": annotation_cost(run.counts, costs), "dataset": run.dataset_id,
            "fold": run.fold}
    if run.run != UPPER:
        base["n_mask_budget"] = run.n_mask_budget
    rows = []
    for lab in [*dense.labels, "mean"]:
        s = summary["summary"][str(lab)]
        rows.append({**base, "class": dense.label_names[lab] if lab != "mean" else "mean", "label": lab,
                     **{m: _num(s[m]["mean"]) for m in ("dice", "hd95", "nsd")},
                     **{k: int(s[k]) for k in ("n_cases", "n_missed", "n_hallucinated")}})
    return rows


def _summary_input(rows: list[dict]) -> list[dict]:
    """Rows for :func:`summarise`: ``n_mask`` of lower / MixSup rows is the budget's mask cases."""
    return [{**r, "n_mask": r.get("n_mask_budget", r["n_mask"])} for r in rows]


def summarise(rows: Sequence[dict]) -> list[dict]:
    """Summary rows from result rows (see :func:`result_rows`), per budget, run and class.

    Statistics are over seeds. For each budget the ``upper`` row uses the upper-bound runs of the
    seeds that budget has. ``n_cases`` / ``n_missed`` / ``n_hallucinated`` are summed over the
    seeds (test cases scored, and those where the class was missed / hallucinated). ``gain_mean`` /
    ``gain_sd``: Dice points over ``lower``, from the per-seed differences (seeds with both runs);
    ``gap_closed`` from the seed means of the seeds that have lower, the run and upper (MixSup runs
    only). A metric that is NaN for one of the seeds makes its mean NaN (see :func:`mean_sd`).
    """
    budgets: dict[str, int] = {}
    runs: list[str] = []
    classes: list[str] = []
    by_key: dict[tuple, dict] = {}
    for r in rows:
        if r["budget"] != "all":
            budgets.setdefault(r["budget"], int(r["n_mask"]))
        if r["run"] not in runs:
            runs.append(r["run"])
        if r["class"] not in classes:
            classes.append(r["class"])
        budget = "all" if r["run"] == UPPER else r["budget"]
        by_key[(budget, r["run"], int(r["seed"]), r["class"])] = r
    if "mean" in classes:
        classes = [c for c in classes if c != "mean"] + ["mean"]
    order = [LOWER] * (LOWER in runs) + [x for x in runs if x not in (LOWER, UPPER)] + [UPPER] * (UPPER in runs)
    out: list[dict] = []
    for b in sorted(budgets, key=lambda k: (budgets[k], k)):
        seeds = sorted({s for (bb, _run, s, _c) in by_key if bb == b})
        for run in order:
            for cls in classes:
                got = {rn: {s: by_key.get(("all" if rn == UPPER else b, rn, s, cls)) for s in seeds}
                       for rn in {run, LOWER, UPPER}}
                have = [s for s in seeds if got[run][s] is not None]
                if not have:
                    continue
                sel = [got[run][s] for s in have]
                entry: dict[str, Any] = {"budget": b, "n_mask": budgets[b], "run": run,
                                         "trainer": sel[0]["trainer"], "class": cls, "n_seeds": len(have),
                                         "seeds": " ".join(str(s) for s in have)}
                for m in ("dice", "hd95", "nsd"):
                    entry[f"{m}_mean"], entry[f"{m}_sd"] = mean_sd([_num(x[m]) for x in sel])
                for k in ("n_cases", "n_missed", "n_hallucinated"):
                    entry[k] = sum(int(x[k]) for x in sel)
                entry["cost"] = mean_sd([_num(x["cost"]) for x in sel])[0]
                entry["gain_mean"] = entry["gain_sd"] = entry["gap_closed"] = math.nan
                if run != LOWER:
                    paired = [s for s in have if got[LOWER][s] is not None]
                    entry["gain_mean"], entry["gain_sd"] = mean_sd(
                        [dice_gain_points(_num(got[run][s]["dice"]), _num(got[LOWER][s]["dice"])) for s in paired])
                if run not in (LOWER, UPPER):
                    common = [s for s in have if got[LOWER][s] is not None and got[UPPER][s] is not None]
                    if common:
                        means = [mean_sd([_num(got[rn][s]["dice"]) for s in common])[0] for rn in (run, LOWER, UPPER)]
                        entry["gap_closed"] = gap_closed(*means)
                out.append(entry)
    return out


# ----------------------------------------------------------------------------------------------------------
# tables and plots
# ----------------------------------------------------------------------------------------------------------
def _pm(m: float, s: float, digits: int = 3) -> str:
    if math.isnan(m):
        return "–"
    return f"{m:.{digits}f}" + ("" if math.isnan(s) else f" ± {s:.{digits}f}")


def summary_markdown(summary: Sequence[dict], headings: dict[str, str] | None = None, notes: str = "") -> str:
    """The summary as Markdown: one table per budget, Dice per class and the means, gain and gap closed."""
    headings = headings or {}
    lines = ["# Benchmark summary", ""]
    if notes:
        lines += [notes, ""]
    lines += [("Values: mean ± SD over seeds. Gain: mean Dice points over `lower` (per-seed differences). "
               "Gap closed: (run − lower) / (upper − lower) on the seed means of the mean Dice. "
               "Missed / hallucinated: test cases in which a class was predicted absent although present / "
               "predicted although absent, summed over classes and seeds; they score Dice 0, NSD 0 and "
               "HD95 the image diagonal (HD95: the larger of the two directed 95th percentiles)."), ""]
    for b in dict.fromkeys(e["budget"] for e in summary):
        ent = [e for e in summary if e["budget"] == b]
        classes = [c for c in dict.fromkeys(e["class"] for e in ent) if c != "mean"]
        lines += [f"## masks {b}" + (f": {headings[b]}" if b in headings else ""), ""]
        head = ["run", "trainer", "seeds", "cost"] + [f"Dice {c}" for c in classes] + \
               ["mean Dice", "mean HD95 (mm)", "mean NSD", "missed / hallucinated", "gain (Dice pts)", "gap closed"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for run in dict.fromkeys(e["run"] for e in ent):
            by_c = {e["class"]: e for e in ent if e["run"] == run}
            mean = by_c.get("mean")
            first = next(iter(by_c.values()))
            cells = [run, f"`{first['trainer']}`", str(first["n_seeds"]), f"{first['cost']:.2f}"]
            cells += [_pm(by_c[c]["dice_mean"], by_c[c]["dice_sd"]) if c in by_c else "–" for c in classes]
            if mean is None:
                cells += ["–"] * 6
            else:
                gain = "–" if math.isnan(mean["gain_mean"]) else \
                    f"{mean['gain_mean']:+.1f}" + ("" if math.isnan(mean["gain_sd"]) else f" ± {mean['gain_sd']:.1f}")
                gap = "–" if math.isnan(mean["gap_closed"]) else f"{100 * mean['gap_closed']:.0f} %"
                cells += [_pm(mean["dice_mean"], mean["dice_sd"]), _pm(mean["hd95_mean"], mean["hd95_sd"], 2),
                          _pm(mean["nsd_mean"], mean["nsd_sd"]), f"{mean['n_missed']} / {mean['n_hallucinated']}",
                          gain, gap]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    """CSV with the given columns (NaN as ``nan``), written atomically."""
    atomic_write_csv(path, [list(columns), *([r.get(c, "") for c in columns] for r in rows)])


def _mark_misses(ax: Any, entry: dict, x: float, y: float, colour: str) -> None:
    """Label a plotted point with its missed / hallucinated case counts, if any."""
    if entry["n_missed"] or entry["n_hallucinated"]:
        ax.annotate(f"{entry['n_missed']} missed, {entry['n_hallucinated']} halluc.", (x, y),
                    textcoords="offset points", xytext=(4, -10), fontsize=7, color=colour)


def plot_summary(summary: Sequence[dict], out_dir: Path, costs: dict[str, float]) -> list[Path]:
    """``dice_vs_budget.png`` and ``dice_vs_cost.png`` from the mean-over-classes summary rows.

    A point whose runs missed or hallucinated a class in some test cases is labelled
    ``"<n> missed, <m> halluc."`` (summed over classes and seeds, see :func:`summarise`).
    """
    try:
        import matplotlib

        matplotlib.use("agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[benchmark] matplotlib is not installed: no plots (pip install matplotlib)", flush=True)
        return []
    mean = [e for e in summary if e["class"] == "mean"]
    runs = list(dict.fromkeys(e["run"] for e in mean))
    budgets = sorted({(e["n_mask"], e["budget"]) for e in mean})
    colours = {LOWER: "#888888", UPPER: "#3366cc"}
    palette = ["#22aa77", "#dd7722", "#aa3377", "#66aacc", "#bbbb33", "#993322"]
    paths = []
    for kind in ("budget", "cost"):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        k = 0
        for run in runs:
            ent = sorted((e for e in mean if e["run"] == run), key=lambda e: e["n_mask"])
            col = colours.get(run)
            if col is None:
                col = palette[k % len(palette)]
                k += 1
            y = [e["dice_mean"] for e in ent]
            err = [0.0 if math.isnan(e["dice_sd"]) else e["dice_sd"] for e in ent]
            if kind == "budget" and run == UPPER:
                m, s = y[0], err[0]
                ax.axhline(m, color=col, ls="--", label=f"{UPPER} (all cases masked)")
                if s:
                    ax.axhspan(m - s, m + s, color=col, alpha=0.12)
                _mark_misses(ax, ent[0], max(n for n, _ in budgets), m, col)
                continue
            if run == UPPER:
                x, y, err, ent = [ent[0]["cost"]], y[:1], err[:1], ent[:1]
            else:
                x = [e["n_mask"] if kind == "budget" else e["cost"] for e in ent]
            for e, xi, yi in zip(ent, x, y):
                _mark_misses(ax, e, xi, yi, col)
            ax.errorbar(x, y, yerr=err, color=col, marker="*" if run == UPPER else "o", capsize=3,
                        label={LOWER: "lower (mask cases only)", UPPER: "upper (all cases masked)"}.get(
                            run, f"{run} (masks + weak labels)"))
        if kind == "budget":
            ax.set_xticks([n for n, _ in budgets], [f"{n}\n({b})" for n, b in budgets])
            ax.set_xlabel("mask cases in the training set (budget)")
        else:
            ax.set_xlabel(f"annotation cost per training set (mask {costs['mask']:g}, box {costs['box']:g}, "
                          f"tags {costs['tags']:g}, unlabelled {costs.get('none', 0.0):g})")
        ax.set_ylabel("mean Dice on the test split (± SD over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"dice_vs_{kind}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(out: Path, rows: list[dict], cfg: BenchmarkConfig, dense: DenseDataset, sims: Sequence[SimDataset],
                 plans_configuration: dict[str, Any]) -> None:
    """``results.csv``, ``summary.csv``, ``summary.md`` and the plots into ``out``; the summary tables to stdout.

    ``plans_configuration``: the shared plans' entry for the configuration (patch and batch size for the notes).
    """
    write_csv(out / "results.csv", RESULT_COLUMNS, rows)
    summary_rows = summarise(_summary_input(rows))
    write_csv(out / "summary.csv", SUMMARY_COLUMNS, summary_rows)
    n = len(dense.case_ids)
    cm = plans_configuration
    headings = {s.budget: f"{s.counts['mask']} mask, {s.counts['box']} box, {s.counts['tags']} tags, "
                          f"{s.counts['none']} unlabelled of {n} training cases" for s in sims}
    notes = (f"Dense dataset `{dense.name}` ({n} training, {len(dense.test_ids)} test cases), configuration "
             f"`{cfg.configuration}`, plans `{cfg.plans_name}` (patch {cm['patch_size']}, batch {cm['batch_size']}) "
             f"for every run, {cfg.epochs} epochs x {cfg.iterations} iterations, scenario `{cfg.scenario}` (boxes "
             f"share {cfg.boxes_share:g}, tags share {cfg.tags_share:g} of the non-mask cases). Annotation cost per "
             f"case: mask {cfg.costs['mask']:g}, box {cfg.costs['box']:g}, tags {cfg.costs['tags']:g}, unlabelled "
             f"{cfg.costs['none']:g}. `lower`: {BASELINE_TRAINER} on the mask cases only; `upper`: "
             f"{BASELINE_TRAINER} on all cases fully masked.")
    atomic_write_text(out / "summary.md", summary_markdown(summary_rows, headings, notes))
    atomic_write_text(out / "results_page.md", results_page(summary_markdown(summary_rows, headings, notes), cfg))
    plot_summary(summary_rows, out, cfg.costs)
    print(summary_markdown(summary_rows, headings), flush=True)


def machine_description() -> str:
    """CPU model and cores, memory, GPU (if any), Python, torch and nnunetv2 versions: where a result was measured."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        mem = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        mem = ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    try:
        from importlib.metadata import version
        nnunet = version("nnunetv2")
    except Exception:  # noqa: BLE001 - a missing distribution only drops a version from the description
        nnunet = "?"
    return (f"{cpu}, {os.cpu_count()} cores{mem}, {gpu}; Python {platform.python_version()}, torch "
            f"{torch.__version__}, nnunetv2 {nnunet}")


def results_page(summary_md: str, cfg: BenchmarkConfig) -> str:
    """A results section for ``docs/BENCHMARKS.md``: the command that ran, the machine, the date, the summary.

    Written beside ``summary.md`` as ``results_page.md``; paste it into the docs unchanged, so every
    published number carries its command and machine.
    """
    import shlex
    import sys
    from datetime import date

    command = " ".join(["nnunet-mixsup", *map(shlex.quote, sys.argv[1:])]) if sys.argv[1:] else "(called from Python)"
    return (f"## `{cfg.preset}` preset, {date.today().isoformat()}\n\n"
            f"Command: `{command}`  \nMachine: {machine_description()}\n\n{summary_md}")
