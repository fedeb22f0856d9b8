"""One switch for numerics: ``train.precision`` -> autocast dtype and whether a grad scaler runs; and
the switches of how the step's kernels run (channels_last, ``train.compile``)."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, ContextManager, TypeVar

import torch
from torch import nn

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Callable)  # a module or a function: what torch.compile takes


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    dtype: torch.dtype | None
    device_type: str

    @property
    def uses_scaler(self) -> bool:
        return self.name == "fp16"

    def autocast(self) -> ContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.uses_scaler)


CPU_BF16_ENV = "CAPVIS_AUTO_CPU_BF16"  # "0": ``auto`` is fp32 on every CPU (the same numerics on any machine)


def has_bf16_units(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: a CUDA GPU with bf16 support, or a CPU
    with AMX tiles (Xeon Sapphire Rapids and later), where oneDNN's bf16 kernels made the demo's training
    1.46x faster (docs/demo.md). Elsewhere (AVX2 laptops) CPU autocast emulates bf16 and is slower.
    ``CAPVIS_AUTO_CPU_BF16=0`` in the environment keeps ``auto`` at fp32 on the CPU (the test suite
    sets it, so its numerics do not depend on the machine it runs on)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or os.environ.get(CPU_BF16_ENV, "1") == "0":
        return False
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_precision(name: str, device: torch.device) -> Precision:
    """``auto`` is bf16 where the device has bf16 matrix units (:func:`has_bf16_units`), fp32 elsewhere."""
    if name == "auto":
        name = "bf16" if has_bf16_units(device) else "fp32"
    dtypes: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name == "fp16" and device.type != "cuda":
        name = "bf16"  # fp16 autocast is CUDA-only; bf16 is the CPU equivalent
    return Precision(name, dtypes[name], device.type)


def use_channels_last(requested: bool, device: torch.device) -> bool:
    """channels_last pays on CUDA (tensor cores, cuDNN); on CPU it made a demo-sized training step
    3x slower (BatchNorm and the optimizer's foreach kernels on non-contiguous weights), so it is
    applied on CUDA only."""
    return requested and device.type == "cuda"


def compile_model(model: M, *, backend: str = "inductor", device: torch.device, option: str = "train.compile") -> M:
    """``torch.compile(model)``, or ``model`` itself with one warning line when ``backend`` cannot run here
    (unknown name, no C++ compiler for inductor on CPU, no Triton on GPU): a tiny function is compiled
    and run first, since torch compiles lazily and would otherwise fail inside the first step.

    ``option`` names the setting in that line. The compiled wrapper is for running only: callers keep the
    plain module for state dicts, so checkpoints never hold ``_orig_mod.`` keys and load without compile.
    """
    try:
        probe = torch.compile(lambda x: torch.relu(x) * 2 + 1, backend=backend, fullgraph=True)
        probe(torch.ones(8, device=device))
    except Exception as exc:  # noqa: BLE001 - any backend failure means: run eagerly
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        log.warning("%s: backend %r is unavailable on %s (%s: %s); running eagerly",
                    option, backend, device.type, type(exc).__name__, reason)
        return model
    return torch.compile(model, backend=backend)
