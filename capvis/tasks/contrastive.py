"""``contrastive``: CLIP-style image-text contrastive pretraining (Radford et al. 2021), at caption scale.

Image encoder: the backbone, global average pooling and a linear projection (CLIP's ResNets use an
attention pool; capvis keeps GAP so the transferred backbone is the same as for every other task).
Text encoder: a bidirectional Transformer (:class:`TextEncoder`, ``model.textual`` sizes), pooled at the
[EOS] token (``model.contrastive.text_pool=eos``; the last token of a truncated caption) or by the mean
over tokens, and a linear projection. Both embeddings are L2-normalised; the loss is the symmetric
InfoNCE with a learnable temperature (``logit_scale`` = log(1/0.07) at init, scale clamped at 100).

Under DDP (``torch.distributed`` initialised, training mode) each process scores its own images and
texts against those of the *global* batch: features are all-gathered WITH gradients
(``torch.distributed.nn.functional.all_gather``) and labels are offset by the rank (open_clip's
``local_loss`` pattern). Averaging the per-process losses and gradients, as DDP does, then gives
exactly the single-process loss and gradients on the concatenated batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from capvis.config import Config
from capvis.data.tokenizer import PAD_ID
from capvis.errors import ConfigError
from capvis.models.backbones import VisualBackbone, build_visual
from capvis.models.text_encoder import TextEncoder, pool_text
from capvis.tasks.base import TASKS, PretextTask, TaskOutput

MAX_LOGIT_SCALE = 100.0
POOLING = ("eos", "mean")


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


@TASKS.register("contrastive")
class ContrastiveTask(PretextTask):
    """CLIP: match each image with its caption among all captions of the (global) batch, and back."""

    def __init__(self, visual: VisualBackbone, text_encoder: TextEncoder, *, embed_dim: int = 256,
                 init_temperature: float = 0.07, text_pool: str = "mean") -> None:
        super().__init__()
        if text_pool not in POOLING:
            raise ConfigError(f"model.contrastive.text_pool must be one of {', '.join(POOLING)}, got {text_pool!r}")
        if embed_dim <= 0 or not 0 < init_temperature <= 1:
            raise ConfigError("model.contrastive.embed_dim must be > 0 and init_temperature in (0, 1]")
        self.visual = visual
        self.image_projection = nn.Linear(visual.num_features, embed_dim, bias=False)
        self.text_encoder = text_encoder
        self.text_projection = nn.Linear(text_encoder.hidden, embed_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=visual.num_features ** -0.5)
        nn.init.normal_(self.text_projection.weight, std=text_encoder.hidden ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        self.text_pool = text_pool

    @classmethod
    def from_config(cls, cfg: Config, vocab_size: int) -> "ContrastiveTask":
        t, c = cfg.model.textual, cfg.model.contrastive
        encoder = TextEncoder(vocab_size=vocab_size, hidden=t.hidden, layers=t.layers, heads=t.heads,
                              feedforward=t.feedforward, dropout=t.dropout, norm_first=t.norm_first,
                              max_len=cfg.data.max_caption_length)
        return cls(build_visual(cfg.model), encoder, embed_dim=c.embed_dim, init_temperature=c.init_temperature,
                   text_pool=c.text_pool)

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, E) L2-normalised image embeddings."""
        return F.normalize(self.image_projection(self.visual.pooled(images)), dim=-1)

    def encode_text(self, tokens: Tensor, lengths: Tensor | None = None) -> Tensor:
        """(B, T) right-padded [SOS] .. [EOS] ids -> (B, E) L2-normalised text embeddings."""
        lengths = (tokens != PAD_ID).sum(dim=1) if lengths is None else lengths
        states = self.text_encoder(tokens, lengths)  # (B, T, H)
        return F.normalize(self.text_projection(pool_text(states, lengths, self.text_pool)), dim=-1)

    def scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, batch: dict[str, Tensor]) -> TaskOutput:
        image = self.encode_image(batch["image"])
        text = self.encode_text(batch["caption_tokens"], batch.get("caption_lengths"))
        gathered: dict[str, Any] = {}
        if self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = {"all_image": gather_with_grad(image), "all_text": gather_with_grad(text),
                        "rank": dist.get_rank()}
        scale = self.scale()
        loss, accuracy = clip_loss(image, text, scale, **gathered)
        return TaskOutput(loss=loss, logs={"loss_contrastive": loss.detach(), "retrieval_accuracy": accuracy,
                                           "logit_scale": scale.detach()})

    def param_groups(self, train_cfg: Any) -> list[dict[str, Any]]:
        """The base groups, with ``logit_scale`` moved to the no-decay textual group (decay would pull the
        temperature towards 1)."""
        groups = super().param_groups(train_cfg)
        for group in groups:
            if "logit_scale" in group["param_names"] and group["weight_decay"] > 0:
                i = group["param_names"].index("logit_scale")
                group["param_names"].pop(i)
                param = group["params"].pop(i)
                target = next((g for g in groups if g["name"] == "textual/no_decay"), None)
                if target is None:
                    target = {"name": "textual/no_decay", "params": [], "param_names": [],
                              "lr": train_cfg.lr_textual, "weight_decay": 0.0}
                    groups.append(target)
                target["params"].append(param)
                target["param_names"].append("logit_scale")
                break
        return [g for g in groups if g["params"]]
