"""The DVC pipeline's stages: thin scripts over the ``qimera`` library, plus MLflow tracking.

Run from the repository root, with the project's virtualenv on ``PATH`` (the stage
commands call ``python``)::

    dvc repro                                             # the offline digits demo
    dvc exp run -S preset=cifar10                         # a paper preset, 4w4a
    dvc exp run -S preset=cifar100 -S quant.w_bits=5 -S quant.a_bits=5
    dvc exp run -S method=zeroq                           # a baseline: gdfq, zeroq or naive
    dvc exp run --queue -S generator.p=0.1,0.25,0.4 && dvc queue start

Stage graph (``dvc.yaml``; each stage is ``python -m stages.<name>``; ``dvc dag`` draws it)::

    resolve          -> fetch_teacher   (outputs/config/teacher.yaml)
                     -> init_embeddings (outputs/config/embeddings.yaml)
                     -> train, evaluate, export (outputs/config/run.yaml)
    fetch_teacher    -> init_embeddings, train, evaluate, export (outputs/teacher/)
    init_embeddings  -> train (outputs/embeddings.pt)
    train            -> evaluate, export (outputs/train/)
    ladder           (independent: experiments/demo-ladder.yaml, the bit-width table)

Every method runs through the same stages. ``qimera`` and ``gdfq`` train a generator and
fine-tune the student; the calibration-only ``zeroq`` and ``naive``
(:data:`qimera.baselines.CALIBRATION_METHODS`) only calibrate the student's activation
ranges in ``train`` (:func:`qimera.baselines.calibrated_student`, as ``qimera run`` does:
the same numbers), which then writes a checkpoint of epoch 0 with no generator.

``resolve`` reads all of params.yaml and writes one config fragment per consumer:
``teacher.yaml`` (fetch_teacher), ``embeddings.yaml`` (init_embeddings) and ``run.yaml``
(train, evaluate, export). A stage reruns exactly when what it reads changes: changing
``quant.a_bits`` reruns resolve, train, evaluate and export, never fetch_teacher or
init_embeddings. Every stage also depends on its scripts and on the ``qimera`` package.

Contract (kept stable for the Prefect flow and other callers)
------------------------------------------------------------

Inputs: ``params.yaml`` (see its comments). ``preset`` picks ``configs/<preset>.yaml`` or
``configs/<preset>-w<b>a<b>.yaml``; every other key except ``mlflow`` overrides the preset's
value of the same config key when it is not ``null`` (``dvc exp run -S generator.p=0.25``).
Relative paths in presets and params (teacher weights, caches, datasets) are relative to
the repository root, also inside queued experiments. Environment:
``MLFLOW_TRACKING_URI`` (overrides ``mlflow.tracking_uri`` and the default
``sqlite:///<repo root>/mlflow.db``; wherever a URI is printed, raised or recorded, e.g.
``mlflow_run.json``, it is redacted by :func:`stages.common.redact`: no ``user:password@``,
and ``***`` for the value of query or fragment parameters whose name contains token, key,
passw, secret, sig, credential or auth), ``PREFECT__FLOW_RUN_ID`` (recorded as the run's tag
``prefect.flow_run_id``), ``QIMERA_EPOCH_HOOK=package.module:callable`` (an extra callback
the train stage calls with each epoch's record, after the epoch's checkpoint), ``DVC_EXP_NAME``/``DVC_EXP_BASELINE_REV``/``DVC_ROOT`` (set by DVC).

Outputs, relative to the project directory (the workspace, or the experiment's copy):

``metrics.json``
    ``{"mlflow_run_id": str, "w_bits": int, "a_bits": int, "epochs": int, "iterations": int,
    "teacher": {...}, "naive": {...} | null, "student": {...}}``; each of teacher/naive/student
    is ``{"top1", "top5", "per_class": [...]}`` in percent (``per_class[c]`` is null for a
    class absent from the evaluation data; naive is null when ``naive.enabled`` is false).
    The accuracies are the **final** epoch's (SPEC §5.4). For zeroq and naive ``epochs`` is 0
    and ``iterations`` is ZeroQ's distillation steps (naive: 0).
``outputs/config/run.yaml``
    the resolved run configuration (what ``qimera.config.Config`` validated).
``outputs/teacher/weights.pt``, ``outputs/teacher/teacher.json``
    the teacher's state dict and its record (source, arch, evaluation resize and
    interpolation, class names or null, sha256, top-1/top-5).
``outputs/embeddings.pt``
    ``{"embeddings": (classes, D) tensor, "init": "teacher_fc" | "random", "seed": int}``.
``outputs/train/``
    ``checkpoint.pt`` and ``history.jsonl`` (the library's trainer: its checkpoint's
    fingerprint says what it was trained from), ``train.json`` (method, epochs, iterations,
    resumed_from_epoch, seconds) and ``mlflow_run.json`` (``{"run_id", "experiment_id", "experiment_name",
    "tracking_uri"}``); a persistent output, so that a killed ``train`` resumes from its
    last epoch (and reopens its MLflow run) when rerun. zeroq and naive write the same
    checkpoint file with ``epoch`` 0, ``generator`` None, an empty history (and ZeroQ's
    first distilled images, ``calibration_images``); they never resume.
``outputs/history.csv``
    one row per epoch: ``epoch, loss_g, loss_g_ce, loss_g_bns, loss_s, top1, top5,
    iters_per_second`` (``dvc plots show``); only the header for zeroq and naive.
``outputs/figures/``
    ``samples.png`` (class × class grid of generated samples, Figure 6), ``pca.png`` (the
    teacher's penultimate features of generated samples per adjacent class pair, with the
    embedding path, Figure 5: :mod:`qimera.figures`) and ``curves.png``. Without a
    generator, ``samples.png`` shows ZeroQ's distilled calibration images (not
    class-conditional) or, for naive, says there are no samples; ``pca.png`` and
    ``curves.png`` say there is no generator and no training curves.
``outputs/ladder/``, ``outputs/ladder.json``
    the ``ladder`` stage (:mod:`stages.ladder`): the cells of params ``ladder.experiment``
    (by default the digits demo's naive, GDFQ and Qimera by bit width) with their report,
    and as DVC metrics ``{"experiment", "columns": [...], "rows": {row: {column: top-1}},
    "teacher_top1", "budget", "cells", "failed", "mlflow_parent_run", "report"}``
    (``{"experiment": null, "skipped": ...}`` when ``ladder.experiment`` is null).
``outputs/export/``
    ``student.pt`` (state dict of the fake-quantized student), ``config.yaml`` (resolved
    config), ``integer/`` (:mod:`qimera.export.integer`), ``student.onnx`` (Q/DQ ONNX,
    :mod:`qimera.export.onnx_qdq`), ``verification.json`` (student, integer reload and
    onnxruntime on the evaluation set), ``MODEL_CARD.md`` and ``model.json`` (MLflow model
    URI, registered name and version, champion, S3 location). Uploaded to
    ``export.s3_prefix`` when set (:mod:`stages.s3`).

MLflow: one run per pipeline execution in the experiment named after the preset
(``mlflow.experiment`` overrides), created by ``train`` and closed by ``export``; see
:mod:`stages.tracking`. Its status says who holds it: RUNNING while a live stage process
works on it (tagged ``qimera.pid``, ``qimera.host``, ``qimera.workspace``), SCHEDULED
between stages (after ``train`` and ``evaluate``), FINISHED after ``export``, KILLED when a
stage was interrupted (Ctrl-C, SIGTERM, SIGHUP) and FAILED when it failed. A run left
RUNNING by a process that was killed outright (SIGKILL) is marked KILLED by the next
stage that opens the store in this workspace on this host; a rerun of ``train`` that
resumes from the checkpoint reopens it, one that starts over opens a new run. A new SQLite
store may be opened by several stages at once (it is created under a lock,
``mlflow.db.lock``).

Exit status: 0 on success; 2 for bad input (unknown preset, invalid value, missing file,
unreachable MLflow server, an S3 bucket, object, credential or endpoint problem), one line on stderr before any training and before any output
is written; 130 for Ctrl-C, 143 for SIGTERM and 129 for SIGHUP, one line; 1 with one line
when the MLflow tracking server stops answering during a stage (rerun once it is back:
``train`` resumes from its last checkpoint); 1 with a traceback for anything else.

Speed: on a machine whose cores are busy with other work, torch's default of one thread
per core makes small models crawl (threads wait on each other); ``OMP_NUM_THREADS=1``
runs the demo about 30× faster there.
"""
