"""Tokenizer: VirTex special ids, normalisation, round trip, no letter+punctuation pieces, `capvis vocab`."""

from __future__ import annotations

import json
import pickle
import unicodedata
from pathlib import Path

import pytest

from capvis.data.tokenizer import (EOS_ID, MASK_ID, PAD_ID, SOS_ID, UNK_ID, Tokenizer, normalize_caption,
                                   train_tokenizer)
from capvis.errors import DataError

CORPUS = [
    "A dog? A dog! The dog's ball, left. A man-made thing; 3.5 cats... (Paren) x/y \"quoted\"",
    "A cat sits on the mat near the dog's bowl?", "Two dogs run! Is it a dog? Yes: a dog.",
    "Crème brûlée on a plate, next to a café-au-lait.", "A red bus; a blue bus! buses? buses.",
    "Brackets [like this] and <angle ones> too.",
] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer(train_tokenizer(CORPUS, tmp_path_factory.mktemp("tok") / "v", vocab_size=10000))


def test_normalize_caption() -> None:
    assert normalize_caption("  Crème  BRÛLÉE\tnaïve ") == "creme brulee naive"


def test_special_ids_match_virtex(tok: Tokenizer) -> None:
    assert (PAD_ID, UNK_ID, SOS_ID, EOS_ID, MASK_ID) == (0, 0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<unk>", "[SOS]", "[EOS]", "[MASK]"]
    assert tok.piece_to_id("[SOS]") == 1 and tok.piece_to_id("[MASK]") == 3


def test_round_trip_and_never_control_ids(tok: Tokenizer) -> None:
    for text in CORPUS[:5] + ["A DOG, left of the Café!", "[SOS] [EOS] [MASK] <unk>"]:
        ids = tok.encode(text)
        assert ids and all(i > MASK_ID for i in ids), (text, ids)  # no 0/1/2/3 for in-vocab characters
        assert tok.decode(ids) == normalize_caption(text)
    assert UNK_ID in tok.encode("a dog \u2603")  # a character never seen in training is <unk>, as in VirTex
    assert tok.decode([SOS_ID, *tok.encode("a dog"), EOS_ID, PAD_ID, PAD_ID]) == "a dog"
    assert tok.decode([MASK_ID, UNK_ID]) == ""


def test_small_corpus_clamps_vocab_size(tok: Tokenizer) -> None:
    assert 4 < tok.vocab_size < 10000  # asked for 10000, got what the corpus supports


def test_no_piece_mixes_letters_and_punctuation(tok: Tokenizer) -> None:
    def kinds(piece: str) -> set[str]:
        return {unicodedata.category(c)[0] for c in piece.replace("\u2581", "")}

    mixed = [tok.id_to_piece(i) for i in range(4, tok.vocab_size) if {"L", "P"} <= kinds(tok.id_to_piece(i))]
    assert not mixed
    pieces = [tok.id_to_piece(i) for i in tok.encode("is it a dog? a dog!")]
    assert "?" in pieces and "!" in pieces and "\u2581dog" in pieces


def test_bytes_and_pickle_round_trip(tok: Tokenizer) -> None:
    again = Tokenizer.from_bytes(tok.model_bytes)
    assert again.vocab_size == tok.vocab_size and again.encode("a dog?") == tok.encode("a dog?")
    assert pickle.loads(pickle.dumps(tok)).encode("two cats") == tok.encode("two cats")


def test_missing_or_corrupt_model_names_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(DataError, match="bad.model"):
        Tokenizer(bad)


def test_cli_vocab_writes_model_and_vocab(tmp_path: Path, coco_fixture: Path, capsys) -> None:
    from capvis.cli import main

    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"image": f"{k}.jpg", "caption": c}) for k, c in enumerate(CORPUS)))
    prefix = tmp_path / "out" / "vocab"
    assert main(["vocab", "--captions", str(coco_fixture), str(jsonl), "--vocab-size", "80",
                 "--output", str(prefix)]) == 0
    assert (tmp_path / "out" / "vocab.model").is_file() and (tmp_path / "out" / "vocab.vocab").is_file()
    tok = Tokenizer(tmp_path / "out" / "vocab.model")
    assert tok.vocab_size == 80 and tok.decode(tok.encode("A dog runs.")) == "a dog runs."
    assert main(["vocab", "--captions", str(tmp_path / "missing.json"), "--output", str(prefix)]) == 2
    assert "missing.json" in capsys.readouterr().err
