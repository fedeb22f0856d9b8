"""What a task can do beyond training, declared as protocols, so evaluations ask the task and not its name.

* :class:`ImageTextEmbedder`: images and captions into one embedding space (``contrastive``, ``coca``);
  zero-shot ``--method embedding`` and embedding retrieval use it.
* :class:`CaptionLikelihoodModel`: the captioning heads that give ``log p(caption | image)``
  (``captioning``, ``bicaptioning``, ``coca``); zero-shot ``--method likelihood`` and likelihood
  retrieval use it, with the heads' key/value cache (:mod:`capvis.eval.likelihood`).

* :class:`Captioner`: autoregressive decoding with a key/value cache (``init_decoding``,
  ``decode_step``); ``capvis caption``, ``eval captioning`` and the demo's captions use it.

All are ``runtime_checkable``: ``isinstance(task, ImageTextEmbedder)``. A new task opts in by defining
the methods; a command that needs a capability the checkpoint lacks calls :func:`require`, which says
so in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from torch import Tensor

from capvis.errors import ConfigError
from capvis.models.backbones import Backbone
from capvis.models.textual import DecodeCache, TextualHead

P = TypeVar("P")


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
    visual: Backbone

    def caption_heads(self) -> list[CaptionHead]:
        """The heads whose log-likelihoods are summed to score a caption (forward first)."""
        ...


@runtime_checkable
class Captioner(Protocol):
    def init_decoding(self, images: Tensor, *, max_len: int | None = None) -> DecodeCache:
        """Run the backbone once; the head's cache for decoding ``images``."""
        ...

    def decode_step(self, tokens: Tensor, cache: DecodeCache, *,
                    return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """(B,) last tokens -> (B, V) next-token logits."""
        ...


_LACKS = {ImageTextEmbedder: "an image and a text embedding (encode_image, encode_text)",
          CaptionLikelihoodModel: "a captioning head that scores captions (caption_heads)",
          Captioner: "an autoregressive caption decoder (init_decoding, decode_step)"}


def require(task: Any, capability: type[P], *, doing: str, source: str = "the checkpoint") -> P:
    """``task`` if it has ``capability``, else a one-line ConfigError naming what it lacks."""
    if isinstance(task, capability):
        return task
    raise ConfigError(f"{doing} needs {_LACKS.get(capability, capability.__name__)}; {source} "
                      f"({type(task).__name__}) has none")
