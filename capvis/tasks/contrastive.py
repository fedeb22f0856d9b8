"""``contrastive``: CLIP-style image-text contrastive pretraining (Radford et al. 2021), at caption scale.

Image encoder: the backbone, global average pooling and a linear projection (CLIP's ResNets use an
attention pool; capvis keeps GAP so the transferred backbone is the same as for every other task).
Text encoder: a bidirectional Transformer (:class:`TextEncoder`, ``model.textual`` sizes), pooled at the
[EOS] token (``model.contrastive.text_pool=eos``; the last token of a truncated caption) or by the mean
over tokens, and a linear projection. Both embeddings are L2-normalised.

Two losses (``model.contrastive.loss``), both with a learnable temperature (scale clamped at 100, no
weight decay):

* ``infonce`` (CLIP): the symmetric batch softmax; ``logit_scale`` = log(1/0.07) at init.
* ``siglip`` (SigLIP, Zhai et al. 2023): an independent sigmoid per (image, text) pair,
  ``-1/n sum_ij log sigmoid(z_ij (t x_i . y_j + b))`` with z = +1 for matching pairs and -1 otherwise;
  ``t = exp(t')`` and a learnable bias ``b`` (``logit_bias``), initialised as the paper: t' = log 10, b = -10.

Under DDP (``torch.distributed`` initialised, training mode) each process scores its own rows against
those of the *global* batch: features are all-gathered WITH gradients
(``torch.distributed.nn.functional.all_gather``) and labels are offset by the rank (open_clip's
``local_loss`` pattern); SigLIP needs only the texts gathered (local images x global texts covers each
pair once over the ranks). Averaging the per-process losses and gradients, as DDP does, then gives
exactly the single-process loss and gradients on the concatenated batch.

:class:`ContrastiveObjective` holds these parts for any task with a backbone (``contrastive`` and ``coca``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from capvis.config import Config, config_section
from capvis.data.tokenizer import PAD_ID
from capvis.errors import ConfigError
from capvis.models.backbones import Backbone, build_visual_for
from capvis.models.text_encoder import TextEncoder, pool_text
from capvis.tasks.base import TASKS, PretextTask, TaskOutput, head_sizes

MAX_LOGIT_SCALE = 100.0
POOLING = ("eos", "mean")
DEFAULT_TEMPERATURE = {"infonce": 0.07, "siglip": 0.1}  # CLIP's; SigLIP's t' = log 10


@config_section("contrastive")
@dataclass(frozen=True)
class ContrastiveConfig:
    """``model.contrastive``: embedding sizes and loss of the image-text objective (contrastive, coca)."""

    MOVED: ClassVar[dict[str, str]] = {"text_encoder": "icmlm.text_encoder"}  # ICMLM's, before it had a section

    embed_dim: int = 256
    loss: str = "infonce"  # infonce (CLIP's batch softmax) | siglip (pairwise sigmoid)
    init_temperature: float = 0.0  # 0: the loss's own (infonce 0.07 as CLIP; siglip 0.1, t' = log 10)
    init_bias: float = -10.0  # siglip: initial logit bias b (SigLIP's -10)
    text_pool: str = "mean"  # text feature: mean (over non-pad tokens) | eos (the [EOS] / last token's state)


def gather_with_grad(x: Tensor) -> Tensor:
    """(b, E) local rows -> (W*b, E) rows of every process in rank order, differentiable."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def clip_loss(image: Tensor, text: Tensor, logit_scale: Tensor, *, all_image: Tensor | None = None,
              all_text: Tensor | None = None, rank: int = 0) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE of local normalised embeddings (b, E) against the global ones (N, E).

    Local row i matches global row ``rank * b + i``. Returns ``(loss, accuracy)``, accuracy being the
    mean top-1 retrieval rate over both directions (detached).
    """
    all_image = image if all_image is None else all_image
    all_text = text if all_text is None else all_text
    logits_per_image = logit_scale * image.float() @ all_text.float().T  # (b, N)
    logits_per_text = logit_scale * text.float() @ all_image.float().T  # (b, N)
    labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    with torch.no_grad():
        accuracy = ((logits_per_image.argmax(1) == labels).float().mean()
                    + (logits_per_text.argmax(1) == labels).float().mean()) / 2
    return loss, accuracy


def siglip_loss(image: Tensor, text: Tensor, logit_scale: Tensor, logit_bias: Tensor, *,
                all_text: Tensor | None = None, rank: int = 0) -> tuple[Tensor, Tensor]:
    """SigLIP's pairwise sigmoid loss of local images (b, E) against the global texts (N, E).

    Local image i matches global text ``rank * b + i``; every other pair is a negative. The sum over
    the (b, N) pairs is divided by b, so over W processes of b rows the mean of the per-process losses
    is the loss of one process on the N = W*b rows (normalised by N, as the paper). Returns
    ``(loss, accuracy)``, accuracy being the image-to-text top-1 rate (detached).
    """
    all_text = text if all_text is None else all_text
    logits = logit_scale * image.float() @ all_text.float().T + logit_bias  # (b, N)
    labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
    signs = 2 * F.one_hot(labels, all_text.shape[0]).to(logits.dtype) - 1  # (b, N): +1 matching, -1 not
    loss = -F.logsigmoid(signs * logits).sum() / image.shape[0]
    with torch.no_grad():
        accuracy = (logits.argmax(1) == labels).float().mean()
    return loss, accuracy


def _infonce(task: "ContrastiveObjective", image: Tensor, text: Tensor, gather: bool) -> tuple[Tensor, Tensor]:
    extra: dict[str, Any] = ({"all_image": gather_with_grad(image), "all_text": gather_with_grad(text),
                              "rank": dist.get_rank()} if gather else {})
    return clip_loss(image, text, task.scale(), **extra)


def _siglip(task: "ContrastiveObjective", image: Tensor, text: Tensor, gather: bool) -> tuple[Tensor, Tensor]:
    extra: dict[str, Any] = {"all_text": gather_with_grad(text), "rank": dist.get_rank()} if gather else {}
    return siglip_loss(image, text, task.scale(), task.logit_bias, **extra)


LOSSES: dict[str, Callable[["ContrastiveObjective", Tensor, Tensor, bool], tuple[Tensor, Tensor]]] = {
    "infonce": _infonce, "siglip": _siglip}
NO_DECAY = ("logit_scale", "logit_bias")


def build_text_encoder(cfg: Config, vocab_size: int) -> TextEncoder:
    """The bidirectional text Transformer of the contrastive side, ``model.textual`` sizes."""
    return TextEncoder(vocab_size=vocab_size, **head_sizes(cfg.model.textual, cfg.data.max_caption_length))


def contrastive_options(c: ContrastiveConfig) -> dict[str, Any]:
    """Keyword arguments of :meth:`ContrastiveObjective.init_contrastive` from ``model.contrastive``."""
    return {"embed_dim": c.embed_dim, "loss": c.loss, "init_temperature": c.init_temperature,
            "init_bias": c.init_bias, "text_pool": c.text_pool}


class ContrastiveObjective:
    """Mixin for a :class:`PretextTask`: projections, text encoder, temperature (and SigLIP bias), loss.

    Parameters keep the flat names of the ``contrastive`` task (``image_projection``, ``text_encoder.*``,
    ``text_projection``, ``logit_scale``, ``logit_bias``), so ICMLM can load the text encoder of either.
    """

    visual: Backbone

    def init_contrastive(self, text_encoder: TextEncoder, *, embed_dim: int = 256, loss: str = "infonce",
                         init_temperature: float = 0.0, init_bias: float = -10.0, text_pool: str = "mean",
                         image_projection: bool = True) -> None:
        """Create the contrastive parameters (in the same order for every task, so a seed gives the same
        values); ``init_temperature`` 0 is the loss's own. Call after ``self.visual`` is set."""
        if text_pool not in POOLING:
            raise ConfigError(f"model.contrastive.text_pool must be one of {', '.join(POOLING)}, got {text_pool!r}")
        if loss not in LOSSES:
            raise ConfigError(f"model.contrastive.loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        temperature = init_temperature or DEFAULT_TEMPERATURE[loss]
        if embed_dim <= 0 or not 0 < temperature <= 1 or not math.isfinite(init_bias):
            raise ConfigError("model.contrastive.embed_dim must be > 0, init_temperature in (0, 1] (0: the "
                              "loss's default) and init_bias finite")
        features = self.visual.num_features
        if image_projection:
            self.image_projection = nn.Linear(features, embed_dim, bias=False)
        self.text_encoder = text_encoder
        self.text_projection = nn.Linear(text_encoder.hidden, embed_dim, bias=False)
        if image_projection:
            nn.init.normal_(self.image_projection.weight, std=features ** -0.5)
        nn.init.normal_(self.text_projection.weight, std=text_encoder.hidden ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))
        if loss == "siglip":
            self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))
        self.text_pool, self.contrastive_loss_name = text_pool, loss

    def embed_grid(self, grid: Tensor) -> Tensor:
        """(B, C, h, w) backbone grid -> (B, E) L2-normalised image embeddings (GAP, projection)."""
        return F.normalize(self.image_projection(grid.mean(dim=(2, 3))), dim=-1)

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, E) L2-normalised image embeddings."""
        return self.embed_grid(self.visual(images))

    def encode_text(self, tokens: Tensor, lengths: Tensor | None = None) -> Tensor:
        """(B, T) right-padded [SOS] .. [EOS] ids -> (B, E) L2-normalised text embeddings."""
        lengths = (tokens != PAD_ID).sum(dim=1) if lengths is None else lengths
        states = self.text_encoder(tokens, lengths)  # (B, T, H)
        return F.normalize(self.text_projection(pool_text(states, lengths, self.text_pool)), dim=-1)

    def scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def contrastive_loss(self, image: Tensor, text: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The configured loss of normalised (b, E) embeddings, over the global batch under DDP in training."""
        training: bool = self.training  # type: ignore[attr-defined]
        gather = training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        loss, accuracy = LOSSES[self.contrastive_loss_name](self, image, text, gather)
        logs = {"loss_contrastive": loss.detach(), "retrieval_accuracy": accuracy,
                "logit_scale": self.scale().detach()}
        if self.contrastive_loss_name == "siglip":
            logs["logit_bias"] = self.logit_bias.detach()
        return loss, logs

    def param_groups(self, train_cfg: Any) -> list[dict[str, Any]]:
        """The base groups, with ``logit_scale`` (and ``logit_bias``) moved to the no-decay textual group
        (decay would pull the temperature towards 1)."""
        groups = super().param_groups(train_cfg)  # type: ignore[misc]
        target = next((g for g in groups if g["name"] == "textual/no_decay"), None)
        if target is None:
            target = {"name": "textual/no_decay", "params": [], "param_names": [], "lr": train_cfg.lr_textual,
                      "weight_decay": 0.0}
            groups.append(target)
        for group in groups:
            if group["weight_decay"] == 0:
                continue
            for name in NO_DECAY:
                if name in group["param_names"]:
                    i = group["param_names"].index(name)
                    target["param_names"].append(group["param_names"].pop(i))
                    target["params"].append(group["params"].pop(i))
        return [g for g in groups if g["params"]]


@TASKS.register("contrastive")
class ContrastiveTask(ContrastiveObjective, PretextTask):
    """CLIP (or SigLIP): match each image with its caption among all captions of the (global) batch."""

    def __init__(self, visual: Backbone, text_encoder: TextEncoder, **options: Any) -> None:
        super().__init__()
        self.visual = visual
        self.init_contrastive(text_encoder, **options)

    @classmethod
    def from_config(cls, cfg: Config, vocab_size: int) -> "ContrastiveTask":
        visual = build_visual_for(cfg)  # first, as every task: a seed gives every task the same backbone
        return cls(visual, build_text_encoder(cfg, vocab_size), **contrastive_options(cfg.model.contrastive))

    def forward(self, batch: dict[str, Tensor]) -> TaskOutput:
        image = self.encode_image(batch["image"])
        text = self.encode_text(batch["caption_tokens"], batch.get("caption_lengths"))
        loss, logs = self.contrastive_loss(image, text)
        return TaskOutput(loss=loss, logs=logs)
