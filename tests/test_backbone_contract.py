"""Every registered backbone keeps the contract: build, forward, every task, features, export, release.

The cases are the registry itself: a backbone registered without a case here fails
``test_every_registered_backbone_has_a_case``, and each case goes through every test below.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import FrozenBatchNorm2d

import capvis
from capvis.cli import main
from capvis.config import load_config
from capvis.data.tokenizer import Tokenizer
from capvis.errors import ConfigError
from capvis.models.backbones import BACKBONES, FAMILIES, Backbone, build_visual_for
from capvis.tasks import TASKS, build_task, count_parameters
from capvis.train.checkpoint import atomic_save

pytestmark = pytest.mark.usefixtures("one_thread")  # restored after each test (conftest)

SIZE = 32
SMALL_RESNET = ("model.small_stem=true", "model.visual_width=16")  # the family's shapes, a CPU's budget
CASES: dict[str, tuple[str, ...]] = {
    **{name: SMALL_RESNET for name in ("resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2")},
    "timm/vit_tiny_patch16_224": (),  # token model: 2x2 patch grid at 32 px, class token dropped
    "timm/convnext_atto": (),  # timm ConvNet: 1x1 grid at 32 px
}
TIMM_TOKEN, TIMM_CONV = "timm/vit_tiny_patch16_224", "timm/convnext_atto"


def cfg_of(name: str, *extra: str, task: str = "bicaptioning"):
    return load_config(None, [f"model.backbone={name}", *CASES[name], f"data.image_size={SIZE}", f"model.task={task}",
                              "model.textual.hidden=32", "model.textual.heads=2", "model.textual.feedforward=64",
                              "model.textual.dropout=0", "data.max_caption_length=8", "model.num_categories=5",
                              "model.contrastive.embed_dim=16", "model.vocab_size=40", *extra])


def backbone_of(name: str) -> Backbone:
    torch.manual_seed(0)
    return build_visual_for(cfg_of(name)).eval()


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_every_registered_backbone_has_a_case() -> None:
    assert set(BACKBONES.names()) <= set(CASES), "register a backbone, add its case here"
    for family in FAMILIES.names():
        assert any(name.startswith(f"{family}/") for name in CASES), family
    assert backbone_of(TIMM_TOKEN).prefix_tokens == 1 and backbone_of(TIMM_CONV).prefix_tokens == 0


@pytest.mark.parametrize("name", CASES)
def test_shapes_stages_and_groups(name: str) -> None:
    net = backbone_of(name)
    x = images()
    with torch.no_grad():
        grid = net(x)
        assert grid.ndim == 4 and grid.shape[:2] == (2, net.num_features)
        assert torch.allclose(net.pooled(x), grid.mean(dim=(2, 3)), atol=1e-5)
        grids = net.intermediates(x, list(net.stages))
    assert len(grids) == len(net.stages) and all(g.ndim == 4 and g.shape[0] == 2 for g in grids)
    assert torch.allclose(net.pooled(x, net.stages[0]), grids[0].mean(dim=(2, 3)), atol=1e-5)
    with pytest.raises(ConfigError, match="has no stage"):
        net.pooled(x, "layer9")
    params = dict(net.named_parameters())
    assert net.no_weight_decay() <= set(params)
    assert net.blocks() and all(any(b is m for m in net.modules()) for b in net.blocks())


def same_up_to_rounding(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal to float32 rounding at the tensor's scale (unnormalised deep ResNets reach ~100)."""
    return got.shape == want.shape and float((got - want).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("norm", ["batch", "frozen", "group"])
@pytest.mark.parametrize("name", CASES)
def test_the_inference_copy_computes_the_same_features(name: str, norm: str) -> None:
    """``for_inference`` (what frozen features run: a ResNet's BatchNorms folded) is the same
    function on every stage and leaves the module being trained untouched."""
    if norm != "batch" and not name.startswith("resnet"):
        pytest.skip("model.visual_norm is a ResNet key")
    torch.manual_seed(0)
    net = build_visual_for(cfg_of(name, f"model.visual_norm={norm}"))
    with torch.no_grad():  # non-trivial running statistics, so folding is not the identity
        for _ in range(2):
            net.train()(images(4) * 3 + 1)
        for m in net.modules():
            if hasattr(m, "running_var") and m.running_var is not None:
                m.running_var.mul_(torch.rand_like(m.running_var) + 0.5)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fast = net.for_inference()
    x = images(3)
    with torch.no_grad():
        want = net.pooled(x)
        assert same_up_to_rounding(fast.pooled(x), want)
        cl = fast.to(memory_format=torch.channels_last)
        assert same_up_to_rounding(cl.pooled(x.contiguous(memory_format=torch.channels_last)), want)
        for got, grid in zip(fast.intermediates(x, list(net.stages)), net.intermediates(x, list(net.stages))):
            assert same_up_to_rounding(got, grid)
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert any(p.requires_grad for p in net.parameters())
    norms = [m for m in fast.modules() if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d))]
    if name.startswith("resnet") or name == "wide_resnet50_2":
        assert not norms, "every BatchNorm of a ResNet follows a conv and is folded"


@pytest.mark.parametrize("task", TASKS.names())
@pytest.mark.parametrize("name", CASES)
def test_every_task_trains_on_every_backbone(name: str, task: str) -> None:
    from tests.test_pretext_tasks import structured_batch

    torch.manual_seed(0)
    model = build_task(cfg_of(name, task=task), 48).train()
    out = model(structured_batch(n=4, size=SIZE))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    groups = model.param_groups(SimpleNamespace(lr_backbone=0.1, lr_textual=0.01, weight_decay=1e-4))
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["param_names"] if n.startswith("visual.")}
    assert no_decay == {f"visual.{n}" for n in model.visual.no_weight_decay()}


@pytest.mark.parametrize("name", CASES)
def test_features_and_export(name: str, tmp_path: Path) -> None:
    from capvis.eval.features import extract_features

    net = backbone_of(name)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((40, 48, 3), 40 * i, np.uint8)).save(paths[-1])
    feats = extract_features(net, paths, image_size=SIZE, batch_size=2)
    assert feats.shape == (3, net.num_features) and np.isfinite(feats).all()
    state = net.export_state_dict(standard_only=False)
    if net.export_format == "timm":
        import timm

        own = timm.create_model(name.split("/", 1)[1], pretrained=False, num_classes=0,
                                **({"img_size": SIZE} if net.prefix_tokens else {}))
        own.load_state_dict(state, strict=True)
        with torch.no_grad():
            assert torch.allclose(own.eval().forward_features(images()), net.model.forward_features(images()))
        assert len(state) == len(net.model.state_dict())
    else:
        assert set(state) == {k for k in net.torchvision_resnet().state_dict() if not k.startswith("fc.")}
        with pytest.raises(ConfigError, match="not shaped like torchvision"):
            net.export_state_dict()  # the small stem is no torchvision model


@pytest.mark.parametrize("name", ["resnet18", TIMM_TOKEN, TIMM_CONV])
def test_onnx_export(name: str, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from capvis.interop.onnx import export_onnx

    net = backbone_of(name)
    path = export_onnx(net, tmp_path / "b.onnx", image_size=SIZE)
    x = images(3)
    (out,) = ort.InferenceSession(str(path)).run(None, {"images": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, net(x).numpy(), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", CASES)
def test_release_round_trip(name: str, tmp_path: Path, coco_tokenizer_path: Path) -> None:
    cfg = cfg_of(name, f"data.vocab={coco_tokenizer_path}")
    tokenizer = Tokenizer(coco_tokenizer_path)
    torch.manual_seed(0)
    task = build_task(cfg, tokenizer.vocab_size).eval()
    atomic_save({"model": task.state_dict(), "config": cfg.to_dict(), "vocab": tokenizer.model_bytes,
                 "capvis_version": capvis.__version__, "iteration": 3}, tmp_path / "ckpt.pt")
    assert main(["release", "--checkpoint", str(tmp_path / "ckpt.pt"), "--output", str(tmp_path / "rel")]) == 0
    loaded = capvis.load(tmp_path / "rel")
    assert isinstance(loaded, Backbone) and loaded.name == name
    with torch.no_grad():
        assert torch.equal(task.visual(images()), loaded(images()))


def test_vit_s16_counts_as_timm_without_its_head() -> None:
    import timm

    cfg = load_config("bicaptioning_ViT_S_16_L1_H768")
    with torch.device("meta"):
        task = build_task(cfg, 10_000)
        own = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                                img_size=cfg.data.image_size)
    assert count_parameters(task)["visual"] == sum(p.numel() for p in own.parameters()) == 21_665_664


def test_family_rejects_resnet_keys_and_unknown_names() -> None:
    with pytest.raises(ConfigError, match="ResNet backbones only"):
        build_visual_for(load_config(None, [f"model.backbone={TIMM_TOKEN}", "model.small_stem=true"]))
    with pytest.raises(ConfigError, match="timm has no model"):
        build_visual_for(load_config(None, ["model.backbone=timm/vit_nonexistent_42"]))
    with pytest.raises(ConfigError, match="class token"):
        build_visual_for(load_config(None, ["model.backbone=resnet18", "model.pool=token"]))


def test_class_token_pool() -> None:
    net = build_visual_for(cfg_of(TIMM_TOKEN, "model.pool=token")).eval()
    with torch.no_grad():
        tokens = net.model.forward_features(images())
        assert torch.equal(net.pooled(images()), tokens[:, 0])
        assert not torch.allclose(net.pooled(images()), net(images()).mean(dim=(2, 3)))
