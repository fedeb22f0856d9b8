"""Import of original VirTex checkpoints: exact key mapping, inferred architecture, identical logits.

The original's layout comes from ``tests/data/virtex_bicaptioning_R_50_L1_H2048_keys.txt`` (keys,
shapes, dtypes and the sharing notes of kdexd/virtex); its forward pass is re-implemented here on
plain ``torch.nn.TransformerDecoder`` exactly as ``virtex/modules/textual_heads.py`` does it.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

from capvis.cli import main
from capvis.config import load_config
from capvis.errors import CheckpointError
from capvis.interop.virtex import convert
from capvis.loading import load_pretrained
from capvis.release import build_loaded_task

KEYS = Path(__file__).parent / "data" / "virtex_bicaptioning_R_50_L1_H2048_keys.txt"


def reference_entries() -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    rows = []
    for line in KEYS.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.split(",")) if shape else (), getattr(torch, dtype)))
    return rows


def shared_with(key: str) -> str:
    """The key whose tensor ``key`` IS in the original (the sharing notes of the key list)."""
    if key.startswith("backward_textual.") and ".transformer." not in key:
        key = "textual." + key[len("backward_textual."):]
    return "textual.embedding.words.weight" if key == "textual.output.weight" else key


def synthesize(entries, *, fill: str = "random", seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict following ``entries``; tied keys get the very same tensor, as in the original."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape, dtype in entries:
        canonical = shared_with(key)
        if canonical in state:
            state[key] = state[canonical]
            continue
        if fill == "meta":
            t = torch.empty(shape, dtype=dtype, device="meta")
        elif fill == "zeros" or dtype == torch.int64:
            t = torch.zeros(shape, dtype=dtype)
        elif key.endswith("running_var") or (("norm" in key or "bn" in key or ".downsample.1." in key)
                                            and key.endswith("weight")):
            t = torch.empty(shape).uniform_(0.9, 1.1, generator=g)
        else:
            t = torch.empty(shape).uniform_(-0.04, 0.04, generator=g)  # uniform: cheaper than randn at 182M
        state[canonical] = state[key] = t
    return state


def paper_entries(name: str) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """The original's key list for another paper config: textual widths/depths substituted, visual keys
    from torchvision's model (the original's backbone is torchvision's ResNet with fc removed)."""
    cfg = load_config(name)
    m, t = cfg.model, cfg.model.textual
    h = t.hidden
    with torch.device("meta"):
        cnn = getattr(tvm, m.backbone)().state_dict()
    entries = [(f"visual.cnn.{k}", tuple(v.shape), v.dtype) for k, v in cnn.items() if not k.startswith("fc.")]
    subst = {2048: h, 6144: 3 * h, 8192: 4 * h}
    for key, shape, dtype in reference_entries():
        if key.startswith("visual.") or (m.task == "captioning" and key.startswith("backward_textual.")):
            continue
        shape = (h, 2048) if key.endswith("visual_projection.weight") else tuple(subst.get(s, s) for s in shape)
        layers = range(t.layers) if ".layers.0." in key else [None]
        entries += [(key.replace(".layers.0.", f".layers.{i}.") if i is not None else key, shape, dtype)
                    for i in layers]
    return entries


def test_reference_key_list_converts_with_no_missing_or_unexpected_keys():
    entries = reference_entries()
    assert len(entries) == 370
    state = synthesize(entries)
    cfg, converted = convert(state)
    m = cfg.model
    assert (m.task, m.backbone, m.small_stem, m.textual.layers, m.textual.hidden, m.textual.heads,
            m.textual.feedforward, m.textual.norm_first, m.vocab_size, cfg.data.max_caption_length) == (
        "bicaptioning", "resnet50", False, 1, 2048, 32, 8192, False, 10000, 30)
    task = build_loaded_task(cfg, m.vocab_size, converted)
    result = task.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    own = task.state_dict()
    assert list(own) == [k for k, _, _ in entries]
    assert all(own[k].dtype == d and tuple(own[k].shape) == s and torch.equal(own[k], state[k]) for k, s, d in entries)
    assert task.textual.output.weight is task.textual.embedding.words.weight  # tied as in the original
    assert task.backward_textual.embedding is task.textual.embedding
    assert task.backward_textual.output is task.textual.output
    assert task.backward_textual.transformer is not task.textual.transformer
    batch = {"image": torch.randn(1, 3, 64, 64), "caption_tokens": torch.tensor([[1, 17, 404, 9, 2]]),
             "caption_lengths": torch.tensor([5])}
    with torch.no_grad():
        out = task.eval()(batch)
    assert torch.isfinite(out.loss) and set(out.logs) == {"loss_forward", "loss_backward"}


@pytest.mark.parametrize("name", [
    "bicaptioning_R_50_L1_H512", "bicaptioning_R_50_L1_H768", "bicaptioning_R_50_L1_H1024",
    "bicaptioning_R_50_L2_H1024", "bicaptioning_R_50_L3_H1024", "bicaptioning_R_50_L4_H1024",
    "captioning_R_50_L1_H2048", "bicaptioning_R_101_L1_H1024", "bicaptioning_R_50W2X_L1_H1024"])
def test_every_paper_architecture_is_inferred_from_shapes(name):
    entries = paper_entries(name)
    state = synthesize(entries, fill="meta")  # shapes only: nothing is allocated
    cfg, converted = convert(state)
    want, got = load_config(name).model, cfg.model
    for field in ("task", "backbone", "small_stem"):
        assert getattr(got, field) == getattr(want, field), field
    for field in ("layers", "hidden", "heads", "feedforward", "norm_first"):
        assert getattr(got.textual, field) == getattr(want.textual, field), field
    assert sorted(converted) == sorted(k for k, _, _ in entries)


def test_prenorm_head_is_recognised():
    entries = paper_entries("bicaptioning_R_50_L1_H512")
    entries += [(f"{p}.transformer.norm.{w}", (512,), torch.float32)
                for p in ("textual", "backward_textual") for w in ("weight", "bias")]
    cfg, _ = convert(synthesize(entries, fill="meta"))
    assert cfg.model.textual.norm_first is True


def test_untied_values_and_foreign_keys_are_rejected():
    entries = paper_entries("bicaptioning_R_50_L1_H512")
    state = synthesize(entries, fill="meta")
    state["backward_textual.output.bias"] = torch.ones(10000)  # not the same tensor as the forward bias
    with pytest.raises(CheckpointError, match="differ"):
        convert(state)
    state = synthesize(entries, fill="meta")
    state["textual.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="unexpected"):
        convert(state)


# ------------------------------------------------------------------------------------------------
# The original forward pass, re-implemented on torch.nn (virtex/modules/{embedding,textual_heads}.py)


class OriginalEmbedding(nn.Module):
    def __init__(self, vocab: int, hidden: int, max_len: int = 30) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab, hidden, padding_idx=0)
        self.positions = nn.Embedding(max_len, hidden)
        self.layer_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.dropout = nn.Dropout(0.1)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        x = self.dropout(self.layer_norm(self.words(tokens) + self.positions(positions)))
        return x * (tokens != 0).unsqueeze(-1).type(x.dtype)


class OriginalHead(nn.Module):
    def __init__(self, visual: int, vocab: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.visual_projection = nn.Linear(visual, hidden)
        self.embedding = OriginalEmbedding(vocab, hidden)
        layer = nn.TransformerDecoderLayer(hidden, hidden // 64, 4 * hidden, dropout=0.1, activation="gelu",
                                           batch_first=True, norm_first=False)
        self.transformer = nn.TransformerDecoder(layer, layers)
        self.output = nn.Linear(hidden, vocab)
        self.output.weight = self.embedding.words.weight

    def forward(self, grid, tokens, lengths):
        b, c = grid.shape[:2]
        memory = self.visual_projection(grid.view(b, c, -1).permute(0, 2, 1))  # (B, hw, H)
        t = tokens.shape[1]
        padding = lengths.unsqueeze(1) < torch.ones_like(tokens).cumsum(dim=1)  # True at padding
        future = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        x = self.transformer(self.embedding(tokens), memory, tgt_mask=future, tgt_key_padding_mask=padding)
        return self.output(x)


class OriginalBicaptioning(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.visual = nn.Module()
        self.visual.cnn = tvm.resnet18()
        self.visual.cnn.fc = nn.Identity()
        self.textual = OriginalHead(512, vocab, hidden, layers)
        self.backward_textual = copy.deepcopy(self.textual)
        self.backward_textual.visual_projection = self.textual.visual_projection
        self.backward_textual.embedding = self.textual.embedding
        self.backward_textual.output = self.textual.output

    def grid(self, images):
        c = self.visual.cnn
        return c.layer4(c.layer3(c.layer2(c.layer1(c.maxpool(c.relu(c.bn1(c.conv1(images))))))))


def test_converted_model_gives_the_originals_logits(tmp_path, coco_tokenizer_path, capsys):
    from capvis.data.tokenizer import Tokenizer

    vocab = Tokenizer(coco_tokenizer_path).vocab_size
    torch.manual_seed(0)
    original = OriginalBicaptioning(vocab, hidden=128, layers=2)
    with torch.no_grad():  # nothing at its init value: every bias, norm and BN statistic matters
        for name, p in original.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
        for name, b in original.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.rand_like(b) + 0.5 if name.endswith("running_var") else 0.1 * torch.randn_like(b))
    original.eval()
    src = tmp_path / "checkpoint_4000.pth"
    torch.save({"model": original.state_dict(), "optimizer": {}, "scheduler": {}, "scaler": {}, "iteration": 4000}, src)
    out = tmp_path / "converted.pt"
    assert main(["import-virtex", str(src), "--vocab", str(coco_tokenizer_path), "--output", str(out)]) == 0
    assert "bicaptioning, resnet18, L2 H128 A2 F512" in capsys.readouterr().out
    pre = load_pretrained(out)
    task = pre.task.eval()
    assert pre.iteration == 4000 and pre.tokenizer.vocab_size == vocab

    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 64, 64, generator=g)
    tokens = torch.tensor([[1, 5, 9, 0, 7, 2, 0, 0],  # an <unk> (id 0) inside a caption
                           [1, 11, 12, 13, 14, 15, 16, 2],
                           [1, 30, 2, 0, 0, 0, 0, 0]])
    lengths = torch.tensor([6, 8, 3])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.TransformerDecoder: mixed bool/float masks, as the original passes
        grid = original.grid(images)
        assert torch.allclose(task.visual(images), grid, atol=1e-5, rtol=1e-5)
        ref_f = original.textual(grid, tokens, lengths)
        rev = torch.stack([torch.cat([row[:n].flip(0), row[n:]]) for row, n in zip(tokens, lengths)])
        ref_b = original.backward_textual(grid, rev, lengths)
        ours_f = task.textual(grid, tokens, lengths)
        ours_b = task.backward_textual(grid, rev, lengths)
        loss = task({"image": images, "caption_tokens": tokens, "caption_lengths": lengths}).loss
    assert (ours_f - ref_f).abs().max() < 1e-5 and (ours_b - ref_b).abs().max() < 1e-5
    ref_loss = sum(F.cross_entropy(lg[:, :-1].flatten(0, 1), tk[:, 1:].flatten(), ignore_index=0)
                   for lg, tk in ((ref_f, tokens), (ref_b, rev)))
    assert abs(loss.item() - ref_loss.item()) < 1e-5


def test_import_errors_are_one_line(tmp_path, coco_tokenizer_path, capsys):
    src = tmp_path / "bare_state_dict.pth"
    torch.save({f"module.{k}": v for k, v in OriginalBicaptioning(50, 64, 1).state_dict().items()}, src)  # DDP-style
    code = main(["import-virtex", str(src), "--vocab", str(coco_tokenizer_path), "--output", str(tmp_path / "o.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "has 120 pieces but the checkpoint's word embedding has 50 rows" in err
    assert len(err.strip().splitlines()) == 1
    code = main(["import-virtex", str(src), "--vocab", str(coco_tokenizer_path), "--output", str(tmp_path / "o.pt"),
                 "--config", "bicaptioning_R_50_L1_H2048"])
    err = capsys.readouterr().err
    assert code == 2 and "model.backbone: config 'resnet50' vs checkpoint 'resnet18'" in err
    assert "model.textual.hidden: config 2048 vs checkpoint 64" in err
    assert not (tmp_path / "o.pt").exists()
