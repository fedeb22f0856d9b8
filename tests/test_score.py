"""``capvis score``: token-weighted caption NLL, checked against a caption-by-caption direct computation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import capvis
from capvis.cli import main
from capvis.config import load_config
from capvis.data.annotations import read_records
from capvis.data.datasets import load_image
from capvis.data.tokenizer import EOS_ID, SOS_ID, Tokenizer, normalize_caption
from capvis.data.transforms import build_eval_transform
from capvis.tasks import build_task
from capvis.train.checkpoint import atomic_save


def make_checkpoint(path, vocab_path, task_name):
    cfg = load_config("bicaptioning_R_50_L1_H2048", ["model.backbone=resnet18", "data.image_size=64",
                                                     "model.textual.hidden=64", f"model.task={task_name}",
                                                     "data.max_caption_length=12", f"data.vocab={vocab_path}"])
    tokenizer = Tokenizer(vocab_path)
    torch.manual_seed(0)
    task = build_task(cfg, tokenizer.vocab_size)
    with torch.no_grad():
        for p in task.parameters():
            p.add_(0.1 * torch.randn_like(p))
    atomic_save({"model": task.state_dict(), "config": cfg.to_dict(), "vocab": tokenizer.model_bytes,
                 "capvis_version": capvis.__version__}, path)
    return task.eval(), tokenizer


def direct_nll(task, tokenizer, records, head_name, reverse):
    """Sum of -log p over scored tokens, one caption at a time, and their count."""
    transform = build_eval_transform(64)  # shorter side 64, center crop 64: the pretraining val pipeline
    total, count = 0.0, 0
    head = getattr(task, head_name)
    with torch.no_grad():
        for record in records:
            grid = task.visual(transform(load_image(record.path)).unsqueeze(0))
            for caption in record.captions:
                ids = [SOS_ID, *tokenizer.encode(normalize_caption(caption)), EOS_ID][:12]
                ids = ids[::-1] if reverse else ids  # [EOS] ... [SOS]
                logp = F.log_softmax(head(grid, torch.tensor([ids])), dim=-1)[0]
                for t in range(1, len(ids)):
                    if ids[t] != 0:  # <unk> targets are not scored, as in training
                        total -= logp[t - 1, ids[t]].item()
                        count += 1
    return total, count


@pytest.mark.parametrize("task_name", ["bicaptioning", "captioning"])
def test_score_matches_direct_computation(tmp_path, coco_fixture, coco_tokenizer_path, task_name, capsys):
    task, tokenizer = make_checkpoint(tmp_path / "ckpt.pt", coco_tokenizer_path, task_name)
    code = main(["score", "--checkpoint", str(tmp_path / "ckpt.pt"), "--annotations", str(coco_fixture),
                 "--device", "cpu", "--batch-size", "3", "--workers", "0", "--no-progress"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = read_records(coco_fixture)
    total, count = direct_nll(task, tokenizer, records, "textual", reverse=False)
    assert result["captions"] == sum(len(r.captions) for r in records) == 9
    assert result["tokens"] == count and result["images"] == 4
    assert result["nll_forward"] == pytest.approx(total / count, rel=1e-5)
    if task_name == "captioning":
        assert "nll_backward" not in result
        return
    total_b, count_b = direct_nll(task, tokenizer, records, "backward_textual", reverse=True)
    assert count_b == count and result["nll_backward"] == pytest.approx(total_b / count_b, rel=1e-5)
