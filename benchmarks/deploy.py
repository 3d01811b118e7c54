"""What deployment gains: onnxruntime latency, file size and top-1 of the float teacher,
the Q/DQ reference form and the int8 forms, measured one after another in this process
on this machine. The int8 forms: the paper's recipe (residual branches in exact float),
the paper's recipe with the approximate 8-bit requantization of residual branches, and
the same weights under the integer-exact recipe (``quant.integer_exact``), whose agreement
is measured against the integer-exact student (what such a student reports).

    python benchmarks/deploy.py                              # the shared ResNet-20, 4w4a
    python benchmarks/deploy.py --run runs/deploy-r20 --limit 0   # a trained run's student (deploy-r20.yaml)
    python benchmarks/deploy.py --config configs/my.yaml --threads 4 --out deploy.json
    python benchmarks/deploy.py --config benchmarks/resnet18-random.yaml --no-eval --batches 1 8

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
          "int8": "int8 form (`student.int8.onnx`), paper's recipe", "int8_requant":
          "int8 form, paper's recipe, requantized residuals (approximate)",
          "int8_exact": "int8 form, integer-exact recipe"}


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
    prep = qimera.prepare(config, overrides, with_data=not args.no_eval)
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
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="batch sizes to time (default: the export's, 1 and 64)")
    parser.add_argument("--no-eval", action="store_true",
                        help="latency and size only (no evaluation data needed: any weights serve for speed)")
    args = parser.parse_args(argv)

    import copy
    import dataclasses

    from qimera.export import check_onnxruntime, deployment_figures, export_onnx, verify_exports
    from qimera.export.onnx import LATENCY_BATCHES
    from qimera.quant.recipe import attach_recipe, recipe_of

    check_onnxruntime()
    batches = tuple(args.batches or LATENCY_BATCHES)

    with tempfile.TemporaryDirectory(prefix="qimera-deploy-") as tmp:
        student, prep, label = student_and_data(args, tmp)
        size = prep.teacher.input_size
        # the same weights under both recipes (a trained run's student has one of them)
        recipe = recipe_of(student)
        exact, student = copy.deepcopy(student), copy.deepcopy(student)
        attach_recipe(exact, dataclasses.replace(recipe, integer_exact=True))
        attach_recipe(student, dataclasses.replace(recipe, integer_exact=False))
        paths = {name: Path(tmp) / f"{name}.onnx" for name in ("qdq", "int8", "int8_requant", "int8_exact")}
        export_onnx(student, paths["qdq"], input_size=size)
        reports = {"int8_exact": export_onnx(exact, paths["int8_exact"], input_size=size, form="int8"),
                   "int8": export_onnx(student, paths["int8"], input_size=size, form="int8")}
        export_onnx(student, paths["int8_requant"], input_size=size, form="int8", requantize=True)
        figures = deployment_figures(paths, size, runs=args.runs, reference=prep.teacher.model,
                                     threads=args.threads, batches=batches)
        accuracy = top1 = agree = None
        if not args.no_eval:
            accuracy = verify_exports(student, prep.eval_data.loader, onnx_path=paths["qdq"],
                                      onnx_models={k: v for k, v in paths.items() if k in ("int8", "int8_requant")},
                                      threads=args.threads)
            accuracy_exact = verify_exports(exact, prep.eval_data.loader,
                                            onnx_models={"int8_exact": paths["int8_exact"]}, threads=args.threads)
            accuracy.update({k: v for k, v in accuracy_exact.items() if k.startswith(("int8_exact", "student_int"))})
    if accuracy is not None:
        from qimera.evaluate import evaluate

        teacher_top1 = evaluate(prep.teacher.model, prep.eval_data.loader, num_classes=prep.teacher.num_classes).top1
        top1 = {"fp32": teacher_top1, **{k: accuracy[f"{'onnx' if k == 'qdq' else k}_top1"] for k in paths}}
        agree = {k: accuracy[f"{'onnx' if k == 'qdq' else k}_prediction_agreement"] for k in paths}
    forms, m = figures["forms"], figures["machine"]
    base = forms["fp32"]
    big = str(max(batches))
    print(f"{prep.cfg.quant.w_bits}w{prep.cfg.quant.a_bits}a {label}"
          + (f"; student top-1 {accuracy['student_top1']:.2f}% (fake-quant), "
             f"{accuracy['student_integer_exact_top1']:.2f}% (integer-exact) on {accuracy['samples']} images"
             if accuracy else "; not evaluated (--no-eval)") + "\n")
    head = " | ".join(f"batch {b}" for b in batches)
    print(f"| model | {head} | speed-up at {big} vs FP32 | speed-up at 1 | file | smaller than FP32 | top-1 | same "
          "prediction as the student | integer kernels in onnxruntime's graph |")
    print("|---" * (len(batches) + 8) + "|")
    for name, f in forms.items():
        lat = f["latency_ms"]
        ops = ", ".join(f"{n} {op}" for op, n in f["integer_ops"].items()) or "none"
        times = " | ".join(f"{lat[str(b)]:.2f} ms" for b in batches)
        one = f"{base['latency_ms']['1'] / lat['1']:.2f}×" if "1" in lat else "–"
        print(f"| {LABELS[name]} | {times} | {base['latency_ms'][big] / lat[big]:.2f}× | {one} | "
              f"{f['file_bytes'] / 1e3:.0f} kB | {base['file_bytes'] / f['file_bytes']:.1f}× | "
              + (f"{top1[name]:.2f}%" if top1 else "–") + " | "
              + (f"{100 * agree[name]:.2f}%" if agree and name in agree else "–") + f" | {ops} |")
    exact_report = reports["int8_exact"]
    print(f"\n{m['cpu']} ({m['capability']}, {m['cpu_count']} logical CPUs), onnxruntime {m['onnxruntime']}, threads: "
          f"{m['threads']}; median of {figures['runs']} calls after warm-up. Integer-exact form: "
          f"{exact_report.int4_weights} int4 weight tensors, {exact_report.folded_batchnorms} BatchNorms folded, "
          f"{exact_report.channels_last_convs} convolutions written channels-last, "
          f"{exact_report.integer_adds} additions as QLinearAdd; layers in float: "
          f"{', '.join(exact_report.float_kernel_layers) or 'none'}. The integer-exact row's agreement is with "
          "the integer-exact student (the same weights as it evaluates).")
    result = {"student": label, "accuracy": accuracy, **figures,
              "int8_reports": {k: r.to_dict() for k, r in reports.items()}}
    if accuracy is not None:
        result["teacher_top1"] = top1["fp32"]
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
