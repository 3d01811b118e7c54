"""What deployment gains: onnxruntime latency, file size and top-1 of the float teacher,
the Q/DQ reference form and the int8 form (exact, and with the faster approximate
requantization of residual branches), measured one after another in this process on
this machine.

    python benchmarks/deploy.py                              # the shared ResNet-20, 4w4a
    python benchmarks/deploy.py --run runs/deploy-r20 --limit 0   # a trained run's student (deploy-r20.yaml)
    python benchmarks/deploy.py --config configs/my.yaml --threads 4 --out deploy.json

The student is the trained one of ``--run RUN_DIR`` (its ``checkpoint.pt``, with the
run's config unless ``--config`` is given), else the naive baseline of the config (its
activation ranges calibrated on Gaussian noise, no training): latency and size do not
depend on training, agreement does. The default config is the shared ResNet-20 and
CIFAR-10 set beside the repository (``../shared``, the development machine's offline
data). Latency is the median of ``--runs`` onnxruntime calls at batch 1 and 64 after
warm-up; the optimised graph's operators show which kernels run. Prints a markdown
table and the machine; ``--out`` writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_CONFIG = {
    "teacher": {"source": "checkpoint", "arch": "qimera.models.cifar_resnet:resnet20",
                "weights": str(SHARED / "teachers" / "resnet20-cifar10-optionA.th"), "num_classes": 10,
                "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "data": {"name": "npz", "path": str(SHARED / "data" / "cifar10-test-jpeg-q75.npz")},
    "quant": {"w_bits": 4, "a_bits": 4},
}
LABELS = {"fp32": "FP32 teacher (plain ONNX)", "qdq": "Q/DQ reference (`student.onnx`)",
          "int8": "int8 form (`student.int8.onnx`)", "int8_requant": "int8 form, requantized residuals"}


def student_and_data(args, tmp: str):
    """The student to export (trained, or the naive baseline), the prepared run and a label."""
    import qimera
    from qimera.baselines import naive_student
    from qimera.quant import build_student, set_calibrating
    from qimera.trainer import read_checkpoint

    if args.run:
        state = read_checkpoint(args.run)
        config = args.config or state.get("config")
        if config is None:
            sys.exit(f"--run {args.run}: its checkpoint holds no config; pass --config")
    else:
        config = args.config or {**DEFAULT_CONFIG, "train": {"out_dir": tmp}}
    overrides = [f"train.out_dir={tmp}", "train.device=cpu"]
    if args.limit is not None:
        overrides.append(f"data.limit={args.limit or 'null'}")
    prep = qimera.prepare(config, overrides)
    if args.run:
        student = build_student(prep.cfg, prep.teacher).cpu()
        student.load_state_dict(state["student"])
        set_calibrating(student, False)
        label = f"trained student of {args.run} (final epoch)"
    else:
        torch.manual_seed(prep.cfg.train.seed)
        student = naive_student(prep.cfg, prep.teacher, torch.device("cpu"))
        label = "naive student (ranges calibrated on Gaussian noise, no training)"
    return student.eval(), prep, label


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="run config (default: the shared ResNet-20, 4w4a)")
    parser.add_argument("--run", help="a trained run directory: benchmark its student")
    parser.add_argument("--runs", type=int, default=30, help="timed onnxruntime calls per model and batch (30)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (its default)")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate on the first N images (0: the whole set, whatever the config says)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)

    from qimera.onnx_deploy import deployment_figures
    from qimera.onnx_export import export_onnx, verify_exports
    from qimera.onnx_int8 import check_onnxruntime

    check_onnxruntime()

    with tempfile.TemporaryDirectory(prefix="qimera-deploy-") as tmp:
        student, prep, label = student_and_data(args, tmp)
        size = prep.teacher.input_size
        paths = {name: Path(tmp) / f"{name}.onnx" for name in ("qdq", "int8", "int8_requant")}
        export_onnx(student, paths["qdq"], input_size=size)
        int8 = export_onnx(student, paths["int8"], input_size=size, form="int8")
        export_onnx(student, paths["int8_requant"], input_size=size, form="int8", requantize=True)
        figures = deployment_figures(paths, size, runs=args.runs, reference=prep.teacher.model,
                                     threads=args.threads)
        accuracy = verify_exports(student, prep.eval_data.loader, onnx_path=paths["qdq"],
                                  onnx_models={"int8": paths["int8"], "int8_requant": paths["int8_requant"]},
                                  threads=args.threads)
    from qimera.evaluate import evaluate

    teacher_top1 = evaluate(prep.teacher.model, prep.eval_data.loader, num_classes=prep.teacher.num_classes).top1
    top1 = {"fp32": teacher_top1, "qdq": accuracy["onnx_top1"], "int8": accuracy["int8_top1"],
            "int8_requant": accuracy["int8_requant_top1"]}
    agree = {"qdq": accuracy["onnx_prediction_agreement"], "int8": accuracy["int8_prediction_agreement"],
             "int8_requant": accuracy["int8_requant_prediction_agreement"]}
    forms, m = figures["forms"], figures["machine"]
    base = forms["fp32"]
    print(f"{prep.cfg.quant.w_bits}w{prep.cfg.quant.a_bits}a {label}; student top-1 {accuracy['student_top1']:.2f}% "
          f"on {accuracy['samples']} images\n")
    print("| model | batch 1 | batch 64 | speed-up at 64 vs FP32 | file | smaller than FP32 | top-1 | same prediction "
          "as the student | integer kernels in onnxruntime's graph |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, f in forms.items():
        lat = f["latency_ms"]
        ops = ", ".join(f"{n} {op}" for op, n in f["integer_ops"].items()) or "none"
        print(f"| {LABELS[name]} | {lat['1']:.2f} ms | {lat['64']:.2f} ms | {base['latency_ms']['64'] / lat['64']:.2f}× | "
              f"{f['file_bytes'] / 1e3:.0f} kB | {base['file_bytes'] / f['file_bytes']:.1f}× | {top1[name]:.2f}% | "
              + (f"{100 * agree[name]:.2f}%" if name in agree else "–") + f" | {ops} |")
    print(f"\n{m['cpu']} ({m['capability']}, {m['cpu_count']} logical CPUs), onnxruntime {m['onnxruntime']}, threads: "
          f"{m['threads']}; median of {figures['runs']} calls after warm-up; int8 form: {int8.int4_weights} int4 weight "
          f"tensors, {int8.folded_batchnorms} BatchNorms folded")
    result = {"student": label, "accuracy": accuracy, "teacher_top1": teacher_top1, **figures,
              "int8_report": int8.to_dict()}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
