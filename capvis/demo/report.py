"""The demo's report: results table, loss curve, captions of held-out images, attention maps.

Pictures are PNGs next to ``report.md`` and ``report.html`` so either can be opened alone.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from capvis.data.datasets import load_image  # noqa: E402
from capvis.data.tokenizer import Tokenizer  # noqa: E402
from capvis.data.transforms import build_eval_transform  # noqa: E402
from capvis.models.decoding import decode  # noqa: E402

TASK_TITLES = {"shape": "shape presence", "color_shape": "colour-shape presence", "count": "object count",
               "leftmost_color": "leftmost colour", "topmost_shape": "topmost shape",
               "largest_color_shape": "largest colour-shape"}
METRIC_TITLES = {"mAP": "mAP", "top1": "top-1"}


def loss_curve(metrics: Sequence[dict[str, Any]], path: Path) -> Path:
    rows = [r for r in metrics if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    ax.plot([r["iteration"] for r in rows], [r["loss"] for r in rows], label="total (forward + backward)")
    for key, style in (("loss_forward", "--"), ("loss_backward", ":")):
        if rows and key in rows[0]:
            ax.plot([r["iteration"] for r in rows], [r[key] for r in rows], style, label=key.replace("_", " "))
    ax.set_xlabel("iteration")
    ax.set_ylabel("caption cross-entropy")
    ax.set_title("bicaptioning pretraining on CaptionWorld")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def load_images(paths: Sequence[Path], image_size: int) -> tuple[torch.Tensor, list[np.ndarray]]:
    """The eval-transformed batch a captioner reads, and the untransformed pictures a figure shows."""
    transform = build_eval_transform(image_size, image_size)
    raw = [load_image(p) for p in paths]
    return torch.stack([transform(r) for r in raw]), [r.permute(1, 2, 0).numpy() for r in raw]


def caption_images(task: Any, tokenizer: Tokenizer, paths: Sequence[Path], image_size: int, *,
                   max_steps: int, attention: bool = False) -> tuple[list[str], Any, list[np.ndarray]]:
    batch, pictures = load_images(paths, image_size)
    decoded = decode(task, batch, method="beam", beam_size=5, max_steps=max_steps, return_attention=attention)
    return [tokenizer.decode(t) for t in decoded.tokens], decoded, pictures


def caption_grid(pictures: Sequence[np.ndarray], captions: Sequence[str], truths: Sequence[str], path: Path,
                 columns: int = 4) -> Path:
    rows = (len(pictures) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 4.2 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, picture, caption, truth in zip(axes.flat, pictures, captions, truths):
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.imshow(picture, interpolation="nearest")
        ax.set_xlabel(_wrap(f"model: {caption}") + "\n" + _wrap(f"reference: {truth}"), fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def confusion_figure(cells: Mapping[tuple[str, str], int], path: Path) -> Path:
    """Counts of (true, said) pairs as a matrix, each row shaded by its share, the counts written in."""
    labels = sorted({t for t, _ in cells} | {s for _, s in cells})
    counts = np.array([[cells.get((t, s), 0) for s in labels] for t in labels], dtype=float).reshape(len(labels),
                                                                                                   len(labels))
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    size = 1.2 + 0.55 * max(len(labels), 1)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=100)
    if labels:
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    else:
        ax.text(0.5, 0.5, "no mention to count", ha="center", va="center", transform=ax.transAxes)
    for (i, j), n in np.ndenumerate(counts):
        if n:
            ax.text(j, i, f"{int(n)}", ha="center", va="center", fontsize=8,
                    color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("shape the caption says")
    ax.set_ylabel("shape of the object of that colour")
    ax.set_title("shapes in generated captions")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _wrap(text: str, width: int = 44) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join([*lines, line])


def results_table(results: dict[str, dict[str, float]], metrics: dict[str, str] | None = None
                  ) -> tuple[list[str], list[list[str]]]:
    """One row per method, one column per task, titled with the task's metric (default mAP)."""
    tasks = list(next(iter(results.values())))
    metrics = metrics or {}
    header = ["method", *[f"{TASK_TITLES.get(t, t)} {METRIC_TITLES.get(metrics.get(t, 'mAP'))}" for t in tasks]]
    rows = [[method, *[f"{scores[t]:.1f}" for t in tasks]] for method, scores in results.items()]
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def write_reports(out: Path, *, title: str, intro: str, table: tuple[list[str], list[list[str]]],
                  sections: Sequence[tuple[str, str, str | None]]) -> tuple[Path, Path]:
    """``sections``: (heading, text, picture file name or None)."""
    md = [f"# {title}", "", intro, "", markdown_table(*table), ""]
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>", _html_table(*table)]
    for heading, text, picture in sections:
        md += [f"## {heading}", "", text, ""]
        body += [f"<h2>{html.escape(heading)}</h2>", f"<p>{html.escape(text)}</p>"]
        if picture:
            md += [f"![{heading}]({picture})", ""]
            body.append(f'<img src="{html.escape(picture)}" alt="{html.escape(heading)}" style="max-width:100%">')
    (out / "report.md").write_text("\n".join(md))
    style = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}td,th{padding:4px 10px;border:1px solid #ccc}"
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
                                     f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")
    return out / "report.md", out / "report.html"


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
