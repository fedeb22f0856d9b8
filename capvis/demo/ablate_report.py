"""The ablation's outputs: ``ablation.csv`` (every score), ``ablation.md`` (final budget, mean ± std over
seeds, and which differences exceed the seed spread), ``ablation.png`` (each eval task's metric against
images seen, one line per pretext task, spread shaded) and, when several data fractions were run,
``ablation_data.png`` (final-budget metric against the fraction of the data: the paper's Figure 4).

A difference between two settings "exceeds the seed spread" when their means differ by more than the
sum of their standard deviations over seeds (sample std); with one seed the spread is unknown and no
difference is called.

The zero-shot and retrieval cells (:mod:`capvis.demo.ablate_family`: ``family_method``, ``zeroshot_*``,
``i2t_r@K``, ``t2i_r@K``, ...) are extra CSV columns on the final checkpoint's rows, empty for a task that
can do neither, and two more tables of ``ablation.md``; the plots show the label tasks only.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from capvis.demo import report  # noqa: E402
from capvis.demo.ablate_family import FAMILY_COLUMNS, RECALLS, RETRIEVAL_IMAGES, TEMPLATES, ZEROSHOT_IMAGES  # noqa: E402

COLUMNS = ["task", "seed", "fraction", "captions_per_image", "iteration", "images_seen", "eval_task", "metric",
           "value", "seconds", "eval_seconds", *FAMILY_COLUMNS]
CHANCE = {"zeroshot_top1": "zeroshot_chance", "zeroshot_mAP": "zeroshot_mAP_chance"}
CHANCE_METRIC = {"zeroshot_top1": "top1", "zeroshot_mAP": "mAP"}
RECALL_TITLES = {"i2t_r@1": "image→text R@1", "i2t_r@5": "image→text R@5", "t2i_r@1": "text→image R@1",
                 "t2i_r@5": "text→image R@5"}
METRIC_NAMES = {"mAP": "mAP", "top1": "top-1 %"}

Setting = tuple[str, Any, Any]  # (task, fraction, captions_per_image)


def _setting(row: dict[str, Any]) -> Setting:
    return row["task"], row["fraction"], row["captions_per_image"]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


def final_scores(rows: Sequence[dict[str, Any]]) -> dict[tuple[Setting, str], list[float]]:
    """``(setting, eval task) -> [value per seed]`` at each run's largest number of images seen."""
    last: dict[tuple[Setting, Any], int] = {}
    for r in rows:
        key = (_setting(r), r["seed"])
        last[key] = max(last.get(key, -1), int(r["images_seen"]))
    out: dict[tuple[Setting, str], list[float]] = defaultdict(list)
    for r in rows:
        if int(r["images_seen"]) == last[(_setting(r), r["seed"])]:
            out[(_setting(r), r["eval_task"])].append(float(r["value"]))
    return out


def _label(setting: Setting, vary_data: bool) -> str:
    task, fraction, captions = setting
    if not vary_data or fraction == "":
        return task
    return f"{task} ({float(fraction):g} data, {captions} cap.)"


def spread_sentences(stats: dict[tuple[Setting, str], tuple[float, float]], settings: Sequence[Setting],
                     evals: Sequence[tuple[str, str]], vary_data: bool) -> list[str]:
    """One line per eval task naming the pairs whose means differ by more than std_a + std_b."""
    lines = []
    for task, metric in evals:
        wins = []
        for a in settings:
            for b in settings:
                (ma, sa), (mb, sb) = stats[(a, task)], stats[(b, task)]
                if a != b and ma - mb > sa + sb:  # NaN spread (one seed) is never exceeded
                    wins.append(f"{_label(a, vary_data)} > {_label(b, vary_data)} (+{ma - mb:.1f}, spread "
                                f"{sa + sb:.1f})")
        name = f"{report.TASK_TITLES.get(task, task)} ({METRIC_NAMES.get(metric, metric)})"
        lines.append(f"- **{name}**: " + ("; ".join(wins) + "; every other difference is within the spread."
                                          if wins else "no difference exceeds the seed spread."))
    return lines


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    finals = final_scores(rows)
    settings = list(dict.fromkeys(_setting(r) for r in rows))
    evals = list(dict.fromkeys((r["eval_task"], r["metric"]) for r in rows))
    stats = {k: _mean_std(v) for k, v in finals.items()}
    seeds = sorted({r["seed"] for r in rows})
    vary_data = len({(s[1], s[2]) for s in settings if s[1] != ""}) > 1
    seconds = defaultdict(list)
    for r in rows:
        seconds[_setting(r)].append(float(r["seconds"]))
    header = ["pretext task", *[f"{report.TASK_TITLES.get(t, t)} {METRIC_NAMES.get(m, m)}" for t, m in evals],
              "pretraining s"]
    if vary_data:
        header[1:1] = ["data fraction", "captions/image"]

    def cell(mean: float, std: float) -> str:
        return "n/a" if math.isnan(mean) else f"{mean:.1f}" + ("" if math.isnan(std) else f" ± {std:.1f}")

    table = []
    for s in settings:
        row = [s[0], *[cell(*stats[(s, t)]) for t, _ in evals], f"{max(seconds[s]):.0f}"]
        if vary_data:
            row[1:1] = [str(s[1]) or "-", str(s[2]) or "-"]
        table.append(row)
    n = len(seeds)
    intro = (f"Frozen features of each pretraining run at its final budget, scored on every labels task: "
             f"multi-label tasks by the VOC07 SVM protocol (mAP), single-label tasks by a linear probe on "
             f"frozen features (top-1 %). Values are the mean ± std over {n} seed{'s' * (n > 1)} "
             f"({', '.join(map(str, seeds))}); `ablation.csv` has every checkpoint (1/4, 1/2, all of the budget).")
    if n > 1:
        rule = ("A difference exceeds the seed spread when the two means differ by more than the sum of "
                "their standard deviations:")
        words = [rule, "", *spread_sentences(stats, settings, evals, vary_data)]
    else:
        words = ["One seed: the seed spread is unknown, so no difference is called (run with `--seeds 2` or more)."]
    return "\n".join(["# Pretext-task ablation", "", intro, "", report.markdown_table(header, table), "",
                      "## Differences beyond the seed spread", "", *words, "", *family_markdown(rows)])


def _cell(mean: float, std: float) -> str:
    """Mean ± std; blank (not 0) where no seed has a value: the task cannot be scored this way."""
    return "" if math.isnan(mean) else f"{mean:.1f}" + ("" if math.isnan(std) else f" ± {std:.1f}")


def _family_values(rows: Sequence[dict[str, Any]], setting: Setting, column: str, eval_task: str | None = None
                   ) -> list[float]:
    """One value per seed of ``column`` at the setting's final checkpoint (of ``eval_task``, or any row)."""
    last: dict[Any, int] = {}
    for r in rows:
        if _setting(r) == setting:
            last[r["seed"]] = max(last.get(r["seed"], -1), int(r["images_seen"]))
    per_seed: dict[Any, float] = {}
    for r in rows:
        value = r.get(column, "")
        if (_setting(r) == setting and int(r["images_seen"]) == last[r["seed"]] and value not in ("", None)
                and (eval_task is None or r["eval_task"] == eval_task)):
            per_seed[r["seed"]] = float(value)
    return list(per_seed.values())


def family_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The zero-shot and retrieval tables (final budget, mean ± std over seeds); [] when no run has them."""
    if not any(r.get("family_method") for r in rows):
        return []
    settings = list(dict.fromkeys(_setting(r) for r in rows))
    vary_data = len({(s[1], s[2]) for s in settings if s[1] != ""}) > 1
    evals = list(dict.fromkeys((r["eval_task"], r["metric"]) for r in rows))
    zs_cols = [(t, "zeroshot_top1") for t, _ in evals] + [(t, "zeroshot_mAP") for t, m in evals if m == "mAP"]
    methods = {s: next((r["family_method"] for r in rows if _setting(r) == s and r.get("family_method")), "")
               for s in settings}

    def stat(s: Setting, column: str, eval_task: str | None = None) -> str:
        return _cell(*_mean_std(_family_values(rows, s, column, eval_task)))

    def chance(column: str, eval_task: str) -> str:  # the labels' alone, the same for every run
        values = [v for s in settings for v in _family_values(rows, s, CHANCE[column], eval_task)]
        return f"{values[0]:.1f}" if values else ""

    zs_header = ["pretext task", "method", *[f"{report.TASK_TITLES.get(t, t)} {METRIC_NAMES[CHANCE_METRIC[c]]}"
                                             for t, c in zs_cols]]
    zs_table = [[_label(s, vary_data), methods[s], *[stat(s, c, t) for t, c in zs_cols]] for s in settings]
    zs_table.append(["chance", "", *[chance(c, t) for t, c in zs_cols]])
    ret_table = [[_label(s, vary_data), methods[s], *[stat(s, c) for c in RECALLS]] for s in settings]
    pools = {(int(r["retrieval_images"]), int(r["retrieval_captions"])) for r in rows
             if r.get("retrieval_images") not in ("", None)}
    pool = (", ".join(f"{i} images and their {c} captions" for i, c in sorted(pools))
            if pools else f"up to {RETRIEVAL_IMAGES} images")
    n_templates = len(TEMPLATES)
    n_zeroshot = max((int(r["zeroshot_images"]) for r in rows if r.get("zeroshot_images") not in ("", None)),
                     default=0)
    intro = ("The runs whose task embeds images and text (contrastive, siglip, coca) are scored by **embedding** "
             "cosine, those whose task gives caption likelihoods (captioning, bicaptioning) by **likelihood** "
             "(the `method` column); CoCa, which has both, by embedding. A blank cell: the task can do neither "
             "(or, for mAP, the label task is single-label). Final checkpoint only; percentages, mean ± std "
             "over seeds.")
    zs_words = (f"No label is trained on: class names in the template{'s' * (n_templates > 1)} "
                f"{', '.join(f'`{t}`' for t in TEMPLATES)}, scored on the first {n_zeroshot} test images (at "
                f"most {ZEROSHOT_IMAGES}; per task, those with a label). Top-1 counts a multi-label image when "
                f"the prediction is any of its classes, hence the chance row (mean |labels| / classes); mAP for "
                f"the multi-label tasks.")
    ret_words = (f"Recall@K both ways on the first validation captions: {pool} (a capped pool, so every pair is "
                 f"scored; the val images also train the probes, but pretraining never sees them).")
    return ["## Zero-shot classification and retrieval", "", intro, "", "### Zero-shot classification", "",
            zs_words, "", report.markdown_table(zs_header, zs_table), "", "### Image-text retrieval", "",
            ret_words, "", report.markdown_table(["pretext task", "method", *[RECALL_TITLES[c] for c in RECALLS]],
                                                 ret_table), ""]


def _curves(rows: Sequence[dict[str, Any]], setting: Setting, task: str) -> tuple[list[int], list[float], list[float]]:
    by_x: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        if _setting(r) == setting and r["eval_task"] == task:
            by_x[int(r["images_seen"])].append(float(r["value"]))
    xs = sorted(by_x)
    stats = [_mean_std(by_x[x]) for x in xs]
    return xs, [m for m, _ in stats], [0.0 if math.isnan(s) else s for _, s in stats]


def _panels(n: int) -> tuple[Any, np.ndarray]:
    """A grid of ``n`` panels, at most three a row."""
    cols, rows = min(3, n), math.ceil(n / 3)
    return plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=100, squeeze=False)


def short_count(x: float, _pos: Any = None) -> str:
    """A tick label for a count of images: 48000 -> 48k, 1500000 -> 1.5M (full numbers run into each other)."""
    for size, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(x) >= size:
            return f"{x / size:g}{suffix}"
    return f"{x:g}"


def _finish_panels(fig: Any, axes: np.ndarray, evals: Sequence[tuple[str, str]], xlabel: str, path: Path) -> None:
    """Titles, axis labels and grids of the panels in use, the spare ones blanked, one legend; saved."""
    for ax, (task, metric) in zip(axes.flat, evals):
        ax.set_title(report.TASK_TITLES.get(task, task), fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(METRIC_NAMES.get(metric, metric), fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(evals):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """One panel per eval task: metric against images seen, a line per setting, mean ± std shaded."""
    evals = list(dict.fromkeys((r["eval_task"], r["metric"]) for r in rows))
    settings = list(dict.fromkeys(_setting(r) for r in rows))
    vary_data = len({(s[1], s[2]) for s in settings if s[1] != ""}) > 1
    fig, axes = _panels(len(evals))
    for ax, (task, _) in zip(axes.flat, evals):
        for k, s in enumerate(settings):
            xs, mean, std = _curves(rows, s, task)
            color = f"C{k % 10}"
            lo, hi = np.subtract(mean, std), np.add(mean, std)
            if xs == [0]:  # random init: a baseline across the panel
                ax.axhline(mean[0], color=color, ls="--", lw=1, label=_label(s, vary_data))
                ax.axhspan(lo[0], hi[0], color=color, alpha=0.12)
                continue
            ax.plot(xs, mean, marker="o", ms=3, color=color, label=_label(s, vary_data))
            ax.fill_between(xs, lo, hi, color=color, alpha=0.18)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.xaxis.set_major_formatter(FuncFormatter(short_count))
    _finish_panels(fig, axes, evals, "images seen", path)


def plot_data_efficiency(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Final-budget metric against the fraction of the data, a line per (task, captions per image)."""
    finals = final_scores(rows)
    evals = list(dict.fromkeys((r["eval_task"], r["metric"]) for r in rows))
    lines = list(dict.fromkeys((s[0], s[2]) for s, _ in finals if s[1] != ""))
    fig, axes = _panels(len(evals))
    for ax, (task, _) in zip(axes.flat, evals):
        for k, (name, captions) in enumerate(lines):
            points = sorted((float(s[1]), *_mean_std(v)) for (s, t), v in finals.items()
                            if t == task and s[0] == name and s[2] == captions)
            xs, mean, std = (np.array([p[i] for p in points]) for i in range(3))
            std = np.nan_to_num(std)
            ax.plot(xs, mean, marker="o", ms=3, color=f"C{k % 10}", label=f"{name}, {captions} cap./image")
            ax.fill_between(xs, mean - std, mean + std, color=f"C{k % 10}", alpha=0.18)
    _finish_panels(fig, axes, evals, "fraction of the training images", path)


def write_outputs(rows: Sequence[dict[str, Any]], out: Path) -> None:
    """``ablation.csv``, ``ablation.md``, ``ablation.png`` (and ``ablation_data.png``) under ``out``."""
    with (out / "ablation.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "ablation.md").write_text(markdown(rows))
    plot_curves(rows, out / "ablation.png")
    if len({r["fraction"] for r in rows if r["fraction"] != ""}) > 1:
        plot_data_efficiency(rows, out / "ablation_data.png")
