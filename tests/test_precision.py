"""``train.precision=auto``: bf16 where the device multiplies bf16 in hardware (CUDA with bf16, a CPU with
AMX tiles), fp32 elsewhere; fp16 on the CPU runs as bf16."""

from __future__ import annotations

import pytest
import torch

from capvis.train import precision as prec


@pytest.mark.parametrize("amx, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_the_cpu_follows_the_matrix_units(monkeypatch, amx: bool, expected: str) -> None:
    monkeypatch.delenv(prec.CPU_BF16_ENV)  # the suite's conftest pins fp32; this test is about the rule
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    got = prec.resolve_precision("auto", torch.device("cpu"))
    assert got.name == expected
    assert got.dtype == (torch.bfloat16 if amx else None)
    assert not got.uses_scaler


def test_auto_on_a_torch_without_the_amx_query_is_fp32(monkeypatch) -> None:
    monkeypatch.delenv(prec.CPU_BF16_ENV)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert prec.resolve_precision("auto", torch.device("cpu")).name == "fp32"


def test_the_environment_switch_keeps_auto_at_fp32(monkeypatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setenv(prec.CPU_BF16_ENV, "0")
    assert prec.resolve_precision("auto", torch.device("cpu")).name == "fp32"
    monkeypatch.setenv(prec.CPU_BF16_ENV, "1")
    assert prec.resolve_precision("auto", torch.device("cpu")).name == "bf16"


@pytest.mark.parametrize("name, expected", [("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "bf16")])
def test_explicit_names_ignore_the_hardware(monkeypatch, name: str, expected: str) -> None:
    for amx in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert prec.resolve_precision(name, torch.device("cpu")).name == expected


def test_cpu_bf16_autocast_runs_convolutions_in_bf16() -> None:
    conv = torch.nn.Conv2d(3, 4, 3)
    with prec.resolve_precision("bf16", torch.device("cpu")).autocast():
        out = conv(torch.randn(1, 3, 8, 8))
    assert out.dtype == torch.bfloat16
