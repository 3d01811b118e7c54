"""``python -m stages.summary [metrics.json]``: the pipeline's accuracies as a table.

``make demo`` ends with it::

    model                                top-1   top-5
    teacher (full precision)             98.89  100.00
    naive 4w4a (noise calibration)       99.07  100.00
    Qimera 4w4a (final epoch)            98.70  100.00

followed, when the export stage has run, by where the deployable files are and how they
scored (``outputs/export/verification.json``, ``model.json``), and, when the ``ladder``
stage has run, by its bit-width table (``outputs/ladder.json``)::

    bit-width ladder (final-epoch top-1 %, mean ± std over seeds 1, 2, 3; experiments/demo-ladder.yaml, ...)
    model                                 2w2a
    teacher (full precision)             98.89
    naive (noise calibration)     49.69 ± 5.85
    GDFQ                          75.31 ± 2.85
    Qimera                        85.19 ± 3.09
    paired difference, same seed (final-epoch top-1 points):
      Qimera − GDFQ at 2w2a: +9.07 +9.81 +10.74; mean +9.88 ± 0.84, ahead at 3/3

(a 2-core AMD EPYC, one thread per run; other CPUs give other numbers per seed), and
last by the two MLflow pages to open (:func:`mlflow_lines`): the pipeline's run and the
ladder's cells, in the UI's model-training view.

The method and bit widths come from ``outputs/config/run.yaml`` when it is there.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .common import (EXPORT_DIR, LADDER_METRICS, METHOD_NAMES, METRICS, MLFLOW_RUN, MODEL_RECORD, RUN_CONFIG,
                     read_json, read_yaml)

#: the ladder's row names (its rows are methods)
LADDER_NAMES = {**METHOD_NAMES, "naive": "naive (noise calibration)"}


def table(metrics: dict, method: str = "qimera") -> str:
    bits = f"{metrics['w_bits']}w{metrics['a_bits']}a"
    rows = [("teacher (full precision)", metrics.get("teacher")),
            (f"naive {bits} (noise calibration)", metrics.get("naive")),
            (f"{METHOD_NAMES.get(method, method)} {bits} (final epoch)", metrics.get("student"))]
    lines = [f"{'model':<37}top-1   top-5"]
    lines += [f"{label:<37}{s['top1']:5.2f}{s['top5']:8.2f}" for label, s in rows if s is not None]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else METRICS
    ladder = ladder_table(read_json(LADDER_METRICS)) if LADDER_METRICS.is_file() else ""
    if not path.is_file() and not ladder:
        print(f"{path} not found: run the pipeline first (dvc repro)", file=sys.stderr)
        return 2
    if path.is_file():
        metrics = read_json(path)
        method = read_yaml(RUN_CONFIG).get("method", "qimera") if RUN_CONFIG.is_file() else "qimera"
        print(table(metrics, method))
        print(exports_line())
    if ladder:
        print()
        print(ladder)
    links = mlflow_lines(read_json(MLFLOW_RUN) if MLFLOW_RUN.is_file() else {},
                         read_json(LADDER_METRICS) if LADDER_METRICS.is_file() else {})
    if links:
        print()
        print(links)
    return 0


def mlflow_lines(run: dict, ladder: dict) -> str:
    """Where the MLflow UI shows the pipeline's run (``outputs/train/mlflow_run.json``) and
    the ladder's cells (``outputs/ladder.json``): the command that serves a database store,
    then the two pages, in the UI's model-training view."""
    from . import tracking

    pages = []
    if run.get("run_id") and run.get("experiment_id") and run.get("tracking_uri"):
        pages.append((run["tracking_uri"], "this run", tracking.run_url(run["tracking_uri"], run["experiment_id"],
                                                                         run["run_id"])))
    if ladder.get("mlflow_url") and ladder.get("mlflow_uri"):
        pages.append((ladder["mlflow_uri"], "the ladder's cells", ladder["mlflow_url"]))
    if not pages:
        return ""
    commands = list(dict.fromkeys(c for c in (tracking.ui_command(uri) for uri, _, _ in pages) if c))
    head = f"MLflow: run `{'` and `'.join(commands)}`, then open" if commands else "MLflow: open"
    width = max(len(label) for _, label, _ in pages) + 2
    lines = [head, *(f"  {label + ':':<{width}}{url}" for _, label, url in pages),
             "  (tick two or more runs and press Compare to see them side by side)"]
    return "\n".join(lines)


def ladder_table(ladder: dict) -> str:
    """The ladder stage's table: a row per method (teacher first), a column per bit width,
    each entry the mean ± std over the seeds; then the paired differences per seed."""
    rows, columns = ladder.get("rows") or {}, ladder.get("columns") or []
    if not rows:
        return ""
    std = ladder.get("std") or {}
    spread = any(isinstance(v, (int, float)) and n > 1 for r, d in (ladder.get("n") or {}).items()
                 for c, n in d.items() for v in [std.get(r, {}).get(c)])
    width = max(len(LADDER_NAMES.get(r, r)) for r in [*rows, "teacher (full precision)"]) + 2
    cw = 15 if spread else 8

    def fmt(v, s=None):
        if not isinstance(v, (int, float)):
            return f"{'–':>{cw}}"
        text = f"{v:.2f} ± {s:.2f}" if spread and isinstance(s, (int, float)) else f"{v:.2f}"
        return f"{text:>{cw}}"

    seeds = ladder.get("seeds") or []
    over = (f"mean ± std over seeds {', '.join(str(s) for s in seeds)}" if len(seeds) > 1
            else f"seed {seeds[0]}" if seeds else "")
    lines = [f"bit-width ladder (final-epoch top-1 %{', ' + over if over else ''}; {ladder['experiment']}, "
             f"epochs x iterations x batch {ladder['budget']})", f"{'model':<{width}}" + "".join(f"{c:>{cw}}" for c in columns)]
    if ladder.get("teacher_top1") is not None:
        lines.append(f"{'teacher (full precision)':<{width}}" + fmt(ladder["teacher_top1"]) * len(columns))
    for row, values in rows.items():
        lines.append(f"{LADDER_NAMES.get(row, row):<{width}}"
                     + "".join(fmt(values.get(c), std.get(row, {}).get(c)) for c in columns))
    pairs = ladder.get("pairs") or []
    if pairs:
        lines.append("paired difference, same seed (final-epoch top-1 points):")
        for p in pairs:
            diffs = " ".join(f"{d:+.2f}" for d in p["by_seed"].values() if d is not None)
            name = f"{LADDER_NAMES.get(p['treatment'], p['treatment'])} − {LADDER_NAMES.get(p['baseline'], p['baseline'])}"
            mean = "" if p["mean"] is None else f"; mean {p['mean']:+.2f} ± {p['std']:.2f}, ahead at {p['wins']}/{len(p['by_seed'])}"
            lines.append(f"  {name} at {p['entry']}: {diffs or '–'}{mean}")
    lines.append(f"(report: {ladder['report']})")
    return "\n".join(lines)


def _int8_line(v: dict) -> str:
    """The int8 form's agreement and, where measured, its speed and size against the float teacher."""
    if "rejected" in v.get("onnx_int8", {}):
        return (f"student.int8.onnx (integer kernels) not shipped: top-1 {v['onnx_int8_top1']:.2f}%, same prediction "
                f"on {100 * v['onnx_int8_prediction_agreement']:.2f}% (MODEL_CARD.md says why)")
    line = (f"student.int8.onnx (integer kernels): top-1 {v['onnx_int8_top1']:.2f}%, same prediction on "
            f"{100 * v['onnx_int8_prediction_agreement']:.2f}%")
    forms = v.get("deployment", {}).get("forms", {})
    if "int8" in forms and "fp32" in forms:
        fast, base = forms["int8"], forms["fp32"]
        line += "; " + ", ".join(
            f"batch {b} {fast['latency_ms'][b]:.2f} ms vs FP32 {base['latency_ms'][b]:.2f} ms" for b in fast["latency_ms"])
        line += f"; {base['file_bytes'] / fast['file_bytes']:.1f}x smaller"
    return line


def exports_line(export_dir: Path = EXPORT_DIR) -> str:
    """One paragraph on the exported files, or a hint when export has not run."""
    from qimera.export import VERIFICATION_FILE

    v_path, m_path = export_dir / VERIFICATION_FILE, export_dir / MODEL_RECORD
    if not (v_path.is_file() and m_path.is_file()):
        return "no export yet (outputs/export): run the export stage"
    v, m = read_json(v_path), read_json(m_path)
    lines = [
        f"exported to {export_dir}/: student.onnx (onnxruntime top-1 {v['onnx_top1']:.2f}%, same prediction "
        f"on {100 * v['onnx_prediction_agreement']:.2f}% of {v['samples']} images), integer/ (max |Δ logits| "
        f"{v['integer_max_abs_logit_delta']:.1g}), MODEL_CARD.md",
        *([_int8_line(v)] if "onnx_int8_top1" in v else []),
        f"MLflow model {m['registered_model']} version {m['registered_version']}"
        + (" (champion)" if m.get("champion") else f" (champion: version {m.get('champion_version')})"),
    ]
    if m.get("s3_uri"):
        lines.append(f"uploaded to {m['s3_uri']}/")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
