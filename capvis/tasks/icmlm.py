"""``icmlm``: image-conditioned masked language modelling with a FROZEN text encoder (Sariyildiz et al. 2020).

A pretrained text encoder, never updated, encodes the masked caption; a trainable image-conditioned
head (its tokens attend to each other and to the visual grid) predicts the masked words, so only the
image can supply what the text model cannot guess. Masking is that of ``masked_lm``.

The frozen encoder comes from ``model.icmlm.text_encoder`` (the older spelling
``model.contrastive.text_encoder`` is moved there when a config is read): a
capvis checkpoint or run directory of ``masked_lm`` (its head's text side: embeddings, self-attention,
feed-forward) or of ``contrastive`` (its text encoder), trained with the same vocabulary. With none,
the encoder is random and frozen, with a warning: a control, not the method. Differences from the
published model are in ``docs/pretext_tasks.md``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from capvis.config import Config, TextualConfig, config_from_dict, config_section
from capvis.errors import CheckpointError, ConfigError
from capvis.models.attention import TransformerDecoderLayer
from capvis.models.backbones import Backbone, build_visual_for
from capvis.models.text_encoder import TextEncoder, key_padding_mask
from capvis.models.textual import TransformerStack, _init_weights
from capvis.tasks.base import TASKS, PretextTask, TaskOutput, caption_lengths, head_sizes
from capvis.tasks.masked_lm import IGNORE_INDEX, MaskedLMConfig, check_masking, mask_tokens, masked_lm_loss

log = logging.getLogger(__name__)


@config_section("icmlm")
@dataclass(frozen=True)
class ICMLMConfig:
    """``model.icmlm``: a checkpoint (masked_lm or contrastive, same vocabulary) whose text side becomes
    the frozen text encoder; "" gives a random frozen encoder (a control)."""

    text_encoder: str = ""


class ICMLMHead(nn.Module):
    """Frozen text states (B, T, Ht) + grid (B, C, h, w) -> logits (B, T, V), through decoder layers
    whose self-attention is bidirectional and whose cross-attention reads the projected grid."""

    def __init__(self, *, text_features: int, visual_features: int, vocab_size: int, cfg: TextualConfig) -> None:
        super().__init__()
        h = cfg.hidden
        self.text_projection = nn.Linear(text_features, h)
        self.visual_projection = nn.Linear(visual_features, h)
        self.layer_norm = nn.LayerNorm(h)
        blocks = [TransformerDecoderLayer(h, cfg.heads or h // 64, cfg.feedforward or 4 * h, dropout=cfg.dropout,
                                          norm_first=cfg.norm_first) for _ in range(cfg.layers)]
        self.transformer = TransformerStack(blocks, nn.LayerNorm(h) if cfg.norm_first else None)
        self.output = nn.Linear(h, vocab_size)
        self.apply(_init_weights)

    def forward(self, visual_grid: Tensor, text_states: Tensor, tokens: Tensor, lengths: Tensor) -> Tensor:
        memory = self.visual_projection(visual_grid.permute(0, 2, 3, 1).flatten(1, 2))  # (B, S, H)
        x = self.layer_norm(self.text_projection(text_states))  # (B, T, H)
        mask = key_padding_mask(tokens, lengths)  # (B, 1, 1, T)
        for layer in self.transformer.layers:
            x, _ = layer(x, memory, attn_mask=mask)
        if self.transformer.norm is not None:
            x = self.transformer.norm(x)
        return self.output(x)


def _build_encoder(t: TextualConfig, vocab_size: int, max_len: int) -> TextEncoder:
    return TextEncoder(vocab_size=vocab_size, **head_sizes(t, max_len))


def load_text_encoder(path: str | Path, vocab_size: int) -> TextEncoder:
    """The text side of a capvis ``masked_lm`` or ``contrastive`` checkpoint (file or run directory)."""
    from capvis import storage as ckpt

    path = Path(path)
    if path.is_dir():
        found = ckpt.latest_valid_checkpoint(path / "checkpoints" if (path / "checkpoints").is_dir() else path)
        if found is None:
            raise CheckpointError(f"no valid checkpoint in {path} (model.icmlm.text_encoder)")
        path, state = found
    elif path.is_file():
        state = ckpt.load_checkpoint(path)
    else:
        raise ConfigError(f"model.icmlm.text_encoder: {path} not found (a masked_lm or contrastive checkpoint)")
    if "config" not in state:
        raise CheckpointError(f"{path} carries no config; was it written by capvis?")
    cfg = config_from_dict(state["config"])
    model = state["model"]
    if cfg.model.task == "contrastive":
        weights = {k[len("text_encoder."):]: v for k, v in model.items() if k.startswith("text_encoder.")}
    elif cfg.model.task == "masked_lm":
        weights = TextEncoder.state_from_masked_lm(
            {k[len("textual."):]: v for k, v in model.items() if k.startswith("textual.")})
    else:
        raise ConfigError(f"{path} is a {cfg.model.task!r} checkpoint; the ICMLM text encoder comes from a "
                          "masked_lm or contrastive one (a bidirectional text model)")
    ckpt_vocab = model["textual.embedding.words.weight" if cfg.model.task == "masked_lm"
                       else "text_encoder.embedding.words.weight"].shape[0]
    if ckpt_vocab != vocab_size:
        raise ConfigError(f"{path} has a vocabulary of {ckpt_vocab} tokens, this run {vocab_size}: "
                          "the frozen text encoder needs the same data.vocab")
    encoder = _build_encoder(cfg.model.textual, vocab_size, cfg.data.max_caption_length)
    try:
        encoder.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: text weights do not fit ({str(exc).splitlines()[0]})") from None
    log.info("ICMLM: frozen text encoder from %s (%s, %d layers, hidden %d)", path, cfg.model.task,
             cfg.model.textual.layers, cfg.model.textual.hidden)
    return encoder


@TASKS.register("icmlm")
class ICMLMTask(PretextTask):
    """Masked-token prediction from a frozen text encoding of the masked caption and the image."""

    def __init__(self, visual: Backbone, text_encoder: TextEncoder, head: ICMLMHead,
                 masking: MaskedLMConfig) -> None:
        super().__init__()
        check_masking(masking)
        self.visual = visual
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.head = head
        self.masking = masking

    @classmethod
    def from_config(cls, cfg: Config, vocab_size: int) -> "ICMLMTask":
        source = cfg.model.icmlm.text_encoder
        if source:
            encoder = load_text_encoder(source, vocab_size)
            if encoder.max_len < cfg.data.max_caption_length:
                raise ConfigError(f"the frozen text encoder knows {encoder.max_len} positions, fewer than "
                                  f"data.max_caption_length={cfg.data.max_caption_length}")
        else:
            log.warning("icmlm: no model.icmlm.text_encoder given: the frozen text encoder is RANDOM "
                        "(a control run, not ICMLM proper)")
            encoder = _build_encoder(cfg.model.textual, vocab_size, cfg.data.max_caption_length)
        visual = build_visual_for(cfg)
        head = ICMLMHead(text_features=encoder.hidden, visual_features=visual.num_features, vocab_size=vocab_size,
                         cfg=cfg.model.textual)
        return cls(visual, encoder, head, cfg.model.masked_lm)

    def train(self, mode: bool = True) -> "ICMLMTask":
        super().train(mode)
        self.text_encoder.eval()  # frozen: no dropout, ever
        return self

    def forward(self, batch: dict[str, Tensor]) -> TaskOutput:
        tokens = batch["caption_tokens"]
        lengths = caption_lengths(batch)
        m = self.masking
        inputs, targets = mask_tokens(tokens, lengths, vocab_size=self.head.output.out_features,
                                      mask_proportion=m.mask_proportion, mask_probability=m.mask_probability,
                                      replace_probability=m.replace_probability)
        with torch.no_grad():
            text_states = self.text_encoder(inputs, lengths)  # (B, T, Ht), frozen
        logits = self.head(self.visual(batch["image"]), text_states, inputs, lengths)
        loss = masked_lm_loss(logits, targets)
        selected = targets != IGNORE_INDEX
        accuracy = (logits.argmax(-1) == targets)[selected].float().mean() if selected.any() else loss.new_zeros(())
        return TaskOutput(loss=loss, logs={"loss_mlm": loss.detach(), "mlm_accuracy": accuracy.detach()})
