"""SentencePiece BPE tokenizer with the original VirTex special ids.

The ids match the original VirTex vocabulary files (``<unk>``/padding 0, ``[SOS]`` 1, ``[EOS]`` 2,
``[MASK]`` 3), so their ``coco_10k.model`` loads unchanged. Captions are lower-cased and stripped of
accents by :func:`normalize_caption` both before training and before encoding, so the vocabulary never
spends pieces on case or diacritics. Letters and punctuation never merge into one piece ("dog?" is
``dog`` + ``?``): SentencePiece's ``split_by_unicode_script`` keeps Latin letters and punctuation
(script "Common") in separate pieces, which a test checks over a whole trained vocabulary.
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Sequence

import sentencepiece as spm

from capvis.errors import DataError

log = logging.getLogger(__name__)

PAD_ID = UNK_ID = 0
SOS_ID = 1
EOS_ID = 2
MASK_ID = 3
CONTROL_SYMBOLS = ("[SOS]", "[EOS]", "[MASK]")  # ids 1, 2, 3 follow from unk_id=0 and this order

_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")


def normalize_caption(text: str) -> str:
    """Lower-case, NFKD-decompose, drop combining marks and collapse whitespace (as VirTex's COCO dataset)."""
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(text.split())


class Tokenizer:
    """Encodes normalized captions to piece ids and back; picklable (DataLoader workers) via its model bytes."""

    def __init__(self, model_path: str | Path | None = None, *, model_proto: bytes | None = None) -> None:
        self.path = Path(model_path) if model_path is not None else None
        if model_proto is None:
            if self.path is None:
                raise DataError("Tokenizer needs a model path or model bytes")
            if not self.path.is_file():
                raise DataError(f"vocabulary model not found: {self.path}")
            model_proto = self.path.read_bytes()
        self._bytes = bytes(model_proto)
        self._sp = _load_processor(self._bytes, self.path)

    @classmethod
    def from_bytes(cls, data: bytes) -> Tokenizer:
        """Rebuild from a checkpoint's embedded ``.model`` bytes, with no file at hand."""
        return cls(model_proto=data)

    @property
    def model_bytes(self) -> bytes:
        return self._bytes

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        """Piece ids of the normalized text; control ids (1-3) never appear, 0 only for unseen characters."""
        return [int(i) for i in self._sp.encode(normalize_caption(text))]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, dropping <unk>/padding, [SOS], [EOS], [MASK] and out-of-range ids."""
        size = self.vocab_size
        keep = [int(i) for i in ids if MASK_ID < int(i) < size]
        return self._sp.decode(keep)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, s: str) -> int:
        return int(self._sp.piece_to_id(s))

    def __len__(self) -> int:
        return self.vocab_size

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self._bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._bytes = state["bytes"]
        self._sp = _load_processor(self._bytes, self.path)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, path={str(self.path) if self.path else None!r})"


def _load_processor(data: bytes, path: Path | None) -> spm.SentencePieceProcessor:
    where = str(path) if path is not None else "<model bytes>"
    if not data:  # sentencepiece would log C++ errors to stderr and give an empty processor
        raise DataError(f"{where}: vocabulary file is empty (build one with `capvis vocab`)")
    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
    except Exception as exc:  # sentencepiece raises RuntimeError/OSError with C++ text
        raise DataError(f"{where}: not a valid SentencePiece model ({str(exc).strip() or type(exc).__name__})") from None
    if sp.get_piece_size() <= MASK_ID:
        raise DataError(f"{where}: vocabulary has only {sp.get_piece_size()} pieces")
    specials = [sp.id_to_piece(i) for i in range(MASK_ID + 1)]
    if not sp.is_unknown(UNK_ID) or specials[1:] != list(CONTROL_SYMBOLS):
        raise DataError(f"{where}: special pieces {specials} are not <unk>, [SOS], [EOS], [MASK] at ids 0-3")
    return sp


def train_tokenizer(texts: Iterable[str], prefix: str | Path, vocab_size: int = 10000) -> Path:
    """Train a BPE vocabulary on ``texts`` and write ``PREFIX.model`` and ``PREFIX.vocab``.

    The settings mirror VirTex's ``build_vocabulary.py`` (BPE, character coverage 1.0, bos/eos off,
    control symbols [SOS]/[EOS]/[MASK]). A corpus too small for ``vocab_size`` gets the largest size it
    supports, with a warning, so small test corpora work. Returns the ``.model`` path.
    """
    corpus = [t for t in (normalize_caption(x) for x in texts) if t]
    if not corpus:
        raise DataError("no caption text to train a vocabulary on")
    if vocab_size <= MASK_ID + 1:
        raise DataError(f"vocabulary size must exceed {MASK_ID + 1}, got {vocab_size}")
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        _train(corpus, prefix, vocab_size)
    except RuntimeError as exc:
        match = _TOO_HIGH.search(str(exc))
        if not match:
            raise DataError(f"SentencePiece training failed for {prefix}: {exc}") from None
        limit = int(match.group(2))
        log.warning("corpus supports at most %d pieces; vocabulary size clamped from %d", limit, vocab_size)
        _train(corpus, prefix, limit)
    return prefix.with_name(prefix.name + ".model")


def _train(corpus: list[str], prefix: Path, vocab_size: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        unk_id=UNK_ID,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        control_symbols=list(CONTROL_SYMBOLS),
        split_by_unicode_script=True,  # letters vs punctuation: no "dog?" pieces
        split_by_number=True,
        split_by_whitespace=True,
        num_threads=max(1, min(16, os.cpu_count() or 1)),
        minloglevel=2,
    )


def vocab_size_of(tokenizer: "Tokenizer | None", cfg: Any) -> int:
    """The model's vocabulary size: the tokenizer's when there is one, else ``model.vocab_size``
    (the one rule every builder follows: training, loading, releases, ``capvis summary``)."""
    return tokenizer.vocab_size if tokenizer is not None else int(cfg.model.vocab_size)


def tokenizer_of_config(cfg: Any) -> "Tokenizer | None":
    """``data.vocab``'s tokenizer when that file exists (a random model or a summary may have none)."""
    return Tokenizer(cfg.data.vocab) if cfg.data.vocab and Path(cfg.data.vocab).is_file() else None
