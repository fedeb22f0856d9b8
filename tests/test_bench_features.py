"""``bench/features.py``: its JSON line, with the compiled variant and its break-even when asked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "features.py"


def test_compiled_variant_reports_its_cost_and_the_same_features():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--batch-size", "4", "--image-size", "32", "--repeats", "1",
                           "--compile", "aot_eager", "model.visual_width=16"], capture_output=True, text=True,
                          timeout=300, check=False, cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["compile_backend"] == "aot_eager" and line["compile_s"] > 0 and line["compiled_images_per_s"] > 0
    assert line["compiled_max_abs_diff"] < 1e-4 and line["max_abs_diff"] < 1e-4
    assert line["break_even_images"] is None or line["break_even_images"] > 0
