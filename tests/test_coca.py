"""CoCa: a weight of 0 gives the other task's loss exactly (same seed, same values), both losses fall on
CaptionWorld in a short run, the bundled config, the capabilities it declares, and bad settings."""

from __future__ import annotations

import math

import pytest
import torch

from capvis.config import load_config
from capvis.errors import ConfigError
from capvis.tasks import build_task
from capvis.tasks.protocols import CaptionLikelihoodModel, ImageTextEmbedder

pytestmark = pytest.mark.usefixtures("one_thread")  # restored after each test (conftest)
VOCAB = 40


def tiny(task: str, *extra: str):
    return load_config(None, [f"model.task={task}", "model.backbone=resnet18", "model.textual.hidden=64",
                              "model.textual.dropout=0", "data.max_caption_length=10",
                              "model.contrastive.embed_dim=16", *extra])


def batch(n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([3, 6, 4, 5, 6, 3][:n])
    tokens = torch.randint(4, VOCAB, (n, 6), generator=g)
    tokens[:, 0] = 1
    for i, k in enumerate(lengths.tolist()):
        tokens[i, k - 1], tokens[i, k:] = 2, 0
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "caption_tokens": tokens, "caption_lengths": lengths,
            "image_id": torch.arange(n)}


def loss_and_grad(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    task = build_task(cfg, VOCAB).train()
    out = task(batch())
    out.loss.backward()
    return out.loss.detach(), task.visual.cnn.conv1.weight.grad.clone()


@pytest.mark.parametrize("weights, other, extra", [
    (("caption_weight=0",), "contrastive", ()),
    (("caption_weight=0",), "contrastive", ("model.contrastive.loss=siglip",)),
    (("contrastive_weight=0", "caption_weight=1"), "captioning", ()),
    (("contrastive_weight=0", "caption_weight=1", "bidirectional=true"), "bicaptioning", ()),
])
def test_a_zero_weight_gives_the_other_task(weights, other, extra) -> None:
    """Same seed, same batch: the same loss and the same backbone gradient, bit for bit."""
    coca = tiny("coca", "model.coca.image_pool=mean", *[f"model.coca.{w}" for w in weights], *extra)
    loss, grad = loss_and_grad(coca)
    expected_loss, expected_grad = loss_and_grad(tiny(other, *extra))
    assert torch.equal(loss, expected_loss), (loss, expected_loss)
    assert torch.equal(grad, expected_grad)


def test_default_coca_weights_both_losses_and_logs_them() -> None:
    torch.manual_seed(0)
    task = build_task(tiny("coca", "model.coca.bidirectional=true"), VOCAB).train()
    out = task(batch())
    logs = out.logs
    assert {"loss_forward", "loss_backward", "loss_caption", "loss_contrastive", "logit_scale"} <= logs.keys()
    assert logs["loss_caption"] == logs["loss_forward"] + logs["loss_backward"]
    assert out.loss.item() == pytest.approx(2 * logs["loss_caption"].item() + logs["loss_contrastive"].item(),
                                            rel=1e-6)
    assert task.image_pool is not None and not hasattr(task, "image_projection")  # attention-pooled by default
    assert isinstance(task, ImageTextEmbedder) and isinstance(task, CaptionLikelihoodModel)
    assert [h.name for h in task.caption_heads()] == ["forward", "backward"]
    emb = task.eval().encode_image(batch()["image"])
    assert emb.shape == (6, 16) and torch.allclose(emb.norm(dim=1), torch.ones(6))
    from capvis.models.decoding import greedy_decode

    assert len(greedy_decode(task, batch(2)["image"], max_steps=5).tokens) == 2  # it captions like a captioner


def test_bundled_config_and_bad_settings() -> None:
    cfg = load_config("coca_R_50")
    assert cfg.model.task == "coca" and cfg.model.backbone == "resnet50" and cfg.model.textual.hidden == 2048
    assert (cfg.model.coca.caption_weight, cfg.model.coca.contrastive_weight) == (2.0, 1.0)
    for bad, message in (("model.coca.caption_weight=-1", "must be finite, >= 0"),
                         ("model.coca.contrastive_weight=0", "not both 0"),
                         ("model.coca.image_pool=max", "image_pool must be one of attention, mean")):
        extra = (bad, "model.coca.caption_weight=0") if "contrastive_weight=0" in bad else (bad,)
        with pytest.raises(ConfigError, match=message):
            build_task(tiny("coca", *extra), VOCAB)


def test_both_losses_fall_on_captionworld(tmp_path) -> None:
    """40 steps of 16 images on 32 CaptionWorld images (~5 s): captioning and contrastive losses both fall,
    the contrastive one below ln(16), the loss of matching at chance."""
    from capvis.data.annotations import read_caption_texts
    from capvis.data.tokenizer import train_tokenizer
    from capvis.world import write_world
    from capvis.train.loop import Trainer, read_metrics

    world = tmp_path / "world"
    write_world(world, {"train": 32}, seed=0, image_size=32, workers=1)
    captions = world / "annotations" / "captions_train.json"
    vocab = train_tokenizer(read_caption_texts([captions]), tmp_path / "vocab", vocab_size=150)
    cfg = load_config("coca_R_50", [
        f"data.train={captions}", "data.val=", f"data.vocab={vocab}", "data.image_size=32", "data.num_workers=0",
        "data.max_caption_length=20", "data.crop_scale=[0.9,1.0]", "data.color_jitter_p=0",
        "model.backbone=resnet18", "model.visual_width=16", "model.textual.hidden=64", "model.textual.heads=4",
        "model.textual.dropout=0", "model.contrastive.embed_dim=64", "train.batch_size=16", "train.iterations=40",
        "train.warmup=0", "train.schedule=none", "train.optimizer=adamw", "train.lr_backbone=0.002",
        "train.lr_textual=0.002", "train.weight_decay=0", "train.lookahead=false", "train.log_every=1",
        "train.checkpoint_every=40", "train.channels_last=false", "train.device=cpu"])
    Trainer(cfg, tmp_path / "run", progress=False).run()
    rows = [r for r in read_metrics(tmp_path / "run") if "loss_caption" in r]
    assert len(rows) == 40
    for key in ("loss_caption", "loss_contrastive"):
        first, last = (sum(r[key] for r in part) / 5 for part in (rows[:5], rows[-5:]))
        assert last < 0.8 * first, (key, first, last)
    assert sum(r["loss_contrastive"] for r in rows[-5:]) / 5 < math.log(16)
