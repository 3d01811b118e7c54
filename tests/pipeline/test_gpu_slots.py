"""A worker's concurrent cells take the GPUs of CUDA_VISIBLE_DEVICES in turn (pipelines/gpus.py);
the slots are lock files, so no GPU is needed to test them."""

from __future__ import annotations

import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

from pipelines.gpus import gpu_slot, visible_gpus

REPO = Path(__file__).resolve().parents[2]


def test_without_visible_gpus_nothing_is_set(tmp_path):
    with gpu_slot({"QIMERA_GPU_SLOTS": str(tmp_path)}) as env:
        assert env == {}
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": " 2, 3 ,"}) == ["2", "3"] and visible_gpus({}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []


def test_cells_take_the_gpus_in_turn_and_free_them(tmp_path):
    environ = {"CUDA_VISIBLE_DEVICES": "0,1", "QIMERA_GPU_SLOTS": str(tmp_path)}
    with ExitStack() as stack:
        taken = [stack.enter_context(gpu_slot(environ))["CUDA_VISIBLE_DEVICES"] for _ in range(3)]
        assert taken == ["0", "1", "0"]
    with gpu_slot(environ) as env:  # all released: the first GPU again
        assert env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert not list(tmp_path.glob("*.slot"))
    with gpu_slot({**environ, "CUDA_VISIBLE_DEVICES": "7"}) as a, gpu_slot({**environ, "CUDA_VISIBLE_DEVICES": "7"}) as b:
        assert a == b == {"CUDA_VISIBLE_DEVICES": "7"}  # one GPU: shared


def test_a_slot_held_by_another_process_counts_until_it_dies(tmp_path):
    environ = {"CUDA_VISIBLE_DEVICES": "0,1", "QIMERA_GPU_SLOTS": str(tmp_path)}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipelines.gpus import gpu_slot\n"
         f"with gpu_slot({environ!r}) as env:\n    print(env['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "0"
        with gpu_slot(environ) as env:
            assert env == {"CUDA_VISIBLE_DEVICES": "1"}
    finally:
        holder.kill()
        holder.wait()
    with gpu_slot(environ) as env:  # the dead process's slot is free at once
        assert env == {"CUDA_VISIBLE_DEVICES": "0"}
