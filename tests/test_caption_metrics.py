"""CIDEr-D / BLEU-4 against values pinned from the reference implementation.

Expected numbers were computed once with pycocoevalcap 1.2 (``Cider().compute_score`` and
``Bleu(4).compute_score``, BLEU-4 = the 4th value) on the same sets, fed the output of
``capvis.eval.caption_metrics.tokenize`` joined by spaces. pycocoevalcap is not needed to run
these tests.
"""

from __future__ import annotations

import pytest

from capvis.errors import DataError
from capvis.eval.caption_metrics import cider_d, evaluate_captions, tokenize

SETS = {
    # every candidate equals one of its references
    "exact": (
        {1: "A dog runs on the grass.", 2: "Two men ride horses on a beach", 3: "a red bus parked by the road"},
        {1: ["a dog runs on the grass", "A brown dog running across a field.", "the dog is playing outside"],
         2: ["two people riding horses along the shore", "two men ride horses on a beach"],
         3: ["a red double decker bus on a street", "a bus parked next to the curb", "a big red bus"]},
    ),
    # partial n-gram overlap
    "partial": (
        {1: "a dog playing in a field", 2: "a man riding a horse on the beach",
         3: "a bus on a city street", 4: "a plate of food with broccoli"},
        {1: ["a brown dog running across a field", "the dog is playing outside", "a dog plays in the grass"],
         2: ["two people riding horses along the shore", "a man rides a horse on the beach"],
         3: ["a red double decker bus on a street", "a bus parked next to the curb"],
         4: ["a plate with rice and broccoli", "a white plate of food on a table", "some broccoli and meat"]},
    ),
    # no shared word at all
    "none": (
        {1: "zebra giraffe elephant", 2: "computer keyboard mouse monitor"},
        {1: ["a dog runs on the grass", "the dog is playing outside"],
         2: ["two people riding horses along the shore", "a man rides a horse"]},
    ),
}

# (CIDEr-D, BLEU-4) from pycocoevalcap 1.2
EXPECTED = {
    "exact": (3.576239544746342, 0.7420537480983017),
    "partial": (2.047150554775271, 0.37287911906199794),
    "none": (0.0, 2.0350564871474492e-16),
}
# per-image CIDEr-D of "exact" from pycocoevalcap 1.2
EXACT_PER_IMAGE = [3.782775878973701, 5.4564354645876385, 1.4895072906776854]


@pytest.mark.parametrize("name", sorted(SETS))
def test_matches_pycocoevalcap(name):
    cands, refs = SETS[name]
    out = evaluate_captions(cands, refs, spice=False)
    cider, bleu4 = EXPECTED[name]
    assert out["cider"] == pytest.approx(cider, rel=1e-9, abs=1e-12)
    assert out["bleu4"] == pytest.approx(bleu4, rel=1e-9, abs=1e-18)
    assert out["spice"] is None


def test_per_image_cider():
    cands, refs = SETS["exact"]
    _, per_image = cider_d({k: tokenize(v) for k, v in cands.items()},
                           {k: [tokenize(r) for r in v] for k, v in refs.items()})
    assert per_image == pytest.approx(EXACT_PER_IMAGE, rel=1e-9)


def test_tokenize_ptb_like():
    assert tokenize("A Dog's ball, isn't it?!") == ["a", "dog", "'s", "ball", "is", "n't", "it"]
    assert tokenize("black-and-white photo ... of (two) cats.") == [
        "black-and-white", "photo", "of", "two", "cats"]


def test_extra_references_are_ignored():
    cands, refs = SETS["partial"]
    more = dict(refs, extra=["a cat sleeps on a sofa"])
    assert evaluate_captions(cands, more, spice=False)["cider"] == pytest.approx(EXPECTED["partial"][0])


def test_missing_references_raise():
    with pytest.raises(DataError, match="no reference captions"):
        evaluate_captions({1: "a dog", 2: "a cat"}, {1: ["a dog"]}, spice=False)


def test_spice_skipped_without_java():
    cands, refs = SETS["exact"]
    out = evaluate_captions(cands, refs, java="/nonexistent/java")
    assert out["spice"] is None
    assert "SPICE skipped: no Java runtime" in out["notes"]


def test_spice_skipped_without_jar(tmp_path, monkeypatch):
    fake_java = tmp_path / "java"
    fake_java.write_text("#!/bin/sh\nexit 1\n")
    fake_java.chmod(0o755)
    monkeypatch.delenv("CAPVIS_SPICE_JAR", raising=False)
    cands, refs = SETS["none"]
    out = evaluate_captions(cands, refs, java=str(fake_java), spice_jar=tmp_path / "missing.jar")
    assert out["spice"] is None
    assert any(n.startswith("SPICE skipped: no SPICE jar") for n in out["notes"])
