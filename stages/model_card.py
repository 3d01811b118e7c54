"""The model card (markdown) written by the ``export`` stage beside the exported student."""

from __future__ import annotations

import yaml

from .common import METHOD_NAMES


def _acc(m: dict | None) -> str:
    return "–" if not m else f"{m['top1']:.2f}% top-1, {m['top5']:.2f}% top-5"


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _deployment_table(v: dict) -> list[str]:
    """Size, latency and agreement of each ONNX form beside the float teacher's, where the
    export measured them (``export.latency_runs`` > 0)."""
    d = v.get("deployment")
    if not d:
        return []
    forms, m = d["forms"], d["machine"]
    batches = [str(b) for b in d["batches"]]
    rows = {"fp32": ("float teacher, plain ONNX (for comparison)", None, None),
            "qdq": ("`student.onnx`: Q/DQ reference form", v.get("onnx_top1"), v.get("onnx_prediction_agreement")),
            "int8": ("`student.int8.onnx`: int8 form", v.get("onnx_int8_top1"), v.get("onnx_int8_prediction_agreement"))}
    lines = ["| model | file | " + " | ".join(f"latency, batch {b}" for b in batches) + " | top-1 | same prediction as the student |",
             "|---|---|" + "---|" * len(batches) + "---|---|"]
    for key, (label, top1, agree) in rows.items():
        if key not in forms:
            continue
        f = forms[key]
        lat = " | ".join(f"{f['latency_ms'][b]:.2f} ms" for b in batches)
        lines.append(f"| {label} | {_size(f['file_bytes'])} | {lat} | "
                     + (f"{top1:.2f}%" if top1 is not None else "–") + " | "
                     + (f"{100 * agree:.2f}%" if agree is not None else "–") + " |")
    ops = forms.get("int8", {}).get("integer_ops")
    note = [""]
    if "rejected" in v.get("onnx_int8", {}):
        note.append("The int8 row was measured on the form that failed its check; the file is not shipped.")
    if "int8" in forms:
        note.append("onnxruntime's optimised int8 graph runs "
                    + (", ".join(f"{n} {op}" for op, n in ops.items()) if ops else "**no integer kernel**") + ".")
    return [*lines, *note,
            f"Measured on {m['cpu']} ({m['capability']}, {m['cpu_count']} logical CPUs), onnxruntime {m['onnxruntime']}, "
            f"threads: {m['threads']}; median of {d['runs']} calls after warm-up.", ""]


def _deployment(teacher: dict, v: dict) -> list[str]:
    onnx = v.get("onnx", {})
    int8 = v.get("onnx_int8", {})
    fallback = len(onnx.get("float_weights", [])) + len(onnx.get("float_activations", []))
    if "skipped" in int8:
        int8_line = f"- no `student.int8.onnx`: {int8['skipped']}."
    elif "rejected" in int8:
        int8_line = f"- no `student.int8.onnx`: the int8 form was made and measured but not shipped: {int8['rejected']}."
    elif int8:
        requantized, floats = len(int8.get("requantized", [])), len(int8.get("float_kernel_layers", []))
        rest = (f"{requantized} residual branches requantized to 8 bits and {int8.get('integer_adds', 0)} additions "
                "as QLinearAdd, exactly as the integer-exact student computes them" if int8.get("integer_exact") else
                f"{requantized} convolution outputs requantized to 8 bits before their residual addition (an "
                "approximation)" if requantized else
                f"{floats} layers without a quantizer on both sides (residual branches, the first and last layers) "
                "in exact float")
        int8_line = (
            "- `student.int8.onnx`: the deployable form (opset {}), which onnxruntime runs on integer kernels: {} "
            "BatchNorm layers folded into their convolution, int8 weights with one zero point{}, uint8 activations "
            "(QuantizeLinear → Clip), {}.".format(
                int8.get("opset", "?"), int8.get("folded_batchnorms", 0),
                f" ({int8['int4_weights']} tensors stored as packed int4)" if int8.get("int4_weights") else "",
                rest))
    else:
        int8_line = None
    checked = (f"Checked on {v['samples']} evaluation images: fake-quant student {v['student_top1']:.2f}% top-1, "
               f"integer reload {v['integer_top1']:.2f}% (max |Δ logits| {v['integer_max_abs_logit_delta']:.2g}), "
               f"onnxruntime {v['onnx_top1']:.2f}% (same prediction on "
               f"{100 * v['onnx_prediction_agreement']:.2f}% of the images)")
    if "onnx_int8_top1" in v:
        against = (f" as the integer-exact student, {v['student_integer_exact_top1']:.2f}%"
                   if "student_integer_exact_top1" in v else "")
        checked += (f", int8 form {v['onnx_int8_top1']:.2f}% (same prediction{against} on "
                    f"{100 * v['onnx_int8_prediction_agreement']:.2f}%)")
    return [
        "## Files and how to run them",
        "",
        "Inputs are images resized to "
        f"{teacher['input_size']} and normalised with mean {teacher['mean']} and std {teacher['std']}.",
        "",
        "- `student.onnx`: ONNX (opset {}) with QuantizeLinear/DequantizeLinear: {} integer weight tensors "
        "behind per-channel DequantizeLinear, {} activation quantizers as QuantizeLinear → Clip → "
        "DequantizeLinear{}. Input `images`, output `logits`; runs in onnxruntime with no custom op. The exact "
        "reference form (convolutions run in float).".format(
            onnx.get("opset", "?"), onnx.get("qdq_weights", "?"), onnx.get("qdq_activations", "?"),
            f" ({fallback} kept as exact float ops: zero point outside 8 bits)" if fallback else ""),
        *([int8_line] if int8_line else []),
        "- `integer/`: integer weights (packed two per byte at ≤ 4 bits), per-channel scale and zero point, "
        "activation ranges (`student.safetensors`, `quant_map.json`); "
        "`qimera.export.load_integer('integer')` rebuilds the model.",
        "- `student.pt`: the fake-quantized PyTorch student's state dict.",
        "",
        checked + ".",
        "",
        *_deployment_table(v),
    ]


def _how_it_was_made(config: dict) -> list[str]:
    """The method's steps: a generator-based method fine-tunes the student; ZeroQ and naive
    only calibrate its activation ranges."""
    q, g, t = config["quant"], config["generator"], config["train"]
    student = (f"The student, a copy of the teacher with per-channel {q['w_bits']}-bit weights and per-tensor "
               f"{q['a_bits']}-bit activations")
    if config["method"] == "zeroq":
        z = config["zeroq"]
        return [
            "1. The teacher was frozen. Forward hooks on its BatchNorm layers record the statistics of their inputs.",
            f"2. ZeroQ's distilled data: {z['batch_size']} random images were optimised for {z['steps']} Adam "
            f"steps (lr {z['lr']}, seed {t['seed']}) so that their batch statistics match the teacher's BatchNorm "
            "running statistics.",
            f"3. {student}, had its activation ranges calibrated on these images, then frozen. "
            "**No weights were fine-tuned.**",
        ]
    if config["method"] == "naive":
        n = config["naive"]
        return [
            f"1. {student}, had its activation ranges calibrated on {n['batches']} batches of {n['batch_size']} "
            f"Gaussian-noise images N(0, 1) in the teacher's normalised input space (seed {t['seed']}), then "
            "frozen. **No weights were fine-tuned.**",
        ]
    return [
        "1. The teacher was frozen. Forward hooks on its BatchNorm layers record the statistics of their inputs.",
        f"2. A conditional generator ({g['variant']} variant, {g['dm_layers']} disentanglement layer(s), "
        f"embeddings initialised `{g['embedding_init']}`) learned to produce images that the teacher "
        "classifies as their class and whose batch statistics match the teacher's BatchNorm running statistics.",
        f"3. With probability p = {g['p']} a batch superposes K = {g['k']} class embeddings per sample "
        "(boundary supporting samples), labelled with the mixed soft label.",
        f"4. {student} (ranges calibrated for {t['calibration_epochs']} epochs, then frozen), "
        f"was fine-tuned on generated images by distillation from the teacher "
        f"({t['epochs']} epochs × {t['iters_per_epoch']} iterations, batch {t['batch_size']}, seed {t['seed']}).",
        *_additions(config.get("parts") or {}),
    ]


def _additions(parts: dict) -> list[str]:
    """The parts beyond the paper's method that the run used (``parts`` section), as a step."""
    from qimera.config import FINGERPRINT_WHEN_SET

    changed = {k: v for k, v in parts.items() if FINGERPRINT_WHEN_SET.get(f"parts.{k}") != v}
    if not changed:
        return []
    said = []
    if parts.get("averaging", "none") != "none":
        said.append(f"the exported student is the **{parts['averaging'].upper()} weight average** of the trained "
                    "one (its evaluated top-1 is the average's)")
    if parts.get("image_filter", "none") != "none":
        said.append(f"the student saw the generated images through the `{parts['image_filter']}` filter")
    if "ce_easy" in parts.get("student_loss", []):
        said.append("the label's cross-entropy applied to the samples the teacher finds easy only (SynQ)")
    keys = ", ".join(f"`{k}: {v}`" for k, v in changed.items())
    return [f"5. Beyond the paper: {'; '.join(said) or 'other method parts'} (parts {keys})."]


def _recipe_line(quant: dict) -> str:
    """Which quantization recipe the model used, and what its accuracy is the accuracy of."""
    if quant.get("integer_exact"):
        return ("Quantization recipe: **integer-exact** (`quant.integer_exact: true`). The accuracy below is that of "
                "the arithmetic onnxruntime's integer kernels run (BatchNorm folded, int32 biases, the kernels' "
                "rounding, residual branches requantized to 8 bits), so it is the accuracy of `student.int8.onnx`.")
    return ("Quantization recipe: the paper's (fake-quantized, `quant.integer_exact: false`). The accuracy below is "
            "that arithmetic's, which `student.onnx` reproduces; the int8 file's integer kernels round differently "
            "(see its line under Files).")


def render_model_card(*, name: str, config: dict, teacher: dict, metrics: dict, version: str | None,
                      verification: dict | None = None) -> str:
    """Teacher and its source, bits, accuracies, resolved config, and how it was made;
    with ``verification`` (the export stage's), the deployable files and their check."""
    from qimera.baselines import CALIBRATION_METHODS

    q = config["quant"]
    bits = f"{q['w_bits']}-bit weights, {q['a_bits']}-bit activations"
    method = METHOD_NAMES.get(config["method"], config["method"])
    made = ("calibration only: no weights fine-tuned" if config["method"] in CALIBRATION_METHODS
            else f"final epoch {metrics.get('epochs')}, not selected on test data")
    lines = [
        f"# {name}" + (f" (version {version})" if version else ""),
        "",
        f"A {bits} fake-quantized copy of the teacher below, made by **{method}** without any "
        "training data (qimera, data-free quantization).",
        "",
        _recipe_line(q),
        "",
        "## Teacher",
        "",
        f"- source: `{teacher['source']}`" + (f", name `{teacher['name']}`" if teacher.get("name") else ""),
        f"- architecture: `{teacher['arch']}`, {teacher['num_classes']} classes, input {teacher['input_size']}",
        f"- weights sha256: `{teacher['sha256']}`"
        + (f" (original file sha256 `{teacher['source_sha256']}`)" if teacher.get("source_sha256") else ""),
        "",
        "## Accuracy",
        "",
        f"Measured on `{config['data']['name']}` (evaluation only: no image was used to make the model).",
        "",
        "| model | accuracy |",
        "|---|---|",
        f"| teacher (full precision) | {_acc(metrics.get('teacher'))} |",
        f"| naive {q['w_bits']}w{q['a_bits']}a (ranges calibrated on Gaussian noise) | {_acc(metrics.get('naive'))} |",
        f"| **this model** ({made}) | {_acc(metrics.get('student'))} |",
        "",
        "## How it was made without data",
        "",
        *_how_it_was_made(config),
        "",
        *(_deployment(teacher, verification) if verification else []),
        "## Resolved configuration",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
