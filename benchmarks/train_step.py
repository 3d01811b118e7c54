"""Time one Qimera training iteration (generator + teacher + student, both optimiser steps).

Default workload: CIFAR ResNet-20 teacher (random weights: speed does not depend on
them), 4w4a student, batch 200, superposition p=0.4/K=2, one DM layer, the student
being trained (past warm-up). Prints the median milliseconds per iteration over
``--iters`` timed iterations after ``--warmup`` untimed ones, and the FLOPs of one
iteration (counted by ``torch.utils.flop_counter``). Each ``--amp`` mode given is timed
in the same process, and each with every ``--compile`` mode given (``train.compile``),
so the printed ratios compare like with like. A compiled mode also reports the seconds
its first iterations took (compilation included) and, on a GPU, the peak memory.

    python benchmarks/train_step.py                      # fp32 and bf16 on this device
    python benchmarks/train_step.py --amp none --iters 20
    python benchmarks/train_step.py --amp none --compile none default   # eager vs compiled
    python benchmarks/train_step.py --device cuda --arch torchvision.models:resnet18 \
        --input-size 3 224 224 --num-classes 1000 --batch-size 64   # an ImageNet-sized step
    python benchmarks/train_step.py --amp none --parts paper parts.averaging=ema \
        parts.image_filter=lowpass "parts.student_loss=[kd, ce_easy]"   # the cost of each addition

``--parts`` times each variant (``paper``: the default parts; else ``key=value`` overrides
joined by ``;``) in the same process, in turn, each with every amp and compile mode.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch


def build(amp: str, batch_size: int, device: str, arch: str, input_size=(3, 32, 32), num_classes: int = 10,
          compile_mode: str = "none", parts: str = "paper"):
    from qimera.config import load_config
    from qimera.teachers import load_teacher
    from qimera.trainer import Trainer

    tmp = tempfile.mkdtemp(prefix="qimera-bench-")
    module, _, fn = arch.partition(":")
    import importlib

    model = getattr(importlib.import_module(module), fn)(num_classes=num_classes)
    weights = f"{tmp}/teacher.pt"
    torch.save(model.state_dict(), weights)
    size = list(input_size)
    cfg = load_config({
        "teacher": {"source": "checkpoint", "arch": arch, "weights": weights, "num_classes": num_classes,
                    "input_size": size, **({} if size[0] == 3 else {"mean": [0.5] * size[0], "std": [0.25] * size[0]})},
        "quant": {"w_bits": 4, "a_bits": 4},
        "generator": {"p": 0.4, "k": 2, "dm_layers": 1, "variant": "cifar" if size[-1] <= 64 else "imagenet"},
        "train": {"batch_size": batch_size, "amp": amp, "device": device, "out_dir": tmp,
                  "progress": False, "warmup_epochs": 0, "compile": compile_mode},
    }, [] if parts == "paper" else [item.strip() for item in parts.split(";")])
    teacher = load_teacher(cfg.teacher)
    return Trainer(cfg, teacher)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_mode(amp: str, compile_mode: str, args, parts: str = "paper") -> dict:
    tr = build(amp, args.batch_size, args.device, args.arch, args.input_size, args.num_classes, compile_mode, parts)
    if tr.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(tr.device)
    # calibrate the activation ranges once, as the first epochs do, then time the
    # steady state: ranges frozen, generator and student both trained. The untimed first
    # iterations compile what a compiled mode compiles (both kinds of batch: p=0.4)
    sync(tr.device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        tr.train_step(calibrate=True, train_student=True)
    for _ in range(args.warmup):
        tr.train_step(calibrate=False, train_student=True)
    sync(tr.device)
    first_s = time.perf_counter() - t0
    late = None
    if args.start_at:  # several processes time the same window (benchmarks/parallel_runs.py)
        late = max(0.0, time.time() - args.start_at)
        time.sleep(max(0.0, args.start_at - time.time()))
    times = []
    for _ in range(args.iters):
        sync(tr.device)
        t0 = time.perf_counter()
        tr.train_step(calibrate=False, train_student=True)
        sync(tr.device)
        times.append(time.perf_counter() - t0)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        tr.train_step(calibrate=False, train_student=True)
    peak = torch.cuda.max_memory_allocated(tr.device) / 2**30 if tr.device.type == "cuda" else None
    tr.close()
    return {
        "parts": parts,
        "amp": amp,
        "compile": tr.compile_mode,
        "first_iters_s": round(first_s, 2),
        "late_start_s": late,
        "peak_gpu_gib": peak,
        "device": str(tr.device),
        "channels_last": tr.channels_last,
        "median_ms": 1000 * statistics.median(times),
        "min_ms": 1000 * min(times),
        "max_ms": 1000 * max(times),
        "iters": len(times),
        "gflop_per_iter": counter.get_total_flops() / 1e9,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--amp", nargs="+", default=["none", "bf16"], choices=["none", "bf16"])
    p.add_argument("--compile", nargs="+", default=["none"], choices=["none", "default", "reduce-overhead"],
                   help="train.compile modes to time, each with every --amp mode")
    p.add_argument("--parts", nargs="+", default=["paper"],
                   help="method-part variants to time: 'paper', or overrides such as parts.averaging=ema "
                        "(several joined by ';')")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--arch", default="qimera.models.cifar_resnet:resnet20")
    p.add_argument("--input-size", type=int, nargs=3, default=[3, 32, 32], metavar=("C", "H", "W"),
                   help="teacher input; wider than 64 pixels uses the ImageNet generator")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--default-malloc", action="store_true", help="skip qimera.runtime.tune_cpu_allocator()")
    p.add_argument("--start-at", type=float, default=None, metavar="UNIX_TIME",
                   help="after the untimed iterations, wait until this wall-clock time before timing "
                        "(benchmarks/parallel_runs.py lines several processes up on one window)")
    args = p.parse_args()
    if not args.default_malloc:
        from qimera.runtime import tune_cpu_allocator

        tune_cpu_allocator()
    if args.iters < 10:
        p.error("--iters must be at least 10 (the median of >= 10 timed iterations)")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"batch {args.batch_size}, {args.arch}, input {tuple(args.input_size)}")
    results = []
    for parts in args.parts:
        for amp in args.amp:
            for compile_mode in args.compile:
                r = time_mode(amp, compile_mode, args, parts)
                results.append(r)
                _print(r, amp, compile_mode, args)
    base = results[0]
    for r in results[1:]:
        print(f"time of parts={r['parts']} amp={r['amp']} compile={r['compile']} against parts={base['parts']} "
              f"amp={base['amp']} compile={base['compile']}: {r['median_ms'] / base['median_ms']:.2f}x "
              f"(speed-up {base['median_ms'] / r['median_ms']:.2f}x)")
    print(json.dumps({"batch_size": args.batch_size, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "results": results}))


def _print(r: dict, amp: str, compile_mode: str, args) -> None:
    peak = f"  peak {r['peak_gpu_gib']:.2f} GiB" if r["peak_gpu_gib"] is not None else ""
    print(f"parts={r['parts']}  amp={amp:5s} compile={compile_mode:15s} device={r['device']:5s} median {r['median_ms']:8.1f} "
          f"ms/iter (min {r['min_ms']:.1f}, max {r['max_ms']:.1f}, n={r['iters']})  "
          f"{r['gflop_per_iter']:.1f} GFLOP/iter  {r['gflop_per_iter'] / r['median_ms'] * 1000:.0f} GFLOP/s  "
          f"first {2 * args.warmup} iters {r['first_iters_s']:.1f} s{peak}")


if __name__ == "__main__":
    main()
