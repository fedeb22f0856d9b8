"""Captioning tasks: causality both ways, sharing, loss, param groups, key layout and paper counts."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from capvis import cli
from capvis.config import load_config
from capvis.errors import ConfigError
from capvis.tasks import TASKS, BicaptioningTask, CaptioningTask, build_task, count_parameters
from capvis.tasks.captioning import caption_loss, reverse_captions
from capvis.train.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")  # restored after each test (conftest)

DATA = Path(__file__).parent / "data"
PAPER = dict(total=182_555_472, visual=23_508_032, textual=159_047_440)


def tiny_cfg(task: str = "bicaptioning", backbone: str = "resnet18", **extra: object):
    overrides = [f"model.task={task}", f"model.backbone={backbone}", "model.small_stem=true",
                 "model.textual.hidden=64", "model.textual.layers=2", "data.max_caption_length=10",
                 "model.vocab_size=40"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def tiny_batch(b: int = 3, t: int = 8, vocab: int = 40, size: int = 32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, vocab, (b, t), generator=gen)
    lengths = torch.tensor([t, t - 3, 4, t - 1, t][:b])
    tokens[:, 0] = 1
    for i, n in enumerate(lengths.tolist()):
        tokens[i, n - 1] = 2
        tokens[i, n:] = 0
    return {"image": torch.randn(b, 3, size, size, generator=gen), "caption_tokens": tokens,
            "caption_lengths": lengths, "image_id": torch.arange(b)}


def test_registry_and_build() -> None:
    assert {"captioning", "bicaptioning"} <= set(TASKS.names())
    assert isinstance(build_task(tiny_cfg("captioning"), 40), CaptioningTask)
    assert isinstance(build_task(tiny_cfg(), 40), BicaptioningTask)
    with pytest.raises(ConfigError, match="bicaptioning"):
        build_task(tiny_cfg("bicaptionin"), 40)


def test_reverse_captions() -> None:
    tokens = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]])
    expected = torch.tensor([[2, 7, 6, 5, 1], [2, 8, 1, 0, 0]])
    assert torch.equal(reverse_captions(tokens, torch.tensor([5, 3])), expected)


def test_sharing_between_heads() -> None:
    task = build_task(tiny_cfg(), 40)
    f, b = task.textual, task.backward_textual
    assert f.output.weight is f.embedding.words.weight  # tied output
    assert b.visual_projection is f.visual_projection and b.embedding is f.embedding and b.output is f.output
    assert b.output.weight is f.embedding.words.weight
    assert b.transformer is not f.transformer
    for (name, p), (_, q) in zip(f.transformer.named_parameters(), b.transformer.named_parameters()):
        assert p is not q and torch.equal(p, q), name


def _changed_at(batch: dict[str, torch.Tensor], row: int, position: int) -> dict[str, torch.Tensor]:
    out = dict(batch)
    out["caption_tokens"] = batch["caption_tokens"].clone()
    out["caption_tokens"][row, position] = 4 + (int(out["caption_tokens"][row, position]) - 3) % 36
    return out


def test_causality_forward_and_backward() -> None:
    torch.manual_seed(0)
    task = build_task(tiny_cfg(), 40).eval()
    batch = tiny_batch(1, t=8, size=16)
    grid = task.visual(batch["image"])
    n = int(batch["caption_lengths"][0])

    def logits(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        tok, lengths = b["caption_tokens"], b["caption_lengths"]
        rev = reverse_captions(tok, lengths)
        return task.textual(grid, tok, lengths)[0], task.backward_textual(grid, rev, lengths)[0]

    fwd, bwd = logits(batch)
    for j in range(1, n - 1):  # change caption word j
        f2, b2 = logits(_changed_at(batch, 0, j))
        assert torch.equal(f2[:j], fwd[:j]) and not torch.allclose(f2[j], fwd[j])
        r = n - 1 - j  # its position in the reversed caption
        assert torch.equal(b2[:r], bwd[:r]) and not torch.allclose(b2[r], bwd[r])


def test_loss_ignores_padding_and_sums_directions() -> None:
    torch.manual_seed(0)
    task = build_task(tiny_cfg(), 40).eval()
    batch = tiny_batch(2, size=16)
    out = task(batch)
    assert set(out.logs) == {"loss_forward", "loss_backward"}
    torch.testing.assert_close(out.loss, out.logs["loss_forward"] + out.logs["loss_backward"])
    more_pad = torch.cat([batch["caption_tokens"], torch.zeros(2, 2, dtype=torch.long)], 1)
    padded = dict(batch, caption_tokens=more_pad)
    torch.testing.assert_close(task(padded).loss, out.loss)
    logits = torch.randn(1, 4, 40)
    tokens = torch.tensor([[1, 7, 2, 0]])
    expected = torch.nn.functional.cross_entropy(logits[0, :2], tokens[0, 1:3])
    torch.testing.assert_close(caption_loss(logits, tokens), expected)


@pytest.mark.parametrize("task_name", ["captioning", "bicaptioning", "coca"])
def test_label_smoothing_trains_on_the_smoothed_target_and_validates_on_plain_nll(task_name: str) -> None:
    s, batch = 0.1, tiny_batch(3, size=16)
    tasks = {}
    for smoothing in (0.0, s):
        torch.manual_seed(0)
        tasks[smoothing] = build_task(tiny_cfg(task_name, **{"model.textual.label_smoothing": smoothing}), 40)
    torch.testing.assert_close(tasks[s].eval()(batch).loss, tasks[0.0].eval()(batch).loss)  # validation
    plain, smoothed = tasks[0.0].train(), tasks[s].train()
    assert plain.label_smoothing == 0.0 and smoothed.label_smoothing == s
    torch.manual_seed(1)
    logits = smoothed.textual(smoothed.visual(batch["image"]), batch["caption_tokens"])
    tokens = batch["caption_tokens"]
    logp, target = logits[:, :-1].log_softmax(-1), tokens[:, 1:]
    keep = target != 0
    nll = -logp.gather(-1, target.unsqueeze(-1))[..., 0][keep].mean()
    uniform = -logp.mean(-1)[keep].mean()  # cross-entropy against the uniform distribution
    torch.testing.assert_close(smoothed.caption_loss(logits, tokens), (1 - s) * nll + s * uniform)
    torch.testing.assert_close(plain.caption_loss(logits, tokens), nll)
    torch.testing.assert_close(smoothed.eval().caption_loss(logits, tokens), nll)  # validation: plain NLL
    torch.manual_seed(2)
    train_loss = tasks[s].train()(batch).loss
    torch.manual_seed(2)
    assert not torch.equal(train_loss, tasks[0.0].train()(batch).loss)


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_label_smoothing_outside_0_1_is_a_config_error(value: float) -> None:
    with pytest.raises(ConfigError, match="model.textual.label_smoothing"):
        tiny_cfg(**{"model.textual.label_smoothing": value})


@pytest.mark.parametrize("task_name", ["captioning", "bicaptioning"])
@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_every_parameter_gets_a_gradient(task_name: str, backbone: str) -> None:
    torch.manual_seed(0)
    task = build_task(tiny_cfg(task_name, backbone), 40).train()
    out = task(tiny_batch(2, size=32))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in task.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(torch.isfinite(v) and v.ndim == 0 and not v.requires_grad for v in out.logs.values())


def test_channels_last_and_autocast() -> None:
    torch.manual_seed(0)
    task = build_task(tiny_cfg(), 40).eval().requires_grad_(False)
    batch = tiny_batch(2, size=32)
    ref = task(batch).loss
    task = task.to(memory_format=torch.channels_last)
    cl = dict(batch, image=batch["image"].to(memory_format=torch.channels_last))
    torch.testing.assert_close(task(cl).loss, ref, atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = task(cl).loss
    assert low.dtype == torch.float32 and abs(low.item() - ref.item()) < 0.1


def test_param_groups_by_name() -> None:
    cfg = tiny_cfg(**{"train.weight_decay": 1e-4, "train.lr_backbone": 0.2, "train.lr_textual": 1e-3})
    task = build_task(cfg, 40)
    groups = task.param_groups(cfg.train)
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["visual/decay", "textual/decay", "textual/no_decay"]
    names = {key: set(g["param_names"]) for key, g in by_name.items()}
    assert {"visual.cnn.bn1.weight", "visual.cnn.conv1.weight"} <= names["visual/decay"]
    assert {"textual.embedding.words.weight", "textual.embedding.positions.weight",
            "textual.visual_projection.weight", "textual.transformer.layers.0.linear1.weight",
            "textual.transformer.layers.0.self_attn.in_proj_weight",
            "backward_textual.transformer.layers.1.multihead_attn.out_proj.weight"} <= names["textual/decay"]
    assert {"textual.embedding.layer_norm.weight", "textual.embedding.layer_norm.bias",
            "textual.transformer.layers.0.norm1.weight",
            "textual.transformer.layers.0.self_attn.in_proj_bias",
            "textual.transformer.layers.0.linear2.bias", "textual.output.bias",
            "textual.visual_projection.bias",
            "backward_textual.transformer.layers.0.norm3.bias"} <= names["textual/no_decay"]
    assert by_name["visual/decay"]["lr"] == 0.2 and by_name["textual/decay"]["lr"] == 1e-3
    assert by_name["textual/no_decay"]["weight_decay"] == 0.0
    assert by_name["textual/decay"]["weight_decay"] == 1e-4
    listed = [p for g in groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed}) == len(list(task.parameters()))
    assert not any(n.startswith("backward_textual.embedding") or n == "textual.output.weight"
                   for g in groups for n in g["param_names"])  # shared tensors listed once
    build_optimizer(groups, cfg.train)  # the trainer's optimizer takes them as they are


@pytest.fixture(scope="module")
def paper_task() -> BicaptioningTask:
    cfg = load_config("configs/bicaptioning_R_50_L1_H2048.yaml" if Path("configs").exists()
                      else "bicaptioning_R_50_L1_H2048")
    return build_task(cfg, cfg.model.vocab_size)


def test_paper_parameter_counts(paper_task: BicaptioningTask) -> None:
    counts = count_parameters(paper_task)
    print(f"\nVirTex R-50 L1 H2048 (vocab 10000) parameters: {counts}")
    assert counts == PAPER


def test_state_dict_matches_original_layout(paper_task: BicaptioningTask) -> None:
    reference = {}
    for line in (DATA / "virtex_bicaptioning_R_50_L1_H2048_keys.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, dtype = line.split("\t")
            reference[key] = (tuple(int(s) for s in shape.split(",")) if shape else (), dtype)
    ours = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in paper_task.state_dict().items()}
    assert len(reference) == 370
    assert set(ours) ^ set(reference) == set()
    assert ours == reference


def test_summary_json_shows_paper_counts() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["summary", "--config", "bicaptioning_R_50_L1_H2048", "--json"]) == 0
    info = json.loads(out.getvalue())
    assert info["params"] == PAPER
    assert info["config"]["model"]["textual"]["heads"] == 32 and info["vocab_size"] == 10000


def test_summary_text_and_overrides() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["summary", "--config", "bicaptioning_R_50_L1_H2048", "model.task=captioning"]) == 0
    text = out.getvalue()
    assert "task: captioning" in text and "91,899,664" in text  # forward head only


@pytest.mark.parametrize(("task_name", "reads_lengths"), [("captioning", False), ("bicaptioning", True),
                                                         ("coca", True), ("masked_lm", True), ("icmlm", True)])
def test_caption_lengths_come_from_the_batch_or_the_padding(task_name: str, reads_lengths: bool) -> None:
    """Every caption task reads a caption's length through one rule (capvis.tasks.base.caption_lengths):
    the collate's ``caption_lengths``, else the count of non-padding tokens; both give the same loss. Where
    the loss depends on the lengths (the backward caption is reversed within them, encoders mask by them),
    lengths that disagree with the padding change it, so the batch's lengths are really read; a forward
    captioner's causal loss needs no length."""
    torch.manual_seed(0)
    task = build_task(tiny_cfg(task_name), 40).eval()
    batch = tiny_batch(3, size=16)
    losses = {}
    for name, lengths in (("given", batch["caption_lengths"]), ("derived", None),
                          ("shorter", batch["caption_lengths"] - 1)):
        rows = {k: v for k, v in batch.items() if k != "caption_lengths"}
        if lengths is not None:
            rows["caption_lengths"] = lengths
        torch.manual_seed(1)
        losses[name] = task(rows).loss
    torch.testing.assert_close(losses["derived"], losses["given"])
    assert torch.equal(losses["shorter"], losses["given"]) != reads_lengths
