"""The pretext-task family: every registered task trains, masked LM masks right, ICMLM stays frozen,
the classification targets and COCO instance categories are what the paper uses."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from capvis.config import load_config
from capvis.data.tokenizer import EOS_ID, MASK_ID, PAD_ID, SOS_ID
from capvis.errors import ConfigError
from capvis.tasks import TASKS, build_task
from capvis.tasks.classification import soft_target_loss, token_targets
from capvis.tasks.contrastive import clip_loss
from capvis.tasks.masked_lm import IGNORE_INDEX, mask_tokens

pytestmark = pytest.mark.usefixtures("one_thread")  # restored after each test (conftest)

VOCAB = 48
NEW_TASKS = ("token_classification", "multilabel_classification", "masked_lm", "icmlm", "contrastive")


def tiny_cfg(task: str, *extra: str):
    return load_config(None, [f"model.task={task}", "model.backbone=resnet18", "model.textual.hidden=64",
                              "model.textual.dropout=0", "data.max_caption_length=10", "model.num_categories=5",
                              "model.contrastive.embed_dim=32", *extra])


def structured_batch(n: int = 8, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Four classes: a class colour in the image, class words (and a per-sample word) in the caption,
    the class as the one instance category. Captions have different lengths."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.arange(n) % 4
    colors = torch.rand(4, 3, 1, 1, generator=g) * 2 - 1
    image = colors[cls] + 0.3 * torch.randn(n, 3, size, size, generator=g)
    rows = [[SOS_ID, *[4 + 4 * int(c) + k for k in range(1 + i % 3)], 20 + i, EOS_ID] for i, c in enumerate(cls)]
    lengths = torch.tensor([len(r) for r in rows])
    tokens = torch.zeros(n, int(lengths.max()), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    return {"image": image, "caption_tokens": tokens, "caption_lengths": lengths, "image_id": torch.arange(n),
            "categories": torch.nn.functional.one_hot(cls, 5).float()}


@pytest.mark.parametrize("name", TASKS.names())
def test_every_task_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    task = build_task(tiny_cfg(name), VOCAB).train()
    out = task(structured_batch(n=4))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert all(v.ndim == 0 and not v.requires_grad for v in out.logs.values())
    out.loss.backward()
    missing = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in task.parameters() if p.grad is not None)
    names = {n for g in task.param_groups(SimpleNamespace(lr_backbone=0.1, lr_textual=0.01, weight_decay=1e-4))
             for n in g["param_names"]}
    assert names == {n for n, p in task.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", NEW_TASKS)
def test_loss_falls(name: str) -> None:
    torch.manual_seed(0)
    task = build_task(tiny_cfg(name), VOCAB).train()
    groups = task.param_groups(SimpleNamespace(lr_backbone=1e-3, lr_textual=1e-3, weight_decay=0.0))
    optimizer = torch.optim.AdamW(groups)
    batch = structured_batch()
    losses = []
    for _ in range(30):
        out = task(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, (name, first, last)


# -- masked LM ------------------------------------------------------------------------------------


def random_captions(b: int, t: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, t + 1, (b,), generator=g)
    tokens = torch.randint(4, vocab, (b, t), generator=g)
    tokens[:, 0] = SOS_ID
    for i, n in enumerate(lengths.tolist()):
        tokens[i, n - 1] = EOS_ID
        tokens[i, n:] = PAD_ID
    return tokens, lengths


def test_masking_statistics_and_rules() -> None:
    tokens, lengths = random_captions(4000, 30, 1000)
    inputs, targets = mask_tokens(tokens, lengths, vocab_size=1000, mask_proportion=0.15, mask_probability=0.8,
                                  replace_probability=0.1, generator=torch.Generator().manual_seed(1))
    selected = targets != IGNORE_INDEX
    words = tokens >= 4
    assert not selected[~words].any()  # never [SOS], [EOS] or padding
    assert selected.sum(1).ge(1).all()  # at least one per caption
    assert torch.equal(targets[selected], tokens[selected])
    assert torch.equal(inputs[~selected], tokens[~selected])
    share = selected.sum().item() / words.sum().item()
    assert abs(share - 0.15) < 0.01, share
    chosen = inputs[selected]
    masked = (chosen == MASK_ID).float().mean().item()
    kept = (chosen == tokens[selected]).float().mean().item()
    replaced = 1 - masked - kept
    assert abs(masked - 0.8) < 0.02 and abs(replaced - 0.1) < 0.02 and abs(kept - 0.1) < 0.02, (masked, replaced, kept)
    assert (chosen[chosen != MASK_ID] >= 4).all()  # random replacements are words, never special ids


def test_masked_positions_alone_carry_loss() -> None:
    torch.manual_seed(0)
    task = build_task(tiny_cfg("masked_lm"), VOCAB).train()
    seen: dict[str, torch.Tensor] = {}
    mask = task.mask

    def spy_mask(tokens, lengths):
        inputs, targets = mask(tokens, lengths)
        seen["targets"] = targets
        return inputs, targets

    def keep_logits(module, args, output):
        output.retain_grad()
        seen["logits"] = output

    task.mask = spy_mask
    task.textual.register_forward_hook(keep_logits)
    task(structured_batch()).loss.backward()
    carries = seen["logits"].grad.abs().sum(-1) > 0  # (B, T)
    assert torch.equal(carries, seen["targets"] != IGNORE_INDEX)


def test_masked_lm_head_is_bidirectional() -> None:
    torch.manual_seed(0)
    task = build_task(tiny_cfg("masked_lm"), VOCAB).eval()
    batch = structured_batch(n=2)
    grid = task.visual(batch["image"])
    tokens = batch["caption_tokens"].clone()
    a = task.textual(grid, tokens, batch["caption_lengths"])
    tokens[:, 2] = 30  # a later token changes the logits at position 1 (a causal head would not)
    b = task.textual(grid, tokens, batch["caption_lengths"])
    assert not torch.allclose(a[:, 1], b[:, 1])


# -- ICMLM ----------------------------------------------------------------------------------------


def test_icmlm_text_encoder_is_frozen_and_loaded_from_masked_lm(tmp_path) -> None:
    torch.manual_seed(0)
    mlm_cfg = tiny_cfg("masked_lm")
    mlm = build_task(mlm_cfg, VOCAB)
    path = tmp_path / "mlm.pt"
    torch.save({"model": mlm.state_dict(), "config": mlm_cfg.to_dict(), "vocab": None, "iteration": 1}, path)
    icmlm = build_task(tiny_cfg("icmlm", f"model.icmlm.text_encoder={path}"), VOCAB).train()
    layer, source = icmlm.text_encoder.transformer.layers[0], mlm.textual.transformer.layers[0]
    assert torch.equal(layer.self_attn.in_proj_weight, source.self_attn.in_proj_weight)
    assert torch.equal(layer.norm2.weight, source.norm3.weight)
    assert torch.equal(icmlm.text_encoder.embedding.words.weight, mlm.textual.embedding.words.weight)
    assert not icmlm.text_encoder.training and not any(p.requires_grad for p in icmlm.text_encoder.parameters())
    before = {k: v.clone() for k, v in icmlm.text_encoder.state_dict().items()}
    optimizer = torch.optim.AdamW(icmlm.param_groups(SimpleNamespace(lr_backbone=1e-2, lr_textual=1e-2,
                                                                      weight_decay=0.1)))
    for _ in range(2):
        optimizer.zero_grad()
        icmlm(structured_batch()).loss.backward()
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in icmlm.text_encoder.state_dict().items())
    with pytest.raises(ConfigError, match="vocabulary"):
        build_task(tiny_cfg("icmlm", f"model.icmlm.text_encoder={path}"), VOCAB + 1)
    with pytest.raises(ConfigError, match="not found"):
        build_task(tiny_cfg("icmlm", f"model.icmlm.text_encoder={tmp_path / 'missing.pt'}"), VOCAB)


# -- classification targets and losses -----------------------------------------------------------


def test_token_targets_ignore_order_repeats_and_specials() -> None:
    tokens = torch.tensor([[SOS_ID, 7, 5, 7, EOS_ID, PAD_ID], [SOS_ID, MASK_ID, 9, EOS_ID, PAD_ID, PAD_ID]])
    target = token_targets(tokens, 12)
    assert target[0].nonzero().flatten().tolist() == [5, 7]
    assert target[1].nonzero().flatten().tolist() == [9]
    assert torch.equal(token_targets(tokens.flip(1), 12), target)


def test_soft_target_loss_is_kl_to_normalised_k_hot() -> None:
    logits = torch.randn(3, 6)
    multi_hot = torch.tensor([[1.0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]])
    q = multi_hot[:2] / multi_hot[:2].sum(1, keepdim=True)
    expected = torch.nn.functional.kl_div(logits[:2].log_softmax(1), q, reduction="batchmean")
    assert soft_target_loss(logits, multi_hot).item() == pytest.approx(expected.item(), rel=1e-5)


def test_clip_loss_matches_the_definition() -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    text = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    scale = torch.tensor(10.0)
    loss, _ = clip_loss(image, text, scale)
    logits = scale * image @ text.T
    expected = -(logits.log_softmax(1).diag().mean() + logits.log_softmax(0).diag().mean()) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_contrastive_temperature_and_groups() -> None:
    task = build_task(tiny_cfg("contrastive"), VOCAB)
    assert task.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        task.logit_scale.fill_(10.0)
    assert task.scale().item() == 100.0
    groups = task.param_groups(SimpleNamespace(lr_backbone=0.1, lr_textual=0.01, weight_decay=1e-4))
    (group,) = [g for g in groups if "logit_scale" in g["param_names"]]
    assert group["weight_decay"] == 0.0
    batch = structured_batch(n=3)
    emb = task.eval().encode_text(batch["caption_tokens"], batch["caption_lengths"])
    assert emb.shape == (3, 32) and torch.allclose(emb.norm(dim=1), torch.ones(3))


# -- COCO instance categories through the data pipeline -----------------------------------------


def test_multilabel_batches_carry_instance_categories(tmp_path) -> None:
    from capvis.data.datasets import collate_captions
    from capvis.data.pipeline import build_caption_dataset
    from capvis.data.tokenizer import train_tokenizer
    from capvis.world import SHAPES, write_world

    write_world(tmp_path, {"train": 6}, seed=0, image_size=32, workers=1)
    ann = tmp_path / "annotations"
    texts = [a["caption"] for a in json.loads((ann / "captions_train.json").read_text())["annotations"]]
    vocab = train_tokenizer(texts, tmp_path / "vocab", vocab_size=60)
    cfg = tiny_cfg("multilabel_classification", f"data.train={ann / 'captions_train.json'}",
                   "model.num_categories=80", "data.image_size=32")
    from capvis.data.tokenizer import Tokenizer

    keys = TASKS.get("multilabel_classification").batch_keys  # the task declares it, the trainer passes it on
    dataset = build_caption_dataset(cfg, "train", Tokenizer(vocab), batch_keys=keys)
    batch = collate_captions([dataset[i] for i in range(6)])
    labels = json.loads((ann / "labels_train.json").read_text())["images"]
    expected = torch.zeros(6, len(SHAPES))
    for row, entry in enumerate(labels):
        expected[row, entry["labels"]["shape"]] = 1
    assert torch.equal(batch["categories"], expected)
    task = build_task(cfg, Tokenizer(vocab).vocab_size)
    assert torch.isfinite(task(batch).loss)  # 8 categories in the data, 80 outputs
    caption_cfg = tiny_cfg("bicaptioning", f"data.train={ann / 'captions_train.json'}", "data.image_size=32")
    caption_keys = TASKS.get("bicaptioning").batch_keys
    assert "categories" not in caption_keys
    assert "categories" not in build_caption_dataset(caption_cfg, "train", Tokenizer(vocab), batch_keys=caption_keys)[0]
    budget = tiny_cfg("bicaptioning", f"data.train={ann / 'captions_train.json'}", "data.cache_images_mb=3",
                      "data.num_workers=2")  # the budget is shared among the loader processes
    assert build_caption_dataset(budget, "train", Tokenizer(vocab)).decoded.budget == 3 * 2**20 // 2
    with pytest.raises(ConfigError, match="data.cache_images_mb must be >= 0"):
        build_caption_dataset(tiny_cfg("bicaptioning", f"data.train={ann / 'captions_train.json'}",
                                       "data.cache_images_mb=-1"), "train", Tokenizer(vocab))
    with pytest.raises(ConfigError, match="num_categories"):
        build_caption_dataset(tiny_cfg("multilabel_classification", f"data.train={ann / 'captions_train.json'}",
                                       "model.num_categories=4"), "train", Tokenizer(vocab), batch_keys=keys)


@pytest.mark.parametrize("name", NEW_TASKS)
def test_bundled_configs(name: str) -> None:
    cfg = load_config(f"{name}_R_50")
    assert cfg.model.task == name and cfg.model.backbone == "resnet50"
    assert cfg.model.textual.hidden == (1024 if "classification" in name else 2048)
