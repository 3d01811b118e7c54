"""Prefect flow ``qimera``: run the DVC pipeline for one preset as a DVC experiment.

The flow is a thin orchestration layer over ``dvc exp run``. DVC does the work (stages,
caching, recording the experiment), the stages log to MLflow, and Prefect adds scheduling,
retries for transient failures, one-at-a-time execution per worker, logs and a result:

    {"preset": "imagenet-resnet18", "w_bits": 4, "a_bits": 4, "overrides": {…},
     "mlflow_run_id": "…", "mlflow_url": "…/#/experiments/…/runs/…?workflowType=machine_learning",
     "metrics": {…metrics.json…}, "dvc_experiment": "…", "flow_run_id": "…", "dvc_pushed": […]}

Deployments (``demo``, ``cifar10``, ``cifar100``, ``imagenet``) are declared in the
repository's ``prefect.yaml``; see ``pipelines/README.md`` for the commands.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

# The flow runs in a checkout of the project (prefect.yaml copies no code anywhere). Its
# ``stages`` package owns the pipeline's presets and file names; make it importable
# whatever directory the worker was started from.
PROJECT_DIR = Path(__file__).resolve().parents[1]
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

from stages.common import METRICS, MLFLOW_RUN, available_presets, dvc_executable, format_value  # noqa: E402

# ``imagenet`` is this flow's shorthand: the ``model`` parameter picks the ImageNet teacher,
# one per ImageNet preset (the paper's three and the supplement's Table 10 teachers).
IMAGENET_MODELS = {
    "resnet18": "imagenet-resnet18",
    "resnet50": "imagenet-resnet50",
    "mobilenetv2": "imagenet-mobilenetv2",
    "inceptionv3": "imagenet-inceptionv3",
    "sqnxt23": "imagenet-sqnxt23",
    "shufflenet": "imagenet-shufflenet",
}
#: the ``model`` parameter's allowed values (the deployments' schema): IMAGENET_MODELS' keys
Model = Literal["resnet18", "resnet50", "mobilenetv2", "inceptionv3", "sqnxt23", "shufflenet"]
Bits = Annotated[int, Field(ge=2, le=8)]
#: the pipeline task's default retry policy: one retry after each delay (seconds)
RETRY_DELAYS = (30, 120)
RetryDelays = Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=10)]

# Tag of the pipeline task. A tag concurrency limit on it serialises training across
# workers that share one checkout: ``prefect concurrency-limit create qimera-train 1``.
TRAIN_TAG = "qimera-train"


class FlowRunError(RuntimeError):
    """``dvc exp run`` failed in a way that may succeed when tried again."""

    transient = True


class FlowInputError(FlowRunError):
    """The flow's or ``dvc exp run``'s input is wrong: retrying cannot help."""

    transient = False


# --------------------------------------------------------------------------------------
# Pure helpers (unit-tested without a Prefect server)
# --------------------------------------------------------------------------------------


def resolve_preset(preset: str, model: str = "resnet18", project: Path | None = None) -> str:
    """The ``params.yaml`` preset for the flow's ``preset``/``model`` parameters."""
    if preset == "imagenet":
        if model not in IMAGENET_MODELS:
            raise FlowInputError(
                f"model={model!r} is not an ImageNet teacher; allowed: {', '.join(IMAGENET_MODELS)}"
            )
        return IMAGENET_MODELS[model]
    allowed = available_presets(Path(project) if project is not None else PROJECT_DIR)
    if preset not in allowed:
        raise FlowInputError(
            f"preset={preset!r} is unknown; allowed: imagenet, {', '.join(allowed)}"
        )
    return preset


def dvc_command(
    dvc: str, preset: str, w_bits: int, a_bits: int, overrides: dict[str, Any] | None = None
) -> list[str]:
    """``dvc exp run`` with the preset, the bit widths and the extra ``-S`` overrides.

    Overrides are written ``++key=value`` (Hydra's "add or override"), so that keys that
    params.yaml does not list (``train.warmup_epochs``, ``naive.batches``) can be set too.
    """
    params: dict[str, Any] = {"preset": preset, "quant.w_bits": w_bits, "quant.a_bits": a_bits}
    extra: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][\w.\-]*", key):
            raise FlowInputError(f"override key {key!r} is not a dotted params.yaml key")
        if key in ("preset", "quant.w_bits", "quant.a_bits"):
            raise FlowInputError(
                f"override {key!r} is a flow parameter; set it as a parameter instead"
            )
        extra[key] = value
    cmd = [dvc, "exp", "run"]
    for key, value in params.items():
        cmd += ["-S", f"{key}={format_value(value)}"]
    for key, value in extra.items():
        cmd += ["-S", f"++{key}={format_value(value)}"]
    return cmd


# Failures that another attempt can fix: the network, a lock held by another DVC
# process, the machine running out of memory or the process being killed.
_TRANSIENT = re.compile(
    r"Unable to acquire lock|lock .*held|is busy|"
    r"Temporary failure in name resolution|Name or service not known|Connection (?:refused|reset|aborted)|"
    r"ConnectionError|ConnectTimeout|ReadTimeout|timed out|Network is unreachable|"
    r"HTTP Error 5\d\d|HTTP Error 429|\b5\d\d Server Error|Too Many Requests|"
    r"Remote end closed connection|IncompleteRead|download failed|"
    r"CUDA out of memory|OutOfMemoryError|Cannot allocate memory|Killed",
    re.IGNORECASE,
)
# Failures caused by the input: unknown preset or key, invalid value, missing file.
_CONFIG = re.compile(
    r"qimera(?: stage \S+)?: error:|ConfigError|TeacherError|DataError|ValidationError|"
    r"Could not override|Key '.*' is not in struct|"
    r"is not a valid|invalid (?:value|choice|literal)|not allowed|unknown (?:preset|key)|"
    r"not a git repository|not a DVC repository|No such file or directory|"
    r"dvc\.yaml.*(?:error|invalid)|failed to parse",
    re.IGNORECASE,
)
_STAGE_EXIT = re.compile(r"exited with (-?\d+)")


def classify_failure(returncode: int, output: str) -> type[FlowRunError]:
    """:class:`FlowRunError` (retry) or :class:`FlowInputError` (fail fast).

    Signals (a negative return code, 137/143) and the patterns in ``_TRANSIENT`` are
    transient. A stage that exits with status 2 (the project's "bad input" status, as
    ``qimera`` and ``argparse`` use it) or an error message matching ``_CONFIG`` is a
    configuration error. Anything else is retried.
    """
    if returncode < 0 or returncode in (137, 143):
        return FlowRunError
    tail = output[-20000:]
    if _TRANSIENT.search(tail):
        return FlowRunError
    stage_codes = [int(c) for c in _STAGE_EXIT.findall(tail)]
    if stage_codes:
        code = stage_codes[-1]
        if code < 0 or code in (137, 143):
            return FlowRunError
        if code == 2:
            return FlowInputError
    if returncode == 2 or _CONFIG.search(tail):
        return FlowInputError
    return FlowRunError


def collect_results(project: Path) -> tuple[str | None, dict[str, Any]]:
    """The MLflow run id and the metrics that the pipeline left in ``project``."""
    metrics_path = project / METRICS
    if not metrics_path.is_file():
        raise FlowRunError(f"the pipeline finished but wrote no {METRICS} in {project}")
    metrics = json.loads(metrics_path.read_text())
    run_id = metrics.get("mlflow_run_id") if isinstance(metrics, dict) else None
    run_file = project / MLFLOW_RUN
    if not run_id and run_file.is_file():
        run_id = json.loads(run_file.read_text()).get("run_id")
    return run_id, metrics


def mlflow_page(project: Path, run_id: str | None) -> str | None:
    """The MLflow UI's page of the pipeline's run (its model-training view), from the record
    ``train`` left in ``project``; a database store's page needs ``mlflow ui`` running."""
    run_file = project / MLFLOW_RUN
    if not run_id or not run_file.is_file():
        return None
    record = json.loads(run_file.read_text())
    if record.get("run_id") != run_id or not record.get("experiment_id") or not record.get("tracking_uri"):
        return None
    from stages.tracking import run_url  # imports torch: only once the pipeline has run

    return run_url(record["tracking_uri"], record["experiment_id"], run_id)


def metrics_table(metrics: dict[str, Any]) -> str:
    """Markdown table of top-1/top-5 for teacher, naive and student (metrics.json)."""
    rows = []
    for name in ("teacher", "naive", "student"):
        entry = metrics.get(name)
        if isinstance(entry, dict):
            rows.append(f"| {name} | {entry.get('top1', '')} | {entry.get('top5', '')} |")
        elif isinstance(entry, (int, float)):
            rows.append(f"| {name} | {entry} | |")
    return "| model | top-1 (%) | top-5 (%) |\n|---|---|---|\n" + "\n".join(rows)


def _retry_unless_config_error(task_, task_run, state) -> bool:
    """``retry_condition_fn``: no retry for :class:`FlowInputError`."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # the result could not be loaded: keep the default (retry)
        return True
    return not (isinstance(exc, FlowRunError) and not exc.transient)


# --------------------------------------------------------------------------------------
# Task and flow
# --------------------------------------------------------------------------------------


@task(
    name="dvc-exp-run",
    retries=len(RETRY_DELAYS),
    retry_delay_seconds=list(RETRY_DELAYS),
    retry_condition_fn=_retry_unless_config_error,
    tags=[TRAIN_TAG],
    cache_policy=None,
    persist_result=False,
)
def run_pipeline(cmd: list[str], project: str) -> dict[str, Any]:
    """Run ``cmd`` (``dvc exp run …``) in ``project`` and stream its output to the log."""
    logger = get_run_logger()
    project_dir = Path(project)
    env = dict(os.environ)
    # The stages run ``python …``: make it the interpreter this flow runs in (the venv).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    if flow_run.id:
        env["PREFECT__FLOW_RUN_ID"] = str(flow_run.id)
    logger.info("$ %s  (in %s)", " ".join(cmd), project_dir)
    tail: deque[str] = deque(maxlen=400)
    experiment = None
    # `dvc exp run -S` writes the values into the workspace's params.yaml and leaves them
    # there; put the file back afterwards so that the next flow run starts from the same
    # params.yaml (a retry then applies the same values again and resumes training). The
    # experiment's own params stay recorded by DVC (`dvc exp show`).
    params_file = project_dir / "params.yaml"
    params_before = params_file.read_bytes() if params_file.is_file() else None
    try:
        returncode = _stream(cmd, project_dir, env, logger, tail)
    finally:
        if params_before is not None and (
            not params_file.is_file() or params_file.read_bytes() != params_before
        ):
            params_file.write_bytes(params_before)
    for line in tail:
        m = re.search(r"Ran experiment\(s\):\s*(\S+)", line)
        if m:
            experiment = m.group(1)
    if returncode != 0:
        output = "\n".join(tail)
        kind = classify_failure(returncode, output)
        what = "configuration error, not retried" if kind is FlowInputError else "may be retried"
        last = "\n".join(list(tail)[-15:])
        raise kind(f"`dvc exp run` exited with status {returncode} ({what}). Last lines:\n{last}")
    run_id, metrics = collect_results(project_dir)
    return {"mlflow_run_id": run_id, "metrics": metrics, "dvc_experiment": experiment}


def _stream(cmd: list[str], cwd: Path, env: dict[str, str], logger, tail: deque) -> int:
    """Run ``cmd``, log each output line (stdout and stderr) and keep the last ones."""
    with subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n").rsplit("\r", 1)[-1].rstrip()
            if not line:
                continue
            tail.append(line)
            logger.info("%s", line[:2000])
        return proc.wait()


def _push(project: Path, experiment: str | None, remote, logger) -> list[str]:
    """With ``QIMERA_DVC_REMOTE`` (``remote``, a :class:`pipelines.remote.RemoteSettings`;
    a team deployment: this flow run's checkout is its own clone, gone when it ends), push
    the run's outputs there and, with ``QIMERA_DVC_EXP_REMOTE``, the DVC experiment to
    that git remote (:func:`stages.experiment_dvc.push_results`). Returns the commands run."""
    from stages.experiment_dvc import push_results, use_remote

    if not remote.dvc_remote:
        return []
    use_remote(project, remote.dvc_remote, endpoint=remote.endpoint)
    pushed = push_results(project, experiment, git_remote=remote.exp_git_remote if experiment else None)
    logger.info("%s (%s)", "; ".join(pushed), remote.dvc_remote)
    return pushed


@flow(name="qimera", persist_result=True)
def qimera_flow(
    preset: str = "demo",
    w_bits: Bits = 4,
    a_bits: Bits = 4,
    model: Model = "resnet18",
    overrides: dict[str, Any] | None = None,
    retry_delays: RetryDelays = list(RETRY_DELAYS),
) -> dict[str, Any]:
    """Quantize a preset's teacher with Qimera through the DVC pipeline.

    Args:
        preset: ``demo``, ``cifar10``, ``cifar10-shared``, ``cifar100``, ``imagenet`` (with
            ``model``) or a full ImageNet preset such as ``imagenet-resnet50``.
        w_bits: weight bit width (2..8).
        a_bits: activation bit width (2..8).
        model: ImageNet teacher when ``preset`` is ``imagenet``: resnet18, resnet50,
            mobilenetv2, or the Table 10 teachers inceptionv3, sqnxt23, shufflenet
            (``imagenet-<model>``). Ignored for the other presets.
        overrides: extra ``params.yaml`` values, ``{"train.epochs": 2, "generator.p": 0.25}``,
            passed as ``dvc exp run -S ++key=value`` (keys params.yaml lacks are added).
        retry_delays: seconds to wait before each retry of a transient failure (one retry
            per entry; ``[]`` for none). Input errors are never retried.
    """
    from pipelines.remote import RemoteSettings

    logger = get_run_logger()
    remote = RemoteSettings.from_env()
    remote.use_credentials()  # a team pool's Secret block, if it names one
    project = Path.cwd()
    if not (project / "dvc.yaml").is_file():
        raise FlowInputError(
            f"{project} has no dvc.yaml: the deployment's working directory is not the qimera "
            "project (run `prefect deploy` from the repository root)"
        )
    resolved = resolve_preset(preset, model, project)
    cmd = dvc_command(dvc_executable(), resolved, w_bits, a_bits, overrides)
    logger.info("preset %s at %dw%da in %s", resolved, w_bits, a_bits, project)
    pipeline = run_pipeline.with_options(retries=len(retry_delays), retry_delay_seconds=list(retry_delays))
    out = pipeline(cmd, str(project))
    pushed = _push(project, out["dvc_experiment"], remote, logger)
    result = {
        "preset": resolved,
        "w_bits": w_bits,
        "a_bits": a_bits,
        "overrides": dict(overrides or {}),
        "mlflow_run_id": out["mlflow_run_id"],
        "metrics": out["metrics"],
        "dvc_experiment": out["dvc_experiment"],
        "flow_run_id": str(flow_run.id) if flow_run.id else None,
        "dvc_pushed": pushed,
        "mlflow_url": mlflow_page(project, out["mlflow_run_id"]),
    }
    create_markdown_artifact(
        key=re.sub(r"[^a-z0-9-]", "-", f"qimera-{resolved}-w{w_bits}a{a_bits}"),
        markdown=(
            f"### qimera {resolved} {w_bits}w{a_bits}a\n\n"
            f"MLflow run: `{out['mlflow_run_id']}`"
            + (f" ([open in the MLflow UI]({result['mlflow_url']}))" if result["mlflow_url"] else "")
            + f"  \nDVC experiment: `{out['dvc_experiment']}`\n\n"
            f"{metrics_table(out['metrics'])}\n"
        ),
        description="Accuracies from metrics.json and the MLflow run of this flow run",
    )
    logger.info("result: %s", json.dumps(result, default=str))
    return result


if __name__ == "__main__":  # pragma: no cover - local, serverless run: python pipelines/flow.py
    print(json.dumps(qimera_flow(), indent=2, default=str))
