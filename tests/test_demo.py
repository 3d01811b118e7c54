"""The offline demo end to end, as `qimera run configs/demo.yaml` runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "qimera.cli", "run", str(REPO / "configs" / "demo.yaml"),
         "--set", f"train.out_dir={tmp_path / 'demo'}", "--set", f"teacher.cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["teacher_top1"] >= 97.0
    assert summary["student_top1"] >= 95.0
    assert summary["w_bits"] == 4 and summary["a_bits"] == 4
    assert summary["iterations"] > 0 and 0.0 <= summary["naive_top1"] <= 100.0
    history = [json.loads(x) for x in (tmp_path / "demo" / "history.jsonl").read_text().splitlines()]
    assert history[-1]["top1"] == pytest.approx(summary["student_top1"], abs=1e-3)  # the final epoch
