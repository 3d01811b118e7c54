"""What every stage shares: the repository root, presets, the resolved config, atomic writes.

:func:`resolve_config` turns ``params.yaml`` into a validated :class:`qimera.config.Config`:
it loads the preset file and applies every non-null override. :func:`run_stage` is the
``main`` wrapper that turns input errors into one line on stderr and exit status 2.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import sys
import threading
import traceback
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import yaml

from qimera._files import atomic_write
from qimera.trainer import EPOCH_DIAGNOSTICS

PROJECT_DIR = Path(__file__).resolve().parents[1]
PARAMS_FILE = "params.yaml"
CONFIGS_DIR = "configs"

# Pipeline paths, relative to the project directory (the stage's working directory).
OUTPUTS = Path("outputs")
CONFIG_DIR = OUTPUTS / "config"
RUN_CONFIG = CONFIG_DIR / "run.yaml"
TEACHER_CONFIG = CONFIG_DIR / "teacher.yaml"
EMBEDDINGS_CONFIG = CONFIG_DIR / "embeddings.yaml"
TEACHER_DIR = OUTPUTS / "teacher"
TEACHER_WEIGHTS = TEACHER_DIR / "weights.pt"
TEACHER_RECORD = TEACHER_DIR / "teacher.json"
EMBEDDINGS = OUTPUTS / "embeddings.pt"
TRAIN_DIR = OUTPUTS / "train"
MLFLOW_RUN = TRAIN_DIR / "mlflow_run.json"
TRAIN_RECORD = TRAIN_DIR / "train.json"
HISTORY_CSV = OUTPUTS / "history.csv"
FIGURES_DIR = OUTPUTS / "figures"
EXPORT_DIR = OUTPUTS / "export"
#: files the export stage adds to the library's exports (qimera.export) in EXPORT_DIR
EXPORT_CONFIG = "config.yaml"
MODEL_CARD = "MODEL_CARD.md"
MODEL_RECORD = "model.json"
METRICS = Path("metrics.json")
#: the ladder stage's cells and report, and its metrics (stages/ladder.py)
LADDER_DIR = OUTPUTS / "ladder"
LADDER_METRICS = OUTPUTS / "ladder.json"

#: how the reports name the methods
METHOD_NAMES = {"qimera": "Qimera", "gdfq": "GDFQ", "zeroq": "ZeroQ", "naive": "naive calibration"}
#: params.yaml keys that are not config overrides
NON_CONFIG_KEYS = ("preset", "mlflow", "export", "ladder")
#: paths in the config that are read relative to the repository root
ROOT_RELATIVE_PATHS = (("teacher", "weights"), ("teacher", "cache_dir"), ("data", "path"), ("data", "root"))
#: columns of outputs/history.csv, in order
HISTORY_COLUMNS = ("epoch", "loss_g", "loss_g_ce", "loss_g_bns", "loss_s", "top1", "top5", "iters_per_second",
                   *EPOCH_DIAGNOSTICS)


class PipelineError(ValueError):
    """Bad pipeline input (params, files, MLflow store); the message says what to change."""


# --------------------------------------------------------------------------- credentials

#: a query or fragment parameter whose value is a credential (matched case-insensitively
#: anywhere in its name: token, access_token, api_key, apikey, password, client_secret,
#: sig, X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token, auth, ...)
SECRET_PARAM = re.compile(r"(?i)token|key|passw|secret|sig|credential|auth")
#: a URI inside free text (an error message of MLflow, boto3, DVC or git)
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
REDACTED = "***"


def _redact_params(text: str) -> str:
    """``a=1&token=x`` -> ``a=1&token=***``: the value of every credential parameter."""
    def one(item: str) -> str:
        name, eq, _ = item.partition("=")
        return f"{name}={REDACTED}" if eq and SECRET_PARAM.search(urllib.parse.unquote_plus(name)) else item

    return "&".join(";".join(one(i) for i in part.split(";")) for part in text.split("&"))


def redact(uri: str) -> str:
    """``uri`` as it may be printed or recorded: without ``user:password@`` and with the
    value of every credential query or fragment parameter (:data:`SECRET_PARAM`)
    replaced by ``***``; the rest is kept as written (``sqlite:////abs/path`` too).
    Anything that is not a URI comes back unchanged."""
    head, hash_, fragment = str(uri).partition("#")
    head, mark, query = head.partition("?")
    authority = re.match(r"^(?:[A-Za-z][A-Za-z0-9+.\-]*:)?//([^/]*)", head)
    if authority and "@" in authority.group(1):
        head = head[: authority.start(1)] + authority.group(1).rpartition("@")[2] + head[authority.end(1):]
    return head + mark + _redact_params(query) + hash_ + _redact_params(fragment)


#: a query parameter in free text without its URI (urllib3 quotes ``url: /path?token=…``)
_PARAM_IN_TEXT = re.compile(r"([?&;#])([^=\s?&;#'\"<>]+)=([^\s&;#'\"<>]*)")


def redact_text(text: str) -> str:
    """``text`` (an error message, a command's output) with every URI in it redacted, and
    every credential parameter (``?token=…``) of a URI quoted without its scheme."""
    text = _URI_IN_TEXT.sub(lambda m: redact(m.group(0)), str(text))
    return _PARAM_IN_TEXT.sub(lambda m: f"{m.group(1)}{m.group(2)}={REDACTED}"
                              if SECRET_PARAM.search(urllib.parse.unquote_plus(m.group(2))) else m.group(0), text)


# --------------------------------------------------------------------------- repository root


def repo_root(cwd: str | os.PathLike | None = None) -> Path:
    """The original repository root, also from inside a DVC experiment's temporary copy.

    Queued experiments run in ``<root>/.dvc/tmp/exps/<tmp>/``; DVC also sets ``DVC_ROOT``
    to the parent repository for every experiment. Outside DVC it is the project directory.
    """
    here = Path(cwd or os.getcwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    env = os.environ.get("DVC_ROOT")
    if env and (Path(env) / "dvc.yaml").is_file():
        return Path(env).resolve()
    return here if (here / "dvc.yaml").is_file() else PROJECT_DIR


# --------------------------------------------------------------------------- atomic writes


@contextmanager
def all_or_nothing(*paths: str | os.PathLike):
    """Remove the files ``paths`` when the block fails: a stage leaves all of its output
    files or none of them. Directories are never removed here (a stage publishes a
    directory with :func:`qimera._files.atomic_dir`, which leaves it as it was on failure)."""
    try:
        yield
    except BaseException:
        for p in map(Path, paths):
            if p.is_symlink() or not p.is_dir():
                p.unlink(missing_ok=True)
        raise


def require(path: str | os.PathLike, stage: str) -> Path:
    """``path``, which the stage ``stage`` writes; a :class:`PipelineError` naming both
    when it is not there."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: not found; run the {stage} stage first (dvc repro {stage})")
    return path


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(Path(path), lambda h: h.write(text), "w")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_yaml(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False, default_flow_style=None, width=100))


def torch_save(path: str | os.PathLike, obj: Any) -> None:
    import torch

    atomic_write(Path(path), lambda h: torch.save(obj, h), "wb")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def read_yaml(path: str | os.PathLike) -> Any:
    """A YAML file of the pipeline (a run config, a stage's fragment), read as every user
    YAML is read (:func:`qimera.config.safe_yaml_load`: no aliases; bad YAML is a
    :class:`PipelineError` naming the file, line and column)."""
    from qimera.config import safe_yaml_load

    return safe_yaml_load(Path(path).read_text(encoding="utf-8"), str(path), PipelineError)


# --------------------------------------------------------------------------- presets


def available_presets(root: Path) -> list[str]:
    """``configs/<name>.yaml`` and ``configs/<name>-w4a4.yaml`` give the preset ``<name>``."""
    names = set()
    for f in (root / CONFIGS_DIR).glob("*.yaml"):
        stem = f.stem
        if stem.endswith("-w4a4"):
            names.add(stem[: -len("-w4a4")])
        elif not any(stem.endswith(f"-w{b}a{b}") for b in range(2, 9)):
            names.add(stem)
    return sorted(names)


def preset_file(root: Path, preset: Any, w_bits: Any = None, a_bits: Any = None) -> Path:
    """The config file of ``preset`` at these bit widths.

    ``configs/<preset>.yaml`` when it exists (demo, cifar10-shared); otherwise the paper
    preset ``configs/<preset>-w<b>a<b>.yaml`` with ``b = w_bits = a_bits`` when that file
    exists (4 or 5), else ``configs/<preset>-w4a4.yaml`` (the bits are then overridden).
    """
    allowed = available_presets(root)
    if not isinstance(preset, str) or preset not in allowed:
        raise PipelineError(f"preset={preset!r} is not a preset; allowed: {', '.join(allowed)}")
    configs = root / CONFIGS_DIR
    single = configs / f"{preset}.yaml"
    if single.is_file():
        return single
    if w_bits is not None and w_bits == a_bits:
        matching = configs / f"{preset}-w{w_bits}a{w_bits}.yaml"
        if matching.is_file():
            return matching
    return configs / f"{preset}-w4a4.yaml"


def dvc_executable() -> str:
    """The ``dvc`` next to the running interpreter (the project's venv), else PATH's."""
    local = Path(sys.executable).with_name("dvc")
    return str(local) if local.exists() else "dvc"


def format_value(value: Any) -> str:
    """A Python value as the right-hand side of ``dvc exp run -S key=value``.

    DVC parses it with Hydra's override grammar: numbers, booleans, null and lists are
    written as JSON; plain words stay bare; any other string is single-quoted so that a
    comma or a bracket in it is not read as a sweep or a list.
    """
    if isinstance(value, str):
        if re.fullmatch(r"[\w.\-/+@]+", value):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return json.dumps(value, separators=(",", ":"))


def _merge_non_null(base: dict, overrides: dict, where: str = "") -> None:
    for key, value in overrides.items():
        if value is None:
            continue
        dotted = f"{where}{key}"
        if isinstance(value, dict):
            node = base.setdefault(key, {})
            if not isinstance(node, dict):
                raise PipelineError(f"params.yaml: {dotted} is a section but the config's {dotted} is a value")
            _merge_non_null(node, value, dotted + ".")
        else:
            base[key] = copy.deepcopy(value)


def _drop_unread_preset_keys(preset: dict, overrides: dict) -> None:
    """Where params.yaml picks another teacher source or dataset than the preset's, drop
    the preset's keys of that section which the new one does not read (the preset's
    ``data.root`` once ``data.name`` is ``npz``): the config refuses a key its source
    ignores, and a null in params.yaml means "the preset's value", so it could not unset
    them. Keys that params.yaml sets itself are kept, and refused if the source ignores them."""
    from qimera.config import unread_keys

    for section, choice_key in (("teacher", "source"), ("data", "name")):
        given, base = overrides.get(section), preset.get(section)
        if not isinstance(given, dict) or not isinstance(base, dict) or given.get(choice_key) is None:
            continue
        if given[choice_key] == base.get(choice_key):
            continue
        for key in unread_keys(section, given[choice_key], base):
            if given.get(key) is None:
                base.pop(key)


def resolve_config(params: dict, root: Path | None = None):
    """``params.yaml`` -> a validated :class:`qimera.config.Config`.

    Loads the preset file, applies every non-null value of the other params (except the
    ``mlflow`` section), names the run after the preset and points ``train.out_dir`` at
    the pipeline's ``outputs/train``. Raises :class:`PipelineError` for an unknown preset
    and :class:`qimera.config.ConfigError` (key, value, what is allowed) for invalid values.
    """
    from qimera.config import load_config, read_yaml_mapping

    root = Path(root) if root is not None else repo_root()
    if not isinstance(params, dict):
        raise PipelineError("params.yaml: top level must be a mapping")
    quant = params.get("quant") or {}
    path = preset_file(root, params.get("preset"), quant.get("w_bits"), quant.get("a_bits"))
    data = read_yaml_mapping(path, f"preset file {str(path)!r}", PipelineError)
    overrides = {k: v for k, v in params.items() if k not in NON_CONFIG_KEYS}
    _drop_unread_preset_keys(data, overrides)
    _merge_non_null(data, overrides)
    data["preset"] = params["preset"]
    data.setdefault("train", {})["out_dir"] = str(TRAIN_DIR)
    return load_config(data)


def root_relative(cfg, root: Path):
    """A copy of ``cfg`` whose relative input paths (teacher weights and cache, dataset
    path and root) are made absolute against the repository root."""
    data = cfg.model_dump(mode="json")
    for section, key in ROOT_RELATIVE_PATHS:
        value = data[section].get(key)
        if value and "://" not in value:
            path = Path(value).expanduser()
            data[section][key] = str(path if path.is_absolute() else root / path)
    return type(cfg).model_validate(data)


def check_input_files(cfg, root: Path) -> None:
    """Files the config names must exist (checked before anything runs)."""
    abs_cfg = root_relative(cfg, root)
    t, d = abs_cfg.teacher, abs_cfg.data
    if t.source == "checkpoint" and t.weights and "://" in t.weights:
        if not t.weights.startswith("s3://"):
            raise PipelineError(f"teacher.weights={t.weights!r}: allowed are a local file path or s3://bucket/key")
        from .s3 import parse_url

        parse_url(t.weights)
    elif t.source == "checkpoint" and t.weights and not Path(t.weights).is_file():
        raise PipelineError(
            f"teacher.weights={cfg.teacher.weights!r}: file not found ({t.weights}; relative paths are "
            f"relative to the repository root {root})"
        )
    if d.name == "npz" and not Path(d.path).is_file():
        raise PipelineError(f"data.path={cfg.data.path!r}: file not found ({d.path})")
    if d.name == "imagenet" and not Path(d.path).is_dir():
        raise PipelineError(
            f"data.path={cfg.data.path!r}: not a directory ({d.path}); put the ImageNet validation split "
            "there as class folders or set data.path"
        )


#: keys of the params.yaml ``export`` section and their defaults
EXPORT_DEFAULTS = {"s3_prefix": None, "verify_samples": None, "onnx_opset": 20, "latency_runs": 30, "int8_form": True}


def export_params(params: dict) -> dict:
    """The validated ``export`` section of params.yaml (defaults filled in)."""
    section = params.get("export") or {}
    if not isinstance(section, dict):
        raise PipelineError(f"export={section!r}: expected a mapping with keys {', '.join(EXPORT_DEFAULTS)}")
    unknown = sorted(set(section) - set(EXPORT_DEFAULTS))
    if unknown:
        raise PipelineError(f"export.{unknown[0]}: unknown key; allowed: {', '.join(EXPORT_DEFAULTS)}")
    out = {**EXPORT_DEFAULTS, **{k: v for k, v in section.items() if v is not None}}
    prefix = out["s3_prefix"]
    if prefix is not None:
        if not isinstance(prefix, str) or not prefix.startswith("s3://"):
            raise PipelineError(f"export.s3_prefix={prefix!r}: expected s3://bucket/prefix, or null to skip the upload")
        from .s3 import parse_url

        parse_url(prefix, key_required=False)
    n = out["verify_samples"]
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise PipelineError(f"export.verify_samples={n!r}: expected a positive integer, or null for the whole evaluation set")
    if not isinstance(out["int8_form"], bool):
        raise PipelineError(f"export.int8_form={out['int8_form']!r}: expected true (write and verify student.int8.onnx, "
                            "the integer-kernel form) or false")
    runs = out["latency_runs"]
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 0:
        raise PipelineError(f"export.latency_runs={runs!r}: expected a whole number of timed onnxruntime calls per "
                            "model and batch size (0: no latency figures)")
    opset = out["onnx_opset"]
    if isinstance(opset, bool) or not isinstance(opset, int) or not 18 <= opset <= 23:
        raise PipelineError(f"export.onnx_opset={opset!r}: expected an integer from 18 to 23 (torch's ONNX "
                            "exporter writes opset 18 or newer)")
    return out


def load_params(path: str | os.PathLike = PARAMS_FILE) -> dict:
    from qimera.config import read_yaml_mapping

    return read_yaml_mapping(path, str(path), PipelineError,
                             missing_hint="not found: run the stages from the project directory")


def load_run_config():
    """The resolved config written by the ``resolve`` stage."""
    from qimera.config import Config

    return Config.model_validate(read_yaml(require(RUN_CONFIG, "resolve")))


def bits_tag(cfg) -> str:
    return f"w{cfg.quant.w_bits}a{cfg.quant.a_bits}"


# --------------------------------------------------------------------------- teacher


def workspace_teacher(record: dict, weights: str | os.PathLike = TEACHER_WEIGHTS):
    """The ``checkpoint`` teacher (a :class:`qimera.config.TeacherConfig`) that rebuilds the
    workspace copy ``weights`` as ``teacher.json``'s ``record`` describes it, with the
    original teacher's evaluation resize and interpolation (a ``teacher.json`` written
    before they were recorded gives the checkpoint source's standard transform)."""
    from qimera.config import TeacherConfig

    return TeacherConfig(
        source="checkpoint", name=record["name"], arch=record["arch"], weights=str(weights),
        num_classes=record["num_classes"], input_size=record["input_size"], mean=record["mean"], std=record["std"],
        eval_resize=record.get("eval_resize"), eval_interpolation=record.get("eval_interpolation"),
    )


def workspace_teacher_config(cfg):
    """``cfg`` with its teacher replaced by the workspace copy (``outputs/teacher``) as a
    ``checkpoint`` teacher, and its relative dataset paths made absolute."""
    data = root_relative(cfg, repo_root()).model_dump(mode="json")
    data["teacher"] = workspace_teacher(read_json(TEACHER_RECORD)).model_dump(mode="json")
    return type(cfg).model_validate(data)


# --------------------------------------------------------------------------- checkpoints


def library_hash() -> str:
    """sha256 of the ``qimera`` package's source: a checkpoint made by other library code
    is not resumed, evaluated or exported (DVC reruns train when the library changes)."""
    import hashlib

    import qimera

    pkg = Path(qimera.__file__).parent
    digest = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        digest.update(str(f.relative_to(pkg)).encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


def teacher_sha256() -> str:
    """The sha256 of the workspace teacher's weights (their content, not their path),
    which must be the one ``teacher.json`` recorded when ``fetch_teacher`` wrote them."""
    from qimera._files import sha256_file

    record = read_json(require(TEACHER_RECORD, "fetch_teacher"))
    actual = sha256_file(require(TEACHER_WEIGHTS, "fetch_teacher"))
    if actual != record.get("sha256"):
        raise PipelineError(f"{TEACHER_WEIGHTS} has sha256 {actual[:12]}…, {TEACHER_RECORD} records "
                            f"{str(record.get('sha256'))[:12]}…: the weights were changed after fetch_teacher; "
                            "rerun it (dvc repro --force fetch_teacher)")
    return actual


def training_inputs() -> dict[str, str]:
    """What a checkpoint of the pipeline is made from beside its configuration (the
    trainer's ``extra_fingerprint``): the library's source, the workspace teacher's and the
    embedding table's sha256."""
    from qimera._files import sha256_file

    return {"library": library_hash(), "teacher_sha256": teacher_sha256(),
            "embeddings_sha256": sha256_file(require(EMBEDDINGS, "init_embeddings"))}


def checkpoint_fingerprint(cfg, teacher, inputs: dict[str, str]) -> str:
    """The fingerprint a checkpoint of ``cfg`` (paths relative to the repository root made
    absolute, :func:`root_relative`) trained from the loaded ``teacher`` (its content hash)
    and ``inputs`` (:func:`training_inputs`) carries: the trainer's own
    (:class:`qimera.trainer.Trainer`, which the train stage gives the same inputs), so that
    train, evaluate and export judge a checkpoint alike."""
    from qimera.trainer import Trainer

    return Trainer.fingerprint_of(Trainer.fingerprint_parts(cfg, teacher, inputs))


def _dotted(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for key, value in d.items():
        out.update(_dotted(value, f"{prefix}{key}."))
    return out


def _config_difference(trained: Any, wanted: dict) -> str:
    """The first keys in which the checkpoint's config differs from the one asked for."""
    from qimera.trainer import RESUME_MAY_CHANGE

    a, b = _dotted(trained if isinstance(trained, dict) else {}), _dotted(wanted)
    ignored = tuple(RESUME_MAY_CHANGE)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and not any(k == i or k.startswith(i + ".") for i in ignored)]
    if not keys:
        return "the same configuration, so the teacher's weights, the embedding table or the library changed since"
    shown = "; ".join(f"{k}: {a.get(k)!r} in the checkpoint, {b.get(k)!r} in {RUN_CONFIG}" for k in keys[:3])
    return shown + (f"; and {len(keys) - 3} more" if len(keys) > 3 else "")


def trained_checkpoint(cfg, teacher, root: Path) -> dict:
    """The train stage's final checkpoint for the resolved config ``cfg``, checked before
    anything uses it: there, readable as tensors only (``weights_only=True``), carrying the
    fingerprint of ``cfg`` and of this workspace's teacher, embedding table and library
    (:func:`checkpoint_fingerprint`), and finished (``train.epochs`` epochs; 0 for a
    calibration-only method). Anything else is a :class:`PipelineError`."""
    from qimera.baselines import CALIBRATION_METHODS
    from qimera.trainer import CHECKPOINT_NAME, read_checkpoint

    path = require(TRAIN_DIR / CHECKPOINT_NAME, "train")
    rerun = "rerun train (dvc repro --force train)"
    try:
        state = read_checkpoint(TRAIN_DIR)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: one line, whatever torch says
        raise PipelineError(f"{path} is not a readable qimera checkpoint ({type(exc).__name__}); {rerun}") from None
    if not isinstance(state, dict) or not {"epoch", "student"} <= set(state):
        raise PipelineError(f"{path} is not a qimera checkpoint (no epoch and student weights); {rerun}")
    root_cfg = root_relative(cfg, root)
    if state.get("fingerprint") != checkpoint_fingerprint(root_cfg, teacher, training_inputs()):
        why = ("it carries no fingerprint" if state.get("fingerprint") is None
               else _config_difference(state.get("config"), root_cfg.resolved()))
        raise PipelineError(f"{path} was not trained from {RUN_CONFIG} with this workspace's teacher, embedding "
                            f"table and library ({why}); {rerun}")
    epochs = 0 if cfg.method in CALIBRATION_METHODS else cfg.train.epochs
    if int(state["epoch"]) != epochs:
        raise PipelineError(f"{path} holds epoch {int(state['epoch'])} of train.epochs={epochs}: training did not "
                            "finish; rerun train to complete it (dvc repro train)")
    return state


# --------------------------------------------------------------------------- entry point


def input_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input: ours and the library's
    (:func:`qimera.errors.input_errors`, which consults only imported modules)."""
    from qimera.errors import input_errors as library_errors

    return (PipelineError, *library_errors())


def run_stage(name: str, main: Callable[[], None]) -> None:
    """Run a stage's ``main``; every ending but success is one line on stderr and a status.

    Bad input: status 2. Ctrl-C: 130. SIGTERM and SIGHUP raise KeyboardInterrupt in the
    stage (so that it closes its MLflow run as KILLED; later signals are ignored while it
    does) and exit with 128 + the signal (143, 129). The MLflow tracking server that
    stops answering mid-stage, memory that cannot be had or a full disk
    (:func:`qimera.runtime.machine_fault`): one line, status 1. Anything else: its
    traceback and status 1.
    """
    received: list[int] = []

    def on_signal(signum, frame):  # noqa: ARG001
        if not received:
            received.append(signum)
            raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in filter(None, (signal.SIGTERM, getattr(signal, "SIGHUP", None))):  # no SIGHUP on Windows
            previous[sig] = signal.signal(sig, on_signal)
    try:
        main()
    except KeyboardInterrupt:
        if received:
            print(f"qimera stage {name}: stopped by {signal.Signals(received[0]).name}; rerun to continue",
                  file=sys.stderr, flush=True)
            sys.exit(128 + received[0])
        print(f"qimera stage {name}: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - bad input: one line; anything else: the traceback
        if isinstance(exc, input_errors()):
            print(f"qimera stage {name}: error: {exc}", file=sys.stderr, flush=True)
            sys.exit(2)
        tracking = sys.modules.get(f"{__package__}.tracking")
        runtime = sys.modules.get("qimera.runtime")
        fault = ((tracking.outage_message(exc, name) if tracking is not None else None)
                 or (runtime.machine_fault(exc) if runtime is not None else None))
        if fault:  # a fault of the machine (server gone, memory, disk): one line, status 1
            print(f"qimera stage {name}: error: {fault}", file=sys.stderr, flush=True)
            sys.exit(1)
        traceback.print_exc()
        sys.exit(1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
