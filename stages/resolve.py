"""Stage ``resolve``: params.yaml + the preset file -> the validated run configuration.

Writes ``outputs/config/run.yaml`` (the whole resolved config) and two fragments that
later stages depend on, so that each stage reruns exactly when what it reads changes:
``teacher.yaml`` (teacher, evaluation data, device: ``fetch_teacher``) and
``embeddings.yaml`` (embedding initialisation and seed: ``init_embeddings``). Changing
``quant.a_bits`` changes ``run.yaml`` only, so ``fetch_teacher`` and ``init_embeddings``
are skipped.

Everything that can be checked without loading the teacher is checked here, before any
other stage runs: the preset, every value (qimera's validation, which also allows the four
methods: qimera, gdfq and the calibration-only zeroq and naive), the input files, the
``ladder`` section and its experiment file (stages/ladder.py), and that the MLflow store
answers.
"""

from __future__ import annotations

from .common import (
    EMBEDDINGS_CONFIG,
    RUN_CONFIG,
    TEACHER_CONFIG,
    check_input_files,
    export_params,
    load_params,
    preset_file,
    repo_root,
    resolve_config,
    run_stage,
    write_yaml,
)
from .ladder import load_ladder
from .tracking import connect, tracking_uri


def main() -> None:
    root = repo_root()
    params = load_params()
    cfg = resolve_config(params, root)
    check_input_files(cfg, root)
    export_params(params)
    load_ladder(params)  # the ladder stage's params and experiment file, checked now too
    connect(tracking_uri(params, root))

    resolved = cfg.resolved()
    gen = cfg.effective_generator()
    write_yaml(TEACHER_CONFIG, {"teacher": resolved["teacher"], "data": resolved["data"],
                                "device": cfg.train.device})
    write_yaml(EMBEDDINGS_CONFIG, {"embedding_init": gen.embedding_init, "seed": cfg.train.seed})
    write_yaml(RUN_CONFIG, resolved)
    budget = {"zeroq": f"calibration on images distilled in {cfg.zeroq.steps} steps",
              "naive": "calibration on Gaussian noise"}.get(
        cfg.method, f"{cfg.train.epochs} epochs x {cfg.train.iters_per_epoch} iterations")
    print(f"resolve: preset {cfg.preset} ({preset_file(root, cfg.preset, cfg.quant.w_bits, cfg.quant.a_bits).name}), "
          f"{cfg.method} w{cfg.quant.w_bits}a{cfg.quant.a_bits}, {budget}")


if __name__ == "__main__":
    run_stage("resolve", main)
