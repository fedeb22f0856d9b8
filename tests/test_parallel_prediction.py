"""Parallel prediction (CapPa) in the captioning tasks: off is VirTex bit for bit; on, the selected rows
see only [MASK] under full attention; the selection is a function of (seed, step, image id), the same
after a resume and over two gloo ranks; ``caption --method parallel`` is one masked forward pass.

Run as a script under ``torch.distributed.run``, this file is the two-rank worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capvis.config import load_config
from capvis.data.tokenizer import MASK_ID
from capvis.errors import ConfigError
from capvis.tasks import build_task
from capvis.tasks.captioning import parallel_rows

EOS = 2


def tiny_cfg(*extra: str, task: str = "bicaptioning"):
    return load_config(None, [f"model.task={task}", "model.backbone=resnet18", "model.small_stem=true",
                              "model.textual.hidden=64", "model.textual.layers=2", "data.max_caption_length=10",
                              *extra])


def tiny_batch(b: int = 4, t: int = 8, vocab: int = 40, seed: int = 0, lengths: list[int] | None = None):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, vocab, (b, t), generator=gen)
    lengths_t = torch.tensor(lengths or [t, t - 3, 4, t - 1, t, 5, 6, t][:b])
    tokens[:, 0] = 1
    for i, n in enumerate(lengths_t.tolist()):
        tokens[i, n - 1] = EOS
        tokens[i, n:] = 0
    images = torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(100))  # same images every seed
    return {"image": images, "caption_tokens": tokens, "caption_lengths": lengths_t,
            "image_id": 1000 + 7 * torch.arange(b)}


def capture(module: torch.nn.Module, store: list) -> None:
    """Record (logits, the ``parallel`` rows) of every call of a textual head."""
    module.register_forward_hook(lambda m, args, kwargs, out: store.append((out, kwargs.get("parallel"))),
                                 with_kwargs=True)


# -- config ------------------------------------------------------------------------------------

def test_config_key_default_and_range() -> None:
    assert tiny_cfg().model.textual.parallel_fraction == 0.0
    assert tiny_cfg("model.textual.parallel_fraction=0.75").model.textual.parallel_fraction == 0.75
    for bad in ("1.5", "-0.1", "nan"):
        with pytest.raises(ConfigError, match="model.textual.parallel_fraction"):
            tiny_cfg(f"model.textual.parallel_fraction={bad}")


def test_bundled_parallel_config_is_the_default_plus_the_fraction() -> None:
    default = load_config("bicaptioning_R_50_L1_H2048").to_dict()
    parallel = load_config("bicaptioning_parallel_R_50_L1_H2048").to_dict()
    assert parallel["model"]["textual"].pop("parallel_fraction") == 0.75
    default["model"]["textual"].pop("parallel_fraction")
    assert parallel == default


# -- fraction 0: today's model -------------------------------------------------------------------

@pytest.mark.parametrize("task", ["bicaptioning", "captioning"])
def test_fraction_zero_is_bitwise_the_plain_model(task: str, one_thread) -> None:
    torch.manual_seed(0)
    plain = build_task(tiny_cfg(task=task), 40).train()
    torch.manual_seed(0)
    zero = build_task(tiny_cfg("model.textual.parallel_fraction=0", task=task), 40).train()
    sa, sb = plain.state_dict(), zero.state_dict()
    assert list(sa) == list(sb) and "parallel_steps" not in sb  # checkpoint layout unchanged
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    batch = tiny_batch()
    seen: list = []
    capture(zero.textual, seen)
    torch.manual_seed(3)  # dropout on: the same draws
    a = plain(batch)
    torch.manual_seed(3)
    b = zero(batch)
    assert torch.equal(a.loss, b.loss) and set(a.logs) == set(b.logs) and "parallel_share" not in b.logs
    assert all(parallel is None for _, parallel in seen)  # never routed through the masking
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(plain.named_parameters(), zero.parameters()):
        assert torch.equal(p.grad, q.grad), name
    # the head's masking itself is a no-op on rows not selected
    plain.eval()
    grid = plain.visual(batch["image"])
    tokens, lengths = batch["caption_tokens"], batch["caption_lengths"]
    none = plain.textual(grid, tokens, lengths)
    assert torch.equal(none, plain.textual(grid, tokens, lengths, parallel=torch.zeros(4, dtype=torch.bool)))


# -- fraction 1: the image alone -----------------------------------------------------------------

def test_fraction_one_logits_ignore_the_caption_tokens(one_thread) -> None:
    torch.manual_seed(0)
    task = build_task(tiny_cfg("model.textual.parallel_fraction=1"), 40).train()
    forward, backward = [], []
    capture(task.textual, forward)
    capture(task.backward_textual, backward)
    a, b = tiny_batch(seed=1), tiny_batch(seed=2)  # same images and lengths, other tokens
    assert not torch.equal(a["caption_tokens"], b["caption_tokens"])
    torch.manual_seed(5)
    loss_a = task(a)
    torch.manual_seed(5)
    loss_b = task(b)
    for store in (forward, backward):
        (la, pa), (lb, pb) = store
        assert pa.all() and pb.all()
        assert torch.equal(la, lb)  # logits from image and length only, in both heads
    assert loss_a.logs["parallel_share"] == 1.0
    assert not torch.equal(loss_a.loss, loss_b.loss)  # the targets are still the captions
    # control: without parallel prediction the same change does move the logits
    torch.manual_seed(0)
    plain = build_task(tiny_cfg(), 40).eval()
    grid = plain.visual(a["image"])
    assert not torch.equal(plain.textual(grid, a["caption_tokens"], a["caption_lengths"]),
                           plain.textual(grid, b["caption_tokens"], b["caption_lengths"]))


def test_parallel_rows_are_masked_with_full_attention_and_others_untouched(one_thread) -> None:
    torch.manual_seed(0)
    head = build_task(tiny_cfg(), 40).eval()
    batch = tiny_batch()
    grid = head.visual(batch["image"])
    tokens, lengths = batch["caption_tokens"], batch["caption_lengths"]
    rows = torch.tensor([True, False, True, False])
    mixed = head.textual(grid, tokens, lengths, parallel=rows)
    causal = head.textual(grid, tokens, lengths)
    masked = torch.where(torch.arange(8) < lengths[:, None], MASK_ID, 0)  # padding stays padding
    full = head.textual(grid, masked, lengths, parallel=torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(mixed[~rows], causal[~rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[rows], full[rows], rtol=1e-5, atol=1e-6)
    # full attention: position 0 depends on how many positions follow it (causal: it cannot)
    ones = torch.ones(1, dtype=torch.bool)
    short = head.textual(grid[:1], masked[:1, :5], torch.tensor([5]), parallel=ones)
    long = head.textual(grid[:1], masked[:1, :8], torch.tensor([8]), parallel=ones)
    assert not torch.allclose(short[0, 0], long[0, 0])
    c5 = head.textual(grid[:1], tokens[:1, :5], torch.tensor([5]))
    torch.testing.assert_close(c5[0, 0], causal[0, 0], rtol=1e-5, atol=1e-6)


# -- the selection --------------------------------------------------------------------------------

def test_selection_is_a_pure_function_of_seed_step_and_sample() -> None:
    ids = torch.arange(20_000) * 13 + 5
    rows = parallel_rows(ids, 7, seed=0, fraction=0.75)
    assert rows.dtype == torch.bool and abs(rows.float().mean().item() - 0.75) < 0.02
    assert torch.equal(rows, parallel_rows(ids.clone(), torch.tensor(7), seed=0, fraction=0.75))
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))
    assert torch.equal(parallel_rows(ids[perm], 7, seed=0, fraction=0.75), rows[perm])  # per sample
    assert torch.equal(parallel_rows(ids[1::2], 7, seed=0, fraction=0.75), rows[1::2])  # any rank split
    other_step = parallel_rows(ids, 8, seed=0, fraction=0.75)
    other_seed = parallel_rows(ids, 7, seed=1, fraction=0.75)
    for other in (other_step, other_seed):  # independent draws: disagree on ~2 f (1 - f) = 37.5%
        assert abs((other != rows).float().mean().item() - 0.375) < 0.03
    assert not parallel_rows(ids, 7, seed=0, fraction=0.0).any()
    assert parallel_rows(ids, 7, seed=0, fraction=1.0).all()
    big = torch.tensor([2**40 + 3, -5, 2**40 + 3])  # ids past 32 bits and negative ones work too
    assert parallel_rows(big, 2**33, seed=2**35, fraction=0.5).tolist()[0] == \
        parallel_rows(big, 2**33, seed=2**35, fraction=0.5).tolist()[2]


def test_task_advances_its_step_only_in_training(one_thread) -> None:
    torch.manual_seed(0)
    task = build_task(tiny_cfg("model.textual.parallel_fraction=0.5", "train.seed=4"), 40)
    seen: list = []
    capture(task.textual, seen)
    batch = tiny_batch()
    task.eval()
    task(batch)
    assert seen[-1][1] is None and task.parallel_steps.item() == 0  # validation: the plain model
    task.train()
    for step in range(3):
        task(batch)
        assert torch.equal(seen[-1][1], parallel_rows(batch["image_id"], step, seed=4, fraction=0.5))
    assert task.parallel_steps.item() == 3
    # weights move between runs with and without it (fine-tuning either way)
    torch.manual_seed(0)
    plain = build_task(tiny_cfg(), 40)
    plain.load_state_dict(task.state_dict())
    task.load_state_dict(plain.state_dict())
    assert task.parallel_steps.item() == 0


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])  # on CPU fp16 runs as bf16 (capvis' rule)
def test_every_precision_trains_a_step(precision: str, device: str, one_thread) -> None:
    from capvis.train.precision import resolve_precision
    from capvis.train.step import train_step

    torch.manual_seed(0)
    task = build_task(tiny_cfg("model.textual.parallel_fraction=0.5"), 40).to(device).train()
    prec = resolve_precision(precision, torch.device(device))
    opt = torch.optim.SGD(task.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    batch = {k: v.to(device) for k, v in tiny_batch().items()}
    result = train_step(task, batch, opt, sched, prec.scaler(), prec)
    assert result.loss_finite and 0 < result.logs["parallel_share"].item() < 1
    assert result.finite or prec.uses_scaler  # fp16: the scaler may skip its first step ...
    assert task.parallel_steps.item() == int(result.finite)  # ... and the step counter is restored with it


def test_selection_identical_after_resume(tmp_path, coco_fixture, coco_tokenizer_path, one_thread) -> None:
    from capvis.train.loop import Trainer, read_metrics

    cfg = load_config("bicaptioning_R_50_L1_H2048", [
        f"data.train={coco_fixture}", "data.val=", f"data.vocab={coco_tokenizer_path}", "model.backbone=resnet18",
        "model.small_stem=true", "data.image_size=32", "model.textual.hidden=64", "train.batch_size=4",
        "data.num_workers=0", "train.log_every=1", "train.warmup=2", "train.channels_last=false",
        "train.iterations=4", "train.checkpoint_every=100", "model.textual.parallel_fraction=0.5", "train.seed=3"])

    def run(output: Path, **kwargs) -> dict[tuple[int, int], bool]:
        trainer = Trainer(cfg, output, progress=False, resume=kwargs.pop("resume", None))
        ids, rows = [], []
        trainer.task.register_forward_pre_hook(lambda m, args: ids.append(args[0]["image_id"]))
        capture(trainer.task.textual, rows)
        start = int(trainer.task.parallel_steps)
        trainer.run(**kwargs)
        chosen = {}
        for step, (image_ids, (_, parallel)) in enumerate(zip(ids, rows), start=start):
            assert torch.equal(parallel, parallel_rows(image_ids, step, seed=3, fraction=0.5))
            chosen.update({(step, int(i)): bool(p) for i, p in zip(image_ids, parallel)})
        return chosen

    straight = run(tmp_path / "straight")
    parted = run(tmp_path / "parted", until=2)
    parted.update(run(tmp_path / "parted", resume="auto"))
    assert len(straight) == 16 and parted == straight
    assert 0 < sum(straight.values()) < 16  # a real mix at fraction 0.5
    a = [(r["loss"], r["parallel_share"]) for r in read_metrics(tmp_path / "straight")]
    b = [(r["loss"], r["parallel_share"]) for r in read_metrics(tmp_path / "parted")]
    assert a == b  # bit-identical losses after the resume


# -- two gloo ranks -------------------------------------------------------------------------------

ROWS, STEPS = 8, 3


def ddp_setup():
    """A GroupNorm model (no per-rank batch statistics), dropout off, captions of one length."""
    cfg = tiny_cfg("model.visual_norm=group", "model.textual.dropout=0", "model.textual.parallel_fraction=0.5",
                   "train.seed=11")
    torch.manual_seed(0)
    task = build_task(cfg, 40).train()
    batches = [tiny_batch(ROWS, seed=s, lengths=[6] * ROWS) for s in range(STEPS)]
    for s, batch in enumerate(batches):
        batch["image_id"] = batch["image_id"] + 100 * s
    return task, batches


def train_and_record(model, task, batches, rank: int = 0, world: int = 1) -> dict:
    opt = torch.optim.SGD(task.parameters(), lr=0.5)
    rows, losses, share = [], [], ROWS // world
    capture(task.textual, rows)
    for batch in batches:
        local = {k: v[rank * share:(rank + 1) * share] for k, v in batch.items()}
        opt.zero_grad()
        out = model(local)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.detach())
    return {"rows": torch.stack([p for _, p in rows]), "loss": torch.stack(losses),
            "weights": {k: v.clone() for k, v in task.state_dict().items()}}


def worker(out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    task, batches = ddp_setup()
    result = train_and_record(DistributedDataParallel(task), task, batches, rank, world)
    rows = [torch.zeros_like(result["rows"]) for _ in range(world)]
    dist.all_gather(rows, result["rows"])
    dist.all_reduce(result["loss"])
    if rank == 0:
        torch.save({"rows": torch.cat(rows, dim=1), "loss": result["loss"] / world,
                    "weights": result["weights"]}, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_select_and_train_like_one_process(tmp_path: Path, one_thread) -> None:
    from test_distributed import free_port

    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), __file__, str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    task, batches = ddp_setup()
    one = train_and_record(task, task, batches)
    assert torch.equal(ddp["rows"], one["rows"])  # (steps, global rows): the same samples on 2 ranks as on 1
    assert 0 < one["rows"].sum() < one["rows"].numel()
    torch.testing.assert_close(ddp["loss"], one["loss"], rtol=1e-4, atol=1e-5)
    assert ddp["weights"]["parallel_steps"].item() == STEPS
    for key, value in one["weights"].items():
        torch.testing.assert_close(ddp["weights"][key], value, rtol=1e-4, atol=1e-5, msg=key)


# -- caption --method parallel --------------------------------------------------------------------

def test_caption_method_parallel_is_one_masked_forward_argmax(tmp_path, coco_tokenizer_path, one_thread,
                                                              capsys) -> None:
    from capvis.cli import main
    from capvis.data.tokenizer import Tokenizer
    from capvis.data.transforms import normalize
    from capvis.eval.captioning import _CroppedImages, collect_images
    from capvis.models.decoding import BANNED_IDS, decode
    from capvis.train import checkpoint as ckpt

    from conftest import write_coco

    tokenizer = Tokenizer(coco_tokenizer_path)
    cfg = load_config("bicaptioning_R_50_L1_H2048", [
        "model.backbone=resnet18", "model.small_stem=true", "data.image_size=32", "model.textual.hidden=64",
        "data.max_caption_length=12", f"data.vocab={coco_tokenizer_path}", "model.textual.parallel_fraction=0.75"])
    torch.manual_seed(0)
    task = build_task(cfg, tokenizer.vocab_size)
    with torch.no_grad():  # peaky, position-dependent outputs, so the captions differ and end early or not
        for p in task.textual.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.3)
        task.textual.output.bias[EOS] = 2.3
    path = ckpt.atomic_save({"model": task.state_dict(), "config": cfg.to_dict(), "vocab": tokenizer.model_bytes,
                             "iteration": 0}, tmp_path / "tiny.pt")
    folder = write_coco(tmp_path / "coco").parent.parent / "train2017"
    out = tmp_path / "captions.json"
    assert main(["caption", "--checkpoint", str(path), str(folder), "--method", "parallel", "--max-steps", "10",
                 "--output", str(out), "--device", "cpu"]) == 0
    got = {r["file_name"]: r["caption"] for r in json.loads(out.read_text())}

    paths = collect_images([folder])
    images = normalize(torch.stack([_CroppedImages(paths, 32)[i][1] for i in range(len(paths))]))
    task.eval()
    with torch.no_grad():
        grid = task.visual(images)
        masked = torch.full((len(paths), 10), MASK_ID)
        logits = task.textual(grid, masked, torch.full((len(paths),), 10),
                              parallel=torch.ones(len(paths), dtype=torch.bool))
    logp = logits.log_softmax(-1)  # (B, T, V), over the whole vocabulary as every decoder scores
    logits[..., list(BANNED_IDS)] = float("-inf")  # never emitted by any decoder
    expected, cuts = {}, []
    for p, row in zip(paths, logits.argmax(-1).tolist()):
        cuts.append(row.index(EOS) if EOS in row else len(row))
        expected[p.name] = tokenizer.decode(row[: cuts[-1]])
    assert got == expected
    assert 10 in cuts and any(0 < k < 10 for k in cuts)  # captions that run to the end, and cut at [EOS]
    result = decode(task.train(), images, method="parallel", max_steps=10, return_attention=True)
    assert task.training  # mode restored
    assert [len(t) for t in result.tokens] == cuts and result.finished == [k < 10 for k in cuts]
    best = logp.gather(2, logits.argmax(-1, keepdim=True))[..., 0]  # (B, T) log-prob of each choice
    expected_scores = [best[i, : k + 1].sum().item() for i, k in enumerate(cuts)]  # [EOS] counted
    assert result.scores == pytest.approx(expected_scores, rel=1e-5)
    assert [len(m) for m in result.attention] == [len(t) for t in result.tokens]
    assert all(m.shape[1:] == grid.shape[-2:] for m in result.attention)


if __name__ == "__main__":
    worker(sys.argv[1])
