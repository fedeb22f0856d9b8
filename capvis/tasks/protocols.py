"""What a task can do beyond training, declared as protocols, so evaluations ask the task and not its name.

* :class:`ImageTextEmbedder`: images and captions into one embedding space (``contrastive``, ``coca``);
  zero-shot ``--method embedding`` and embedding retrieval use it.
* :class:`CaptionLikelihoodModel`: the captioning heads that give ``log p(caption | image)``
  (``captioning``, ``bicaptioning``, ``coca``); zero-shot ``--method likelihood`` and likelihood
  retrieval use it, with the heads' key/value cache (:mod:`capvis.eval.likelihood`).

Both are ``runtime_checkable``: ``isinstance(task, ImageTextEmbedder)``. A new task opts in by defining
the methods; an evaluation that needs a capability the checkpoint lacks says so in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

from capvis.models.backbones import VisualBackbone
from capvis.models.textual import TextualHead


@dataclass(frozen=True)
class CaptionHead:
    """One autoregressive captioning head of a task."""

    name: str  # "forward" | "backward"
    module: TextualHead
    reverse: bool  # reads captions reversed, [EOS] w_n .. w_1 [SOS] (VirTex's backward head)


@runtime_checkable
class ImageTextEmbedder(Protocol):
    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, E) L2-normalised."""
        ...

    def encode_text(self, tokens: Tensor, lengths: Tensor | None = None) -> Tensor:
        """(B, T) right-padded [SOS] .. [EOS] ids -> (B, E) L2-normalised."""
        ...


@runtime_checkable
class CaptionLikelihoodModel(Protocol):
    visual: VisualBackbone

    def caption_heads(self) -> list[CaptionHead]:
        """The heads whose log-likelihoods are summed to score a caption (forward first)."""
        ...
