"""Image-text retrieval: recall@1/5/10 image-to-text and text-to-image on a captions file (COCO 5K test).

Every image of the annotation file is a query for its captions (``i2t``: a hit at K when any of its
captions ranks in the top K of all captions) and every caption a query for its image (``t2i``). Ties
count against the query (a negative scoring as high as the best positive ranks ahead of it). Recalls
are percentages.

How a pair (image, caption) is scored depends on the model (``method``):

* ``embedding`` (:class:`~capvis.tasks.protocols.ImageTextEmbedder`: ``contrastive``, ``coca``): cosine
  similarity of the normalised embeddings, every pair.
* ``likelihood`` (:class:`~capvis.tasks.protocols.CaptionLikelihoodModel`: ``captioning``,
  ``bicaptioning``, ``coca``): the per-token mean log-likelihood of the caption given the image (both
  heads summed for bicaptioning; the mean, because captions of one image differ in length), on the
  visual key/value cache (:mod:`capvis.eval.likelihood`). ``scoring=all`` scores every pair; when that
  is too many (``scoring=auto``: more than ``max_pairs``), ``rerank`` scores only the top
  ``rerank_top`` candidates of a cheap first stage, both ways: each image is greedily captioned by
  the forward head and the captions are ranked by TF-IDF cosine similarity to that caption; for
  i2t the top-k captions of each image, for t2i the top-k images of each caption, are reranked by
  likelihood and the rest keep their first-stage order behind them. The output says which was done.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from capvis.data.annotations import ImageRecord
from capvis.data.tokenizer import Tokenizer
from capvis.errors import ConfigError, DataError
from capvis.eval.likelihood import check_likelihood_model, pair_log_likelihood, tokenize
from capvis.eval.zeroshot import image_batches, image_embeddings, resolve_method
from capvis.tasks.protocols import CaptionLikelihoodModel, ImageTextEmbedder

KS = (1, 5, 10)
SCORING = ("auto", "all", "rerank")


def recall_at_k(scores: Tensor, positive: Tensor, ks: Sequence[int] = KS, *, chunk: int = 1024) -> dict[int, float]:
    """Percentage of queries (rows of ``scores`` (Q, N)) with a positive (``positive`` (Q, N) bool) in the top K."""
    hits = {k: 0 for k in ks}
    for start in range(0, scores.shape[0], chunk):
        s, p = scores[start:start + chunk], positive[start:start + chunk]
        best = s.masked_fill(~p, float("-inf")).max(dim=1).values  # (q,)
        ahead = ((s >= best[:, None]) & ~p).sum(dim=1)  # negatives ranked at or above the best positive
        for k in ks:
            hits[k] += int((ahead < k).sum())
    return {k: 100.0 * v / max(scores.shape[0], 1) for k, v in hits.items()}


def retrieval_metrics(i2t: Tensor, owner: Tensor, t2i: Tensor | None = None) -> dict[str, float]:
    """``i2t_r@K`` and ``t2i_r@K`` from (images, captions) score matrices; caption j belongs to image
    ``owner[j]``. ``t2i`` defaults to ``i2t`` (one score per pair, as embeddings give)."""
    positive = owner.view(1, -1) == torch.arange(i2t.shape[0]).view(-1, 1)  # (Ni, Nc)
    t2i = i2t if t2i is None else t2i
    out = {f"i2t_r@{k}": v for k, v in recall_at_k(i2t, positive).items()}
    out.update({f"t2i_r@{k}": v for k, v in recall_at_k(t2i.T, positive.T).items()})
    return out


@torch.no_grad()
def embedding_matrix(task: ImageTextEmbedder, paths: Sequence, tokens: Tensor, lengths: Tensor, *,
                     batch_size: int = 64, device: torch.device | str = "cpu", **images: int | None) -> Tensor:
    """(Ni, Nc) cosine similarities of every image with every caption."""
    img = image_embeddings(task, paths, batch_size=batch_size, device=device, **images)  # type: ignore[arg-type]
    txt = torch.cat([task.encode_text(tokens[i:i + batch_size].to(device), lengths[i:i + batch_size].to(device))
                     .float().cpu() for i in range(0, len(tokens), batch_size)])
    return img @ txt.T


@torch.no_grad()
def likelihood_matrix(task: CaptionLikelihoodModel, paths: Sequence, tokens: Tensor, lengths: Tensor,
                      candidates: Tensor | None = None, *, batch_size: int = 64, device: torch.device | str = "cpu",
                      **images: int | None) -> Tensor:
    """(Ni, Nc) float64 per-token mean log-likelihood of each caption given each image; only the pairs of
    ``candidates`` (Ni, Nc) bool when given, ``-inf`` elsewhere."""
    out = torch.full((len(paths), len(tokens)), float("-inf"), dtype=torch.float64)
    first = 0
    for batch in image_batches(paths, batch_size=batch_size, **images):  # type: ignore[arg-type]
        b = batch.shape[0]
        mask = (torch.ones(b, len(tokens), dtype=torch.bool) if candidates is None
                else candidates[first:first + b])
        image_index, text_index = mask.nonzero(as_tuple=True)
        if len(image_index):
            ll, counts = pair_log_likelihood(task, task.visual(batch.to(device)), tokens, lengths, image_index,
                                             text_index)
            out[first + image_index, text_index] = (ll / counts.clamp(min=1)).cpu()
        first += b
    return out


@torch.no_grad()
def first_stage(task: CaptionLikelihoodModel, tokenizer: Tokenizer, paths: Sequence, captions: Sequence[str], *,
                max_len: int, batch_size: int = 64, device: torch.device | str = "cpu", **images: int | None) -> Tensor:
    """(Ni, Nc) TF-IDF cosine similarity of each image's greedy caption (forward head) with each caption."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    from capvis.models.decoding import greedy_decode

    head = task.caption_heads()[0].module
    generated: list[str] = []
    for batch in image_batches(paths, batch_size=batch_size, **images):  # type: ignore[arg-type]
        decoded = greedy_decode(_HeadDecoder(task, head), batch.to(device), max_steps=max_len)
        generated += [tokenizer.decode(t) for t in decoded.tokens]
    vectorizer = TfidfVectorizer(token_pattern=r"(?u)\b\w+\b").fit(captions)
    sims = vectorizer.transform(generated) @ vectorizer.transform(captions).T  # rows L2-normalised: cosine
    return torch.from_numpy(sims.toarray()).double()


class _HeadDecoder:
    """A task's forward head as :mod:`capvis.models.decoding` expects it."""

    def __init__(self, task: CaptionLikelihoodModel, head: torch.nn.Module) -> None:
        self.task, self.head = task, head

    def init_decoding(self, images: Tensor, *, max_len: int | None = None):  # noqa: ANN201 - DecodeCache
        return self.head.init_cache(self.task.visual(images), max_len=max_len)

    def decode_step(self, tokens: Tensor, cache, *, return_attention: bool = False):  # noqa: ANN001, ANN201
        return self.head.decode_step(tokens, cache, return_attention=return_attention)


def _top_mask(scores: Tensor, k: int, dim: int) -> Tensor:
    """Bool mask of the top ``k`` entries of every row (``dim=1``) or column (``dim=0``) of ``scores``."""
    k = min(k, scores.shape[dim])
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(dim, scores.topk(k, dim=dim).indices, True)


def rerank(first: Tensor, likelihood: Tensor, i2t_mask: Tensor, t2i_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(i2t, t2i) matrices ranking the masked candidates by likelihood ahead of the rest by first stage."""
    finite = likelihood[i2t_mask | t2i_mask]
    shift = float(first.max()) - (float(finite.min()) if len(finite) else 0.0) + 1.0
    return (torch.where(i2t_mask, likelihood + shift, first), torch.where(t2i_mask, likelihood + shift, first))


def evaluate_retrieval(task: torch.nn.Module, tokenizer: Tokenizer | None, records: Sequence[ImageRecord], *,
                       max_len: int, image_size: int, resize: int | None = None, method: str = "auto",
                       scoring: str = "auto", rerank_top: int = 20, max_pairs: int = 50_000, batch_size: int = 64,
                       workers: int = 0, device: torch.device | str = "cpu") -> dict:
    """Recall@1/5/10 both ways of ``task`` on ``records`` (images with their captions); module docstring."""
    if scoring not in SCORING:
        raise ConfigError(f"unknown retrieval scoring {scoring!r}; use {', '.join(SCORING)}")
    if rerank_top < 1 or max_pairs < 1:
        raise ConfigError("--rerank-top and --max-pairs must be >= 1")
    method = resolve_method(task, method)
    if method == "embedding" and not isinstance(task, ImageTextEmbedder):
        raise ConfigError(f"retrieval by embedding needs an image-text embedding model (contrastive, coca); this "
                          f"checkpoint's model is {type(task).__name__} (captioning models: --method likelihood)")
    if method == "likelihood":
        check_likelihood_model(task, "retrieval")
    if tokenizer is None:
        raise ConfigError("the checkpoint carries no vocabulary, so captions cannot be tokenized")
    records = [r for r in records if r.captions]
    if not records:
        raise DataError("the annotation file has no image with a caption")
    paths = [r.path for r in records]
    captions = [c for r in records for c in r.captions]
    owner = torch.tensor([i for i, r in enumerate(records) for _ in r.captions])
    tokens, lengths = tokenize(tokenizer, captions, max_len)
    task = task.eval().to(device)
    loading = {"image_size": image_size, "resize": resize, "batch_size": batch_size, "workers": workers,
               "device": device}
    if method == "embedding":
        metrics, how = retrieval_metrics(embedding_matrix(task, paths, tokens, lengths, **loading), owner), \
            "embedding cosine, all pairs"
    elif scoring == "all" or (scoring == "auto" and len(paths) * len(captions) <= max_pairs):
        metrics = retrieval_metrics(likelihood_matrix(task, paths, tokens, lengths, **loading), owner)
        how = "likelihood, all pairs"
    else:
        first = first_stage(task, tokenizer, paths, captions, max_len=max_len, **loading)
        i2t_mask, t2i_mask = _top_mask(first, rerank_top, 1), _top_mask(first, rerank_top, 0)
        likelihood = likelihood_matrix(task, paths, tokens, lengths, i2t_mask | t2i_mask, **loading)
        i2t, t2i = rerank(first, likelihood, i2t_mask, t2i_mask)
        metrics = retrieval_metrics(i2t, owner, t2i)
        how = f"likelihood rerank of the top {rerank_top} of a first stage (TF-IDF to the greedy caption), both ways"
    return {"method": method, "scoring": how, "images": len(paths), "captions": len(captions), **metrics}
