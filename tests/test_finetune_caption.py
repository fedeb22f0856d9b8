"""`capvis finetune caption`: a frozen backbone stays bit-identical (BN statistics included) while the
head trains; a deeper head loads the checkpoint's layers and initialises the new one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_captioning import make_tiny_run

from capvis.cli import main
from capvis.loading import load_pretrained
from capvis.train import checkpoint as ckpt

SHORT = ["--no-progress", "train.iterations=4", "train.warmup=0", "train.checkpoint_every=4", "train.log_every=1"]


@pytest.fixture(scope="session")
def source(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tiny_run(tmp_path_factory.mktemp("finetune_source"), 6)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(ckpt.latest_valid_checkpoint(run / "checkpoints")[0])["model"]


def test_frozen_backbone_keeps_weights_and_bn_stats(source, tmp_path) -> None:
    out = tmp_path / "ft"
    code = main(["finetune", "caption", "--checkpoint", str(source["run"]), "--train", str(source["val"]),
                 "--val", str(source["val"]), "--output", str(out), "--freeze-backbone", *SHORT,
                 "train.val_every=2"])  # validation mid-run calls task.train() again: BN must stay frozen
    assert code == 0
    before, after = _weights(source["run"]), _weights(out)
    visual = [k for k in before if k.startswith("visual.")]
    assert any("running_mean" in k for k in visual) and any("num_batches_tracked" in k for k in visual)
    assert all(torch.equal(before[k], after[k]) for k in visual)
    head = [k for k in before if k.startswith("textual.") and before[k].is_floating_point()]
    assert sum(not torch.equal(before[k], after[k]) for k in head) > len(head) // 2
    note = json.loads((out / "finetune.json").read_text())
    assert note["freeze_backbone"] is True and note["new_weights"] == []


def test_deeper_head_loads_matching_weights(source, tmp_path, capsys) -> None:
    out = tmp_path / "deeper"
    code = main(["finetune", "caption", "--checkpoint", str(source["run"]), "--train", str(source["train"]),
                 "--output", str(out), "--layers", "2", *SHORT, "train.lr_textual=0", "train.lr_backbone=0"])
    assert code == 0
    assert "new weight tensors" in capsys.readouterr().out
    new = json.loads((out / "finetune.json").read_text())["new_weights"]
    assert new and all(".transformer.layers.1." in k for k in new)
    assert any(k.startswith("textual.") for k in new) and any(k.startswith("backward_textual.") for k in new)
    pre = load_pretrained(out)
    assert pre.config.model.textual.layers == 2 and pre.tokenizer is not None
    before, after = _weights(source["run"]), _weights(out)
    # zero learning rates: every weight the checkpoint had is carried over unchanged (BN statistics still move)
    assert all(torch.equal(before[k], after[k]) for k in before if "running_" not in k and "num_batches" not in k)


def test_shallower_head_is_refused(source, tmp_path, capsys) -> None:
    code = main(["finetune", "caption", "--checkpoint", str(source["run"]), "--train", str(source["train"]),
                 "--output", str(tmp_path / "x"), "--layers", "0", *SHORT])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "only deeper heads" in err[0]
