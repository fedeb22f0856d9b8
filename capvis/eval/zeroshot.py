"""Zero-shot classification with prompt templates: by embedding (CLIP) or by caption likelihood (CapPa).

Each class name is put into every template ("a photo of a {}.") and tokenized with the checkpoint's
own vocabulary. Two ways to score an image against a class (``method``):

* ``embedding`` (CLIP, Radford et al. 2021, Section 3.1.4; models that are an
  :class:`~capvis.tasks.protocols.ImageTextEmbedder`: ``contrastive``, ``coca``): the prompts' normalised
  text embeddings are averaged over templates and renormalised, one classifier row per class; the
  score is the cosine similarity with the image embedding.
* ``likelihood`` (CapPa's scoring classifier, Tschannen et al. 2023; any
  :class:`~capvis.tasks.protocols.CaptionLikelihoodModel`: ``captioning``, ``bicaptioning``, ``coca``): the
  score is the total log-likelihood ``log p(prompt | image)`` the captioning head gives the prompt,
  summed over both heads for bicaptioning, averaged over templates. Every class of every template is
  scored for an image batch at once, on the visual memory's key/value cache
  (:mod:`capvis.eval.likelihood`). The sum (not the per-token mean) is the probability of the prompt
  as a string, so a class name of several tokens is not favoured for its easy continuation tokens.

``auto`` takes ``embedding`` when the model has it, else ``likelihood``. No label is used for training.

Scoring a label file (format: :mod:`capvis.data.labels`): top-1 accuracy, where for a multi-label
entry (a CaptionWorld image with a circle and a star) the prediction counts as correct when it is
*any* of the entry's classes, so chance is not 1/K but the mean over images of ``|labels| / K`` (what a
uniformly random guess scores); it is reported beside top-1, and entries with no label are skipped.
Also the mean average precision over classes (sklearn's AP of the class scores over all entries, for
the classes with positive and negative entries; by likelihood the scores are first normalised into
``p(class | image)``, a softmax over the classes) and its chance level, the mean share of positives
per class. All metrics are fractions in [0, 1].

Images are resized (shorter side) to ``resize`` and center-cropped to ``image_size``; both default to
the model's ``data.image_size``, so a square image is used whole (synthetic scenes put objects near
the border, which the usual 8/7 crop would cut).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from capvis.data.eval_images import eval_batches
from capvis.data.tokenizer import Tokenizer
from capvis.errors import ConfigError, DataError
from capvis.eval.likelihood import check_likelihood_model, pair_log_likelihood
from capvis.eval.likelihood import tokenize as tokenize_prompts
from capvis.tasks.protocols import CaptionLikelihoodModel, ImageTextEmbedder

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
WORLD_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a picture with a {}.", "an image of a {}.")
METHODS = ("auto", "embedding", "likelihood")

__all__ = ["DEFAULT_TEMPLATES", "METHODS", "WORLD_TEMPLATES", "check_zeroshot_model", "class_embeddings",
           "evaluate_zeroshot", "image_embeddings", "likelihood_scores", "mean_average_precision",
           "resolve_method", "tokenize_prompts", "top1_any_label"]


def resolve_method(task: object, method: str = "auto") -> str:
    """``auto`` -> ``embedding`` for image-text embedding models, else ``likelihood`` for captioners."""
    if method not in METHODS:
        raise ConfigError(f"unknown zero-shot method {method!r}; use {', '.join(METHODS)}")
    if method == "auto":
        if isinstance(task, ImageTextEmbedder):
            return "embedding"
        if isinstance(task, CaptionLikelihoodModel):
            return "likelihood"
        raise ConfigError(f"zero-shot classification needs an image-text embedding model (contrastive, coca) or "
                          f"a captioning model; this checkpoint's model is {type(task).__name__}, which is neither")
    return method


def check_zeroshot_model(task: object, tokenizer: Tokenizer | None, method: str = "embedding") -> Tokenizer:
    """ConfigError unless ``task`` supports ``method`` and a tokenizer came with it."""
    if method == "embedding" and not isinstance(task, ImageTextEmbedder):
        raise ConfigError(f"zero-shot classification by embedding needs an image-text embedding model (contrastive, "
                          f"coca); this checkpoint's model is {type(task).__name__}, which has no text encoder "
                          f"(captioning models: --method likelihood)")
    if method == "likelihood":
        check_likelihood_model(task, "zero-shot classification")
    if tokenizer is None:
        raise ConfigError("the checkpoint carries no vocabulary, so class prompts cannot be tokenized")
    return tokenizer


def _prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Class-major: prompt ``k * P + p`` is class k in template p."""
    if not templates or any("{}" not in t for t in templates):
        raise ConfigError(f"every prompt template must contain '{{}}' for the class name, got {list(templates)}")
    return [t.format(name) for name in classnames for t in templates]


@torch.no_grad()
def class_embeddings(task: ImageTextEmbedder, tokenizer: Tokenizer, classnames: Sequence[str],
                     templates: Sequence[str], *, max_len: int, device: torch.device | str = "cpu") -> Tensor:
    """(K, E) normalised classifier rows: the template-averaged text embedding of each class."""
    tokens, lengths = tokenize_prompts(tokenizer, _prompts(classnames, templates), max_len)
    text = task.encode_text(tokens.to(device), lengths.to(device)).float()  # (K*P, E)
    text = text.view(len(classnames), len(templates), -1).mean(dim=1)  # (K, E)
    return torch.nn.functional.normalize(text, dim=-1)


def image_batches(paths: Sequence[str | Path], *, image_size: int, resize: int | None = None, batch_size: int = 64,
                  workers: int = 0) -> Iterator[Tensor]:
    """(b, 3, S, S) batches of ``paths`` in order: shorter side to ``resize`` (default ``image_size``), crop."""
    yield from eval_batches(paths, image_size=image_size, resize=resize or image_size, batch_size=batch_size,
                            num_workers=workers)


@torch.no_grad()
def image_embeddings(task: ImageTextEmbedder, paths: Sequence[str | Path], *, image_size: int,
                     resize: int | None = None, batch_size: int = 64, workers: int = 0,
                     device: torch.device | str = "cpu") -> Tensor:
    """(N, E) normalised image embeddings of ``paths``, in order."""
    out = [task.encode_image(images.to(device)).float().cpu()
           for images in image_batches(paths, image_size=image_size, resize=resize, batch_size=batch_size,
                                       workers=workers)]
    return torch.cat(out) if out else torch.zeros(0, 0)


def embedding_scores(task: ImageTextEmbedder, tokenizer: Tokenizer, classnames: Sequence[str],
                     templates: Sequence[str], paths: Sequence[str | Path], *, max_len: int,
                     device: torch.device | str = "cpu", **images: int | None) -> Tensor:
    """(N, K) cosine similarities of image and class embeddings."""
    classifier = class_embeddings(task, tokenizer, classnames, templates, max_len=max_len, device=device)
    return image_embeddings(task, paths, device=device, **images) @ classifier.cpu().T  # type: ignore[arg-type]


@torch.no_grad()
def likelihood_scores(task: CaptionLikelihoodModel, tokenizer: Tokenizer, classnames: Sequence[str],
                      templates: Sequence[str], paths: Sequence[str | Path], *, max_len: int,
                      device: torch.device | str = "cpu", **images: int | None) -> Tensor:
    """(N, K) ``log p(prompt | image)``, summed over the task's heads, averaged over templates."""
    tokens, lengths = tokenize_prompts(tokenizer, _prompts(classnames, templates), max_len)
    n_prompts, out = len(tokens), []
    for batch in image_batches(paths, **images):  # type: ignore[arg-type]
        grid = task.visual(batch.to(device))  # (b, C, h, w)
        b = grid.shape[0]
        image_index = torch.arange(b).repeat_interleave(n_prompts)  # (b*K*P,): every prompt for every image
        text_index = torch.arange(n_prompts).repeat(b)
        ll, _ = pair_log_likelihood(task, grid, tokens, lengths, image_index, text_index)
        out.append(ll.view(b, len(classnames), len(templates)).mean(dim=2).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, len(classnames))


SCORERS: dict[str, Callable[..., Tensor]] = {"embedding": embedding_scores, "likelihood": likelihood_scores}


def top1_any_label(scores: Tensor, labels: Sequence[Sequence[int]]) -> dict[str, float]:
    """Top-1 accuracy of (N, K) ``scores``, a hit when the argmax is among an entry's labels.

    Returns ``top1``, ``chance`` (mean of |labels|/K over scored entries), ``images`` (scored entries)
    and ``multi_label_images``. Entries without labels are skipped.
    """
    k = scores.shape[1]
    predicted = scores.argmax(dim=1).tolist()
    hits, chance, scored, multi = 0, 0.0, 0, 0
    for pred, labs in zip(predicted, labels):
        if not labs:
            continue
        scored += 1
        hits += int(pred in labs)
        chance += len(set(labs)) / k
        multi += int(len(set(labs)) > 1)
    if scored == 0:
        raise DataError("no image has a label for this task")
    return {"top1": hits / scored, "chance": chance / scored, "images": scored, "multi_label_images": multi}


def mean_average_precision(scores: Tensor, labels: Sequence[Sequence[int]]) -> dict[str, float]:
    """``mAP`` of (N, K) ``scores`` over the classes with a positive among all N entries, its chance level
    ``mAP_chance`` (the mean share of positives: the AP of random scores, in expectation) and ``mAP_classes``."""
    from sklearn.metrics import average_precision_score

    k = scores.shape[1]
    truth = np.zeros((len(labels), k), dtype=bool)
    for i, labs in enumerate(labels):
        truth[i, list(labs)] = True
    present = np.flatnonzero(truth.any(axis=0) & ~truth.all(axis=0))
    if len(present) == 0:
        raise DataError("no class has both positive and negative images, so AP is undefined")
    s = scores.double().numpy()
    aps = [average_precision_score(truth[:, c], s[:, c]) for c in present]
    return {"mAP": float(np.mean(aps)), "mAP_chance": float(truth[:, present].mean()), "mAP_classes": len(present)}


def evaluate_zeroshot(task: torch.nn.Module, tokenizer: Tokenizer | None, label_file: str | Path, label_task: str, *,
                      max_len: int, image_size: int, resize: int | None = None, images_dir: str | Path | None = None,
                      templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 64, workers: int = 0,
                      device: torch.device | str = "cpu", method: str = "auto") -> dict:
    """Zero-shot top-1 and mAP of ``task`` on one task of a label file; see the module docstring."""
    from capvis.eval.downstream import label_file_images

    method = resolve_method(task, method)
    tokenizer = check_zeroshot_model(task, tokenizer, method)
    tasks, entries, paths = label_file_images(label_file, images_dir)
    if label_task not in tasks:
        raise ConfigError(f"{label_file} has no task {label_task!r}; it has {', '.join(tasks)}")
    classnames = tasks[label_task]
    task = task.eval().to(device)
    scores = SCORERS[method](task, tokenizer, classnames, templates, paths, max_len=max_len, device=device,
                             image_size=image_size, resize=resize, batch_size=batch_size, workers=workers)
    labels = [e["labels"][label_task] for e in entries]
    # AP ranks images per class: by likelihood, p(class | image) (softmax over the classes, uniform prior),
    # as log p(prompt | image) varies more between images than between classes
    ranked = scores.log_softmax(dim=1) if method == "likelihood" else scores
    result = {**top1_any_label(scores, labels), **mean_average_precision(ranked, labels)}
    predicted = np.bincount(scores.argmax(dim=1).numpy(), minlength=len(classnames))
    log.info("zero-shot %s (%s): top-1 %.3f (chance %.3f), mAP %.3f (chance %.3f) on %d images; predictions per "
             "class %s", label_task, method, result["top1"], result["chance"], result["mAP"], result["mAP_chance"],
             result["images"], predicted.tolist())
    return {"label_task": label_task, "method": method, "classes": len(classnames), **result,
            "templates": list(templates)}
