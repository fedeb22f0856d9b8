"""The suite's own hygiene: no test module changes torch's process-wide settings at import time
(collection imports every module before any test runs, so such a line changes every test after it;
this is what once made the resume test's in-process reference differ in the 7th digit)."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from conftest import _SESSION_TORCH

GLOBAL_SETTERS = {"set_num_threads", "set_num_interop_threads", "set_default_dtype", "use_deterministic_algorithms",
                  "set_flush_denormal", "set_grad_enabled", "manual_seed"}


def _module_level_calls(path: Path) -> list[str]:
    found = []
    for node in ast.parse(path.read_text()).body:  # top-level statements only
        for call in ast.walk(node) if isinstance(node, ast.Expr) else []:
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr in GLOBAL_SETTERS:
                found.append(f"{path.name}:{node.lineno} {call.func.attr}")
    return found


def test_no_test_module_sets_torch_globals_at_import() -> None:
    offenders = [hit for path in sorted(Path(__file__).parent.glob("*.py")) for hit in _module_level_calls(path)]
    assert not offenders, offenders


def test_each_test_starts_with_the_session_settings() -> None:
    assert torch.get_num_threads() == _SESSION_TORCH["threads"]
    assert torch.get_default_dtype() == _SESSION_TORCH["dtype"] and torch.is_grad_enabled()


def test_one_thread_fixture_sets_one_thread(one_thread) -> None:
    assert torch.get_num_threads() == 1
