"""Stage ``evaluate``: teacher, naive baseline and student accuracies into ``metrics.json``.

The teacher's numbers come from ``outputs/teacher/teacher.json`` (fetch_teacher measured
them on the same evaluation data). The naive baseline is the same quantization with
activation ranges calibrated on Gaussian noise; the student is the final epoch's
checkpoint. Also draws the class × class grid of generated samples (Figure 6), the PCA
of their teacher features per class pair (Figure 5, ``pca.png``; both from
:mod:`qimera.figures`) and the training curves (``outputs/figures``) and logs metrics,
figures and metrics.json into the pipeline's MLflow run: RUNNING while this stage works
on it, SCHEDULED (for ``export``) when it is done, KILLED when interrupted (Ctrl-C,
SIGTERM, SIGHUP), FAILED on an error.

A calibration-only method (zeroq, naive) has no generator and no epochs, and its figures
say so rather than stand empty: ``samples.png`` shows ZeroQ's distilled calibration
images as they are (they are not class-conditional, so there is no class × class grid)
or says that naive has no samples; ``curves.png`` and ``pca.png`` say there are no
training curves and no generated samples.
"""

from __future__ import annotations

import math

from .common import (
    FIGURES_DIR,
    METRICS,
    TEACHER_RECORD,
    TRAIN_RECORD,
    all_or_nothing,
    read_json,
    run_stage,
    write_json,
)
from . import figures, tracking

#: the figures this stage draws (dvc.yaml's plots), and nothing else of outputs/figures
SAMPLES_PNG, PCA_PNG, CURVES_PNG = (FIGURES_DIR / name for name in ("samples.png", "pca.png", "curves.png"))


def _clean(values):
    return [None if (v is None or (isinstance(v, float) and math.isnan(v))) else round(v, 4) for v in values]


def _scores(res) -> dict | None:
    if res is None:
        return None
    return {"top1": round(res.top1, 4), "top5": round(res.top5, 4), "per_class": _clean(res.per_class)}


def main() -> None:
    run = tracking.TrainedRun(with_data=True)
    tracking.claim(run.client, run.run_id)
    try:
        _evaluate(run)
        tracking.hand_over(run.client, run.run_id)  # SCHEDULED: export takes it next
    except BaseException as exc:  # interrupted (Ctrl-C, SIGTERM, SIGHUP): KILLED; an error: FAILED
        tracking.fail(run.client, run.run_id, exc)
        raise


def _evaluate(run) -> None:
    import torch

    from qimera.baselines import naive_student
    from qimera.evaluate import evaluate

    cfg, prep, state, client, run_id, tcfg = run.cfg, run.prep, run.state, run.client, run.run_id, run.root_cfg
    teacher, device = prep.teacher, prep.device

    def score(model):
        return evaluate(model, prep.eval_data.loader, device=device, num_classes=teacher.num_classes)

    teacher.model.to(device)
    naive = None
    if cfg.naive.enabled:
        torch.manual_seed(cfg.train.seed)
        naive = score(naive_student(tcfg, teacher, device))
    student_res = score(run.student().to(device))

    record = read_json(TEACHER_RECORD)
    metrics = {
        "mlflow_run_id": run_id,
        "w_bits": cfg.quant.w_bits,
        "a_bits": cfg.quant.a_bits,
        "epochs": int(state["epoch"]),
        "iterations": int(read_json(TRAIN_RECORD)["iterations"]),
        "teacher": {"top1": round(record["top1"], 4), "top5": round(record["top5"], 4),
                    "per_class": _clean(record["per_class"])},
        "naive": _scores(naive),
        "student": _scores(student_res),
    }

    final = {"teacher_top1": record["top1"], "teacher_top5": record["top5"],
             "student_top1": student_res.top1, "student_top5": student_res.top5}
    if naive is not None:
        final.update(naive_top1=naive.top1, naive_top5=naive.top5)
    with all_or_nothing(METRICS, SAMPLES_PNG, PCA_PNG, CURVES_PNG):
        generator = _trained_generator(run)
        names = _class_names(run, record)
        _draw_samples(SAMPLES_PNG, run, generator, names)
        _draw_pca(PCA_PNG, run, generator, names)
        if state["history"]:
            figures.save_curves(CURVES_PNG, state["history"], record["top1"])
        else:
            figures.save_note(CURVES_PNG, f"No training curves: {cfg.method} fine-tunes no "
                                          "weights (it only calibrates activation ranges).")
        write_json(METRICS, metrics)
        tracking.log_metrics(client, run_id, final, step=int(state["epoch"]))
        client.log_artifact(run_id, str(METRICS), "evaluation")
        client.log_artifacts(run_id, str(FIGURES_DIR), "figures")
    naive_text = f"{naive.top1:.2f}%" if naive is not None else "off"
    print(f"evaluate: teacher {record['top1']:.2f}%  naive {naive_text}  "
          f"student {student_res.top1:.2f}% (top-5 {student_res.top5:.2f}%)")


def _class_names(run, record: dict) -> list[str] | None:
    """The figures' class labels: the fetched teacher's names (``teacher.json``'s
    ``record``; the workspace checkpoint teacher carries none), else the dataset's, else none."""
    from qimera import figures as paper

    return paper.class_labels(record.get("class_names"), run.cfg.data.name, run.prep.teacher.num_classes)


def _trained_generator(run):
    """The run's generator with the final checkpoint's weights, on the run's device; None
    for a calibration-only method."""
    if run.state.get("generator") is None:
        return None
    from qimera.generators import build_generator

    generator = build_generator(run.root_cfg, run.prep.teacher)
    generator.load_state_dict(run.state["generator"])
    return generator.to(run.prep.device)


def _draw_samples(path, run, generator, class_names) -> None:
    """The generator's class × class grid (Figure 6); without a generator, the images the
    ranges were calibrated on (ZeroQ's distilled batch, shown as it is: it has no classes),
    or a note."""
    from qimera import figures as paper

    cfg, state, teacher, device = run.cfg, run.state, run.prep.teacher, run.prep.device
    if generator is not None:
        classes = paper.grid_classes(teacher.num_classes)
        grid = paper.sample_grid(generator, classes, teacher.mean, teacher.std, seed=cfg.train.seed, device=device)
        paper.save_sample_grid(path, grid, classes, class_names)
    elif state.get("calibration_images") is not None:
        images = state["calibration_images"]
        paper.save_images(path, paper.image_grid(images, teacher.mean, teacher.std), (
            f"{cfg.method}: no generator. {len(images)} of the {cfg.zeroq.batch_size} images the activation "
            f"ranges were calibrated on,\ndistilled in {cfg.zeroq.steps} steps to match the teacher's BatchNorm "
            "statistics (not class-conditional)"))
    else:
        figures.save_note(path, f"No samples: {cfg.method} has no generator (activation ranges calibrated "
                                "on Gaussian noise).")


def _draw_pca(path, run, generator, class_names) -> None:
    """Figure 5: the PCA of the teacher's features of generated samples per adjacent class
    pair, with the no-noise path between the two classes; a note without a generator."""
    from qimera import figures as paper

    cfg, teacher = run.cfg, run.prep.teacher
    if generator is None:
        figures.save_note(path, f"No PCA of generated samples: {cfg.method} has no generator.")
        return
    points = paper.pca_points(teacher, generator, paper.default_pairs(teacher.num_classes), seed=cfg.train.seed,
                              device=run.prep.device)
    paper.save_pca_pairs(path, points, class_names)


if __name__ == "__main__":
    run_stage("evaluate", main)
