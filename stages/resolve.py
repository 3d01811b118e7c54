"""Stage ``resolve``: params.yaml + the preset file -> the validated run configuration.

Writes ``outputs/config/run.yaml`` (the whole resolved config) and two fragments that
later stages depend on, so that each stage reruns exactly when what it reads changes:
``teacher.yaml`` (teacher, evaluation data, device: ``fetch_teacher``) and
``embeddings.yaml`` (embedding initialisation and seed: ``init_embeddings``). Changing
``quant.a_bits`` changes ``run.yaml`` only, so ``fetch_teacher`` and ``init_embeddings``
are skipped.

Everything that can be checked without loading the teacher is checked here, before any
other stage runs: the preset, every value (qimera's validation), the input files, the
method, and that the MLflow store answers.
"""

from __future__ import annotations

from .common import (
    EMBEDDINGS_CONFIG,
    RUN_CONFIG,
    TEACHER_CONFIG,
    PipelineError,
    check_input_files,
    export_params,
    load_params,
    preset_file,
    repo_root,
    resolve_config,
    run_stage,
    write_yaml,
)
from .tracking import connect, tracking_uri

PIPELINE_METHODS = ("qimera", "gdfq")


def main() -> None:
    root = repo_root()
    params = load_params()
    cfg = resolve_config(params, root)
    if cfg.method not in PIPELINE_METHODS:
        raise PipelineError(
            f"method={cfg.method!r}: the pipeline trains a generator ({', '.join(PIPELINE_METHODS)}); "
            f"run the {cfg.method} baseline with `qimera run {preset_file(root, cfg.preset)}`"
        )
    check_input_files(cfg, root)
    export_params(params)
    connect(tracking_uri(params, root))

    resolved = cfg.resolved()
    gen = cfg.effective_generator()
    write_yaml(TEACHER_CONFIG, {"teacher": resolved["teacher"], "data": resolved["data"],
                                "device": cfg.train.device})
    write_yaml(EMBEDDINGS_CONFIG, {"embedding_init": gen.embedding_init, "seed": cfg.train.seed})
    write_yaml(RUN_CONFIG, resolved)
    print(f"resolve: preset {cfg.preset} ({preset_file(root, cfg.preset, cfg.quant.w_bits, cfg.quant.a_bits).name}), "
          f"{cfg.method} w{cfg.quant.w_bits}a{cfg.quant.a_bits}, {cfg.train.epochs} epochs x "
          f"{cfg.train.iters_per_epoch} iterations")


if __name__ == "__main__":
    run_stage("resolve", main)
