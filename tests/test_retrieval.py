"""Image-text retrieval: recall@K on toy sets where the answer is known (identity embeddings: 100%,
shuffled pairs: chance), the tie rule, likelihood scores equal to ``capvis score``'s, the reranked first
stage, and ``capvis eval retrieval`` end to end for embedding and captioning checkpoints."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from capvis.cli import main
from capvis.eval.retrieval import KS, recall_at_k, retrieval_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # restored after each test (conftest)
KEYS = [f"{d}_r@{k}" for d in ("i2t", "t2i") for k in KS]


def toy(n_images: int = 400, per_image: int = 1, dim: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=g), dim=1)
    owner = torch.arange(n_images).repeat_interleave(per_image)
    return image, owner, g


def test_identity_embeddings_give_full_recall() -> None:
    image, owner, _ = toy(per_image=3)
    metrics = retrieval_metrics(image @ image[owner].T, owner)  # each caption embeds as its own image
    assert list(metrics) == KEYS and all(v == 100.0 for v in metrics.values())


def test_shuffled_pairs_give_chance() -> None:
    """Captions embed as *another* image: the true one ranks uniformly among the rest (t2i chance is about
    (K-1)/(N-1), one wrong image being certain to beat it), and i2t is 1-in-N too."""
    image, owner, g = toy()
    n = len(image)
    shuffled = owner[torch.randperm(n, generator=g)]
    assert (shuffled != owner).float().mean() > 0.99
    metrics = retrieval_metrics(image @ image[shuffled].T, owner)
    for k in KS:
        chance = 100.0 * k / n
        sd = 100.0 * (k / n * (1 - k / n) / n) ** 0.5
        assert abs(metrics[f"i2t_r@{k}"] - chance) < 4 * sd + 0.5, (k, metrics)
        assert abs(metrics[f"t2i_r@{k}"] - chance) < 4 * sd + 0.5, (k, metrics)
    assert metrics["i2t_r@10"] < 5 and metrics["t2i_r@10"] < 5


def test_ties_count_against_the_query_and_positives_do_not_compete() -> None:
    scores = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    positive = torch.tensor([[True, True, False, False], [False, False, False, True]])
    assert recall_at_k(scores, positive, (1, 2, 4)) == {1: 0.0, 2: 50.0, 4: 100.0}


def _checkpoint(tmp_path, coco_tokenizer_path, task_name):
    from test_score import make_checkpoint

    return make_checkpoint(tmp_path / "ckpt.pt", coco_tokenizer_path, task_name)  # 64 px, 12 tokens


def test_likelihood_scores_equal_the_score_nll_and_rerank_all_equals_all_pairs(tmp_path, coco_fixture,
                                                                                 coco_tokenizer_path) -> None:
    from capvis.data.annotations import read_records
    from capvis.eval.likelihood import tokenize
    from capvis.eval.retrieval import evaluate_retrieval, likelihood_matrix
    from capvis.eval.score import score_captions

    task, tokenizer = _checkpoint(tmp_path, coco_tokenizer_path, "bicaptioning")
    records = read_records(coco_fixture)
    captions = [c for r in records for c in r.captions]
    tokens, lengths = tokenize(tokenizer, captions, 12)
    matrix = likelihood_matrix(task, [r.path for r in records], tokens, lengths, image_size=64, batch_size=3)
    for i, j in ((0, 0), (0, 5), (3, 2), (2, 8)):
        nll = score_captions(task, tokenizer, [replace(records[i], captions=[captions[j]])], image_size=64,
                             max_caption_length=12)
        assert matrix[i, j].item() == pytest.approx(-(nll["nll_forward"] + nll["nll_backward"]), rel=1e-4)
    options = {"max_len": 12, "image_size": 64, "method": "likelihood", "batch_size": 3}
    full = evaluate_retrieval(task, tokenizer, records, scoring="all", **options)
    reranked = evaluate_retrieval(task, tokenizer, records, scoring="rerank", rerank_top=9, **options)
    assert full["scoring"] == "likelihood, all pairs" and "rerank of the top 9" in reranked["scoring"]
    assert {k: full[k] for k in KEYS} == {k: reranked[k] for k in KEYS}
    assert full == evaluate_retrieval(task, tokenizer, records, scoring="auto", max_pairs=36, **options)
    assert "rerank" in evaluate_retrieval(task, tokenizer, records, max_pairs=35, rerank_top=2, **options)["scoring"]


def test_eval_retrieval_command_for_embedding_and_captioning_models(tmp_path, coco_fixture, coco_tokenizer_path,
                                                                    capsys) -> None:
    code = main(["eval", "retrieval", "--checkpoint", "random", "--config", "contrastive_R_50", "--annotations",
                 str(coco_fixture), "--device", "cpu", "model.backbone=resnet18", "model.textual.hidden=64",
                 "data.image_size=32", f"data.vocab={coco_tokenizer_path}"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == "embedding" and result["images"] == 4 and result["captions"] == 9
    assert all(0 <= result[k] <= 100 for k in KEYS) and result["i2t_r@10"] == result["t2i_r@10"] == 100.0
    _checkpoint(tmp_path, coco_tokenizer_path, "captioning")
    code = main(["eval", "retrieval", "--checkpoint", str(tmp_path / "ckpt.pt"), "--annotations", str(coco_fixture),
                 "--device", "cpu", "--scoring", "rerank", "--rerank-top", "2"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == "likelihood" and "rerank of the top 2" in result["scoring"]
    assert result["model_task"] == "captioning" and all(0 <= result[k] <= 100 for k in KEYS)
    code = main(["eval", "retrieval", "--checkpoint", "random", "--config", "token_classification_R_50",
                 "--annotations", str(coco_fixture), "model.backbone=resnet18", f"data.vocab={coco_tokenizer_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "neither" in err and len(err.strip().splitlines()) == 1
