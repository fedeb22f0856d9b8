"""Model parts: visual backbones, the Transformer textual head (SDPA, KV cache) and caption decoding."""

from capvis.models.backbones import BACKBONES, VisualBackbone, build_backbone, list_backbones
from capvis.models.textual import DecodeCache, TextualHead

__all__ = ["BACKBONES", "DecodeCache", "TextualHead", "VisualBackbone", "build_backbone", "list_backbones"]
