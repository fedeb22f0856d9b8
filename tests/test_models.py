"""Backbones, the SDPA decoder layer (vs nn.TransformerDecoderLayer), the textual head and its KV cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from capvis.errors import ConfigError
from capvis.models import BACKBONES, TextualHead, build_backbone
from capvis.models.attention import TransformerDecoderLayer

pytestmark = pytest.mark.usefixtures("one_thread")  # restored after each test (conftest)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_backbone_grid_and_pooled(name: str) -> None:
    torch.manual_seed(0)
    net = build_backbone(name, small_stem=True).eval()
    images = torch.randn(2, 3, 32, 32)
    grid = net(images)
    assert grid.shape == (2, net.num_features, 4, 4)  # small stem: stride 8 overall
    assert net.num_features == (512 if name == "resnet18" else 2048)
    assert torch.allclose(net.pooled(images), grid.mean(dim=(2, 3)))
    cl = net.to(memory_format=torch.channels_last)(images.to(memory_format=torch.channels_last))
    assert torch.allclose(cl, grid, atol=1e-5)
    assert isinstance(net.cnn.fc, nn.Identity)


def test_backbone_standard_stem_and_zero_init() -> None:
    net = build_backbone("resnet18")
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)  # stride 32
    assert net.cnn.conv1.kernel_size == (7, 7)
    assert torch.count_nonzero(net.cnn.layer1[0].bn2.weight) == 0  # zero_init_residual default
    plain = build_backbone("resnet18", zero_init_residual=False)
    assert torch.count_nonzero(plain.cnn.layer1[0].bn2.weight) > 0
    assert set(BACKBONES.names()) >= {"resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2"}
    with pytest.raises(ConfigError, match="resnet5"):
        build_backbone("resnet5O")


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_matches_torch(norm_first: bool) -> None:
    torch.manual_seed(0)
    ref = nn.TransformerDecoderLayer(64, 4, 128, dropout=0.1, activation="gelu", batch_first=True,
                                     norm_first=norm_first).eval()
    for p in ref.parameters():  # non-trivial biases and norms
        nn.init.normal_(p, std=0.2)
    ours = TransformerDecoderLayer(64, 4, 128, dropout=0.1, norm_first=norm_first).eval()
    ours.load_state_dict(ref.state_dict())  # strict: identical names and shapes
    shapes = [(k, v.shape) for k, v in ours.state_dict().items()]
    assert shapes == [(k, v.shape) for k, v in ref.state_dict().items()]
    x, memory = torch.randn(3, 7, 64), torch.randn(3, 5, 64)
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    expected = ref(x, memory, tgt_mask=causal, tgt_is_causal=True)
    got, _ = ours(x, memory, is_causal=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # key padding as VirTex passes it (tgt_key_padding_mask), checked on the non-pad positions
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 4:] = True
    future = torch.ones(7, 7, dtype=torch.bool).triu(1)  # nn convention: True = may NOT attend
    expected = ref(x, memory, tgt_mask=future, tgt_key_padding_mask=pad)
    mask = (torch.ones(7, 7, dtype=torch.bool).tril() & ~pad[:, None, :]).unsqueeze(1)
    got, weights = ours(x, memory, attn_mask=mask, need_weights=True)
    keep = ~pad
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=1e-5)
    assert weights.shape == (3, 7, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 7))


def _head(norm_first: bool = False, layers: int = 2, vocab: int = 50) -> TextualHead:
    return TextualHead(visual_features=24, vocab_size=vocab, hidden=32, layers=layers, heads=4,
                       dropout=0.1, norm_first=norm_first, max_len=12)


def _tokens(b: int = 3, t: int = 9, vocab: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(4, vocab, (b, t))
    tokens[:, 0] = 1
    lengths = torch.tensor([t, t - 3, t - 1][:b])
    for i, n in enumerate(lengths.tolist()):
        tokens[i, n - 1] = 2
        tokens[i, n:] = 0
    return tokens, lengths


def test_head_layout_tying_and_init() -> None:
    head = _head(norm_first=True)
    assert head.output.weight is head.embedding.words.weight
    assert torch.count_nonzero(head.embedding.words.weight[0]) == 0
    keys = set(head.state_dict())
    assert {"transformer.layers.1.self_attn.in_proj_weight", "transformer.norm.weight", "output.bias",
            "embedding.positions.weight", "embedding.layer_norm.weight", "visual_projection.bias"} <= keys
    assert head.embedding.layer_norm.eps == 1e-8
    assert float(head.output.bias.detach().abs().sum()) == 0.0  # capvis zeroes Linear biases
    assert 0.015 < float(head.transformer.layers[0].linear1.weight.detach().std()) < 0.025
    assert "transformer.norm.weight" not in _head().state_dict()


@pytest.mark.parametrize("norm_first", [False, True])
def test_head_causality(norm_first: bool) -> None:
    torch.manual_seed(0)
    head = _head(norm_first).eval()
    grid = torch.randn(2, 24, 3, 3)
    tokens, _ = _tokens(2, 8)
    base = head(grid, tokens)
    for t in range(7):
        changed = tokens.clone()
        changed[:, t + 1:] = torch.randint(4, 50, changed[:, t + 1:].shape)
        out = head(grid, changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1])
        assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])


@pytest.mark.parametrize("norm_first", [False, True])
def test_kv_cache_step_equals_full_forward(norm_first: bool) -> None:
    torch.manual_seed(0)
    head = _head(norm_first).eval()
    grid = torch.randn(3, 24, 2, 2)
    tokens = torch.randint(4, 50, (3, 10))
    tokens[:, 0] = 1
    full, full_attn = head(grid, tokens, return_attention=True)
    torch.testing.assert_close(head(grid, tokens), full)  # explicit-weights path == SDPA path
    cache = head.init_cache(grid)
    for t in range(10):
        step, attn = head.decode_step(tokens[:, t], cache, return_attention=True)
        torch.testing.assert_close(step, full[:, t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attn, full_attn[:, t], atol=1e-6, rtol=1e-5)
    assert cache.length == 10


def test_decode_step_refuses_past_positions() -> None:
    head = _head().eval()
    cache = head.init_cache(torch.randn(1, 24, 2, 2), max_len=2)
    head.decode_step(torch.tensor([1]), cache)
    head.decode_step(torch.tensor([5]), cache)
    with pytest.raises(ValueError, match="positions"):
        head.decode_step(torch.tensor([5]), cache)


def test_head_channels_last_and_autocast() -> None:
    torch.manual_seed(0)
    head = _head().eval()
    grid = torch.randn(2, 24, 3, 3)
    tokens, lengths = _tokens(2)
    ref = head(grid, tokens, lengths)
    torch.testing.assert_close(head(grid.to(memory_format=torch.channels_last), tokens, lengths), ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = head(grid, tokens, lengths)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
