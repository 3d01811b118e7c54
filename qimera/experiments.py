"""Experiments: a grid of ordinary runs ("cells") from one YAML file, run, resumed and
reported in the layout of the paper's tables. The file format is in experiments/README.md.

:func:`load_experiment` validates the file and every cell's config before anything runs;
:func:`run_experiment` runs the cells that are not finished (each one ``qimera run`` in its
own process, ``jobs`` at a time); :func:`report` writes ``report.md``, ``report.csv`` and
``report.png`` from the cells' ``summary.json``.

Stopping: each cell runs in its own process group. SIGTERM or Ctrl-C to the runner is
passed on to the running cells (:func:`stop_cells`), which stop as ``qimera run`` does
(the checkpoint of their last finished epoch stays, ``cell.json`` says "stopped"); no new
cell starts, and the runner exits once they have. A rerun resumes them. A runner killed
outright takes its cells with it (:func:`qimera.runtime.stop_with_parent`).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ._files import atomic_write
from .config import Config, ConfigError, load_config, parse_override, probe_out_dir, quoted, read_yaml_mapping, shorten
from .runtime import PARENT_PID_ENV, signal_of, stop_group
from .trainer import FAKE_QUANT_KEY, HISTORY_NAME

RUNS_DIR = Path("runs")
CELL_CONFIG = "config.yaml"
CELL_RECORD = "cell.json"
SUMMARY = "summary.json"
Method = Literal["qimera", "gdfq", "zeroq", "naive"]
#: the note every report carries (SPEC §5.4)
FINAL_EPOCH_NOTE = ("The paper reports the best test accuracy over all epochs (the checkpoint is selected on the "
                    "test set, SPEC §5.4); this project reports the final epoch's, so the paper's numbers are an "
                    "optimistic reference.")


class ExperimentError(ValueError):
    """An experiment file is invalid; the message names the file, the key and the value."""


#: at most this many cells per experiment (methods × bits × axis values × seeds, over the
#: grids): a file or ``--seeds`` that asks for more is refused before any cell is built
MAX_CELLS = 10_000
#: ``--seeds N`` runs seeds 1..N, N at most this; a file lists at most this many seeds
MAX_SEEDS = 1000
#: the keys every cell sets itself, and where an experiment says them instead: a ``--set``,
#: ``set`` or ``axes`` entry naming one would be overwritten by the cell (or would run
#: other settings than the cell's name says), so it is refused
CELL_KEYS = {
    "method": "list the methods in the grid's methods",
    "quant.w_bits": "list the bit widths in the grid's bits (4 for 4w4a, or '2w4a')",
    "quant.a_bits": "list the bit widths in the grid's bits (4 for 4w4a, or '2w4a')",
    "train.seed": "list the seeds in the file's seeds, or give --seeds N (seeds 1..N)",
    "train.out_dir": "cells run in runs/<experiment name>/<cell id>; another name puts them elsewhere",
    "train.progress": "cells always run without a progress bar (their output goes to files)",
}


def _cell_key(key: str, value: Any) -> str | None:
    """The :data:`CELL_KEYS` entry that setting ``key`` to ``value`` would set (also inside
    a whole section, ``quant={w_bits: 2}``), or None."""
    if key in CELL_KEYS:
        return key
    if isinstance(value, dict):
        for sub, inner in value.items():
            found = _cell_key(f"{key}.{sub}", inner)
            if found:
                return found
    return None


def _refuse_cell_key(key: str, value: Any, prefix: str) -> None:
    found = _cell_key(key, value)
    if found:
        raise ExperimentError(f"{prefix}{found} is set by each cell itself: {CELL_KEYS[found]}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class GridSpec(_Strict):
    label: str
    config: str
    methods: list[Method] = Field(default_factory=lambda: ["qimera"], min_length=1)
    #: bit widths: ``4`` (4w4a) or ``"2w4a"`` (weights 2, activations 4); read as (w, a) pairs
    bits: list[int | str] = Field(default_factory=lambda: [4], min_length=1, validate_default=True)
    set: dict[str, Any] = Field(default_factory=dict)
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    row: str = "{label} {bits}"
    column: str = "{method}"

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: list[int | str]) -> list[tuple[int, int]]:
        pairs = []
        for item in v:
            m = re.fullmatch(r"(\d+)w(\d+)a", item) if isinstance(item, str) else None
            if isinstance(item, int) and not isinstance(item, bool):
                pairs.append((item, item))
            elif m:
                pairs.append((int(m.group(1)), int(m.group(2))))
            else:
                raise ValueError(f"bits entry {item!r}: give a number (4 means 4w4a) or a string such as '2w4a'")
        return pairs

    @field_validator("axes")
    @classmethod
    def _axes(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not values:
                raise ValueError(f"axis {key!r} is empty: give at least one value")
        return v


class ExperimentSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    title: str = ""
    seeds: list[int] = Field(default_factory=lambda: [1], min_length=1, max_length=MAX_SEEDS)
    set: dict[str, Any] = Field(default_factory=dict)
    grids: list[GridSpec] = Field(min_length=1)
    paper: dict[str, dict[str, float]] = Field(default_factory=dict)
    #: paired comparisons: ``[treatment, baseline]``, two columns (or two rows) of the
    #: table; the report gives ``treatment − baseline`` per seed for every entry they share
    compare: list[list[str]] = Field(default_factory=list)
    plot: Literal["lines", "heatmap", "none"] = "lines"

    @field_validator("compare")
    @classmethod
    def _compare(cls, v: list[list[str]]) -> list[list[str]]:
        for pair in v:
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ValueError(f"compare entry {pair!r}: give two different names, [treatment, baseline]")
        return v


@dataclass
class Cell:
    """One run of the grid."""

    id: str
    grid: str
    method: str
    w_bits: int
    a_bits: int
    seed: int
    values: dict[str, Any]  #: the axis values of this cell
    row: str
    column: str
    cfg: Config
    base_budget: tuple[int, int, int]  #: (epochs, iterations, batch) of the grid's base config
    base_config: Path  #: the grid's base config file at this bit width
    #: what the cell sets on top of ``base_config``, in the order applied (method, bits, the
    #: file's and the grid's ``set``, the axis values, ``--set``, the seed): the same run
    #: elsewhere (a DVC experiment) is ``base_config`` plus these
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.out_dir)

    @property
    def bits(self) -> str:
        """The bit widths as the paper writes them: ``4w4a``."""
        return f"{self.w_bits}w{self.a_bits}a"

    @property
    def key(self) -> str:
        """``<id>-<first 8 hex of the config's fingerprint>``: the cell in this very
        configuration, where the id alone would name the cell under any ``--set``
        (a DVC experiment's name, a cell's place in S3)."""
        return f"{self.id}-{self.cfg.fingerprint()[:8]}"

    @property
    def budget(self) -> tuple[int, int, int]:
        t = self.cfg.train
        return t.epochs, t.iters_per_epoch, t.batch_size


@dataclass
class Experiment:
    spec: ExperimentSpec
    path: Path
    cells: list[Cell] = field(default_factory=list)
    #: where the experiment's directory is made (``<runs_dir>/<name>/``)
    runs_dir: Path = RUNS_DIR

    @property
    def dir(self) -> Path:
        return Path(self.runs_dir) / self.spec.name


# --------------------------------------------------------------------------- loading


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"


def _render(template: str, values: dict[str, Any], where: str) -> str:
    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in values:
            raise ExperimentError(f"{where}: {{{key}}} names nothing the cell has; known: {', '.join(sorted(values))}")
        return str(values[key])

    return re.sub(r"\{([^{}]+)\}", sub, template)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")


def load_experiment(path: str | os.PathLike, *, seeds: int | None = None, overrides: tuple[str, ...] = (),
                    runs_dir: str | os.PathLike = RUNS_DIR) -> Experiment:
    """Read and validate an experiment file; every cell's config is resolved and checked.

    ``seeds``: run seeds ``1..seeds`` instead of the file's. ``overrides``: extra
    ``section.key=value`` settings for every cell (after the file's ``set``). ``runs_dir``:
    where ``<name>/<cell>/`` go (default ``runs``).
    """
    path = Path(path)
    data = read_yaml_mapping(path, f"experiment file {str(path)!r}", ExperimentError)
    try:
        spec = ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ExperimentError(f"{path}: {shorten(loc)}={quoted(first.get('input'))}: {first['msg']}") from None
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= MAX_SEEDS):
        raise ExperimentError(f"--seeds {quoted(seeds)}: expected a whole number N from 1 to {MAX_SEEDS} "
                              "(seeds 1..N)")
    for key, value in _parsed(overrides).items():  # a malformed --set fails here, before any cell
        _refuse_cell_key(key, value, "--set ")
    seed_list = list(range(1, seeds + 1)) if seeds else spec.seeds
    for key, value in spec.set.items():
        _refuse_cell_key(key, value, f"{path}: set: ")
    total = sum(len(grid.methods) * len(grid.bits) * math.prod(len(v) for v in grid.axes.values())
                for grid in spec.grids) * len(seed_list)
    if total > MAX_CELLS:
        raise ExperimentError(f"{path}: {total} cells (methods × bits × axis values × {len(seed_list)} seeds, over "
                              f"the grids): at most {MAX_CELLS} per experiment; split it into several files")
    exp = Experiment(spec, path, runs_dir=Path(runs_dir))
    for g, grid in enumerate(spec.grids):
        where = f"{path}: grids[{g}] ({shorten(grid.label)})"
        for key in [*spec.set, *grid.set, *grid.axes]:
            if not _is_config_key(key):
                raise ExperimentError(f"{where}: {quoted(key)} is not a config key (configs/README.md lists them)")
        for what, keys in (("set", grid.set), ("axes", grid.axes)):
            for key in keys:
                _refuse_cell_key(key, None, f"{where}: {what}: ")
        for method, bits in itertools.product(grid.methods, grid.bits):
            w, a = bits
            if "{bits}" in grid.config and w != a:
                raise ExperimentError(f"{where}: bits {w}w{a}a: config {grid.config!r} names {{bits}}, which needs "
                                      "equal weight and activation bits; give a config file without {bits}")
            cfg_path = Path(grid.config.replace("{bits}", str(w)))
            base = read_yaml_mapping(cfg_path, f"{where}: config {str(cfg_path)!r}", ExperimentError)
            try:
                base_cfg = load_config(base, [_override("quant.w_bits", w), _override("quant.a_bits", a)])
            except ConfigError as exc:
                raise ExperimentError(f"{where}: config {str(cfg_path)!r}: {exc}") from None
            base_budget = (base_cfg.train.epochs, base_cfg.train.iters_per_epoch, base_cfg.train.batch_size)
            axis_keys = list(grid.axes)
            for combo in itertools.product(*(grid.axes[k] for k in axis_keys)):
                values = dict(zip(axis_keys, combo))
                for seed in seed_list:
                    exp.cells.append(_cell(exp, grid, where, cfg_path, base, base_budget, method, bits, seed, values,
                                           overrides))
    seen: dict[str, str] = {}  # fingerprint -> cell id
    ids: set[str] = set()  # a set, not seen.values(): the check stays linear in the cells
    for cell in exp.cells:
        fp = cell.cfg.fingerprint(ignore=("train.out_dir",))
        if cell.id in ids or fp in seen:
            other = seen.get(fp, cell.id)
            raise ExperimentError(f"{path}: cells {other!r} and {cell.id!r} resolve to the same run; give them "
                                  "different settings or remove one")
        seen[fp] = cell.id
        ids.add(cell.id)
    entries = {(c.row, c.column) for c in exp.cells}
    _check_compare(exp, entries)
    for row, columns in spec.paper.items():
        for column in columns:
            if (row, column) not in entries:
                raise ExperimentError(f"{path}: paper[{row!r}][{column!r}] matches no table entry; rows are "
                                      f"{sorted({r for r, _ in entries})}, columns {sorted({c for _, c in entries})}")
    return exp


def _check_compare(exp: Experiment, entries: set[tuple[str, str]]) -> None:
    """Each ``compare`` pair names two columns or two rows, and within an entry every seed
    is one cell (else "the same seed" would not say which cells to pair)."""
    rows, columns = {r for r, _ in entries}, {c for _, c in entries}
    for pair in exp.spec.compare:
        if not (set(pair) <= columns or set(pair) <= rows):
            raise ExperimentError(f"{exp.path}: compare {pair!r}: name two columns ({sorted(columns)}) or two rows "
                                  f"({sorted(rows)}) of the table")
    if exp.spec.compare:
        seen: dict[tuple[str, str, int], str] = {}
        for cell in exp.cells:
            key = (cell.row, cell.column, cell.seed)
            if key in seen:
                raise ExperimentError(f"{exp.path}: compare: cells {seen[key]!r} and {cell.id!r} are the same entry "
                                      f"({cell.row!r}, {cell.column!r}) at the same seed; give their row or column "
                                      "the axis that tells them apart")
            seen[key] = cell.id


def _cell(exp: Experiment, grid: GridSpec, where: str, cfg_path: Path, base: dict, base_budget, method: str,
          bits: tuple[int, int], seed: int, values: dict[str, Any], overrides: tuple[str, ...]) -> Cell:
    w, a = bits
    settings = {**exp.spec.set, **grid.set, **values}
    labels = {"label": grid.label, "method": method, "bits": f"{w}w{a}a", "seed": seed, **settings}
    row = _render(grid.row, labels, f"{where}: row")
    column = _render(grid.column, labels, f"{where}: column")
    parts = [grid.label, method, f"w{w}a{a}", *(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in values.items()),
             f"seed{seed}"]
    cell_id = _slug("-".join(str(p) for p in parts))
    applied = {"method": method, "quant.w_bits": w, "quant.a_bits": a, **settings,
               **_parsed(overrides), "train.seed": seed}
    items = [_override(k, v) for k, v in applied.items()]
    items += [_override("train.out_dir", str(exp.dir / cell_id)), _override("train.progress", False)]
    try:
        cfg = load_config(base, items)
    except ConfigError as exc:
        text = str(exc).removeprefix("invalid configuration: ")
        raise ExperimentError(f"{where}: cell {shorten(cell_id)}: {text}") from None
    return Cell(cell_id, grid.label, method, w, a, seed, values, row, column, cfg, base_budget, cfg_path, applied)


def _parsed(overrides: tuple[str, ...]) -> dict[str, Any]:
    """``--set`` strings as ``{"section.key": value}``."""
    out = {}
    for item in overrides:
        path, value = parse_override(item)
        out[".".join(path)] = value
    return out


def _is_config_key(dotted: str) -> bool:
    """``section.key`` of the run config (or a top-level key such as ``method``)."""
    section, _, key = dotted.partition(".")
    field_ = Config.model_fields.get(section)
    if field_ is None:
        return False
    fields = getattr(field_.annotation, "model_fields", None)
    return (not key and fields is None) or (bool(key) and fields is not None and key in fields)


# --------------------------------------------------------------------------- running


def cell_record(cell: Cell) -> dict | None:
    """The cell's ``cell.json`` (its outcome: status, fingerprint, ...), or None."""
    try:
        return json.loads((cell.out_dir / CELL_RECORD).read_text())
    except (OSError, ValueError):
        return None


def is_done(cell: Cell) -> bool:
    """A cell is finished when its record says so for this very configuration."""
    rec = cell_record(cell)
    return bool(rec and rec.get("status") == "done" and rec.get("fingerprint") == cell.cfg.fingerprint()
                and (cell.out_dir / SUMMARY).is_file())


@dataclass
class Progress:
    total: int
    done: int = 0
    failed: int = 0
    running: int = 0
    start: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def line(self) -> str:
        left = self.total - self.done - self.failed - self.running
        secs = int(time.monotonic() - self.start)
        return (f"[{self.done} done, {self.running} running, {self.failed} failed, {left} left; "
                f"{secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d}]")


def record_cell(cell: Cell, status: str, summary: dict | None = None, **details: Any) -> dict:
    """Write the cell's result: ``summary.json`` (when given) and then ``cell.json``, which
    says ``status`` ("done", "failed") for this very configuration (its fingerprint) and
    how it ran (``details``: exit status, error, DVC experiment, ...). Whoever ran the cell
    (this module, a Prefect worker, a DVC experiment) records it so; the report reads
    only these files."""
    cell.out_dir.mkdir(parents=True, exist_ok=True)
    if summary is not None:
        atomic_write(cell.out_dir / SUMMARY, lambda h: h.write(json.dumps(summary, indent=2) + "\n"), "w")
    record = {"cell": cell.id, "status": status, "fingerprint": cell.cfg.fingerprint(), **details}
    atomic_write(cell.out_dir / CELL_RECORD, lambda h: h.write(json.dumps(record, indent=2) + "\n"), "w")
    return record


def cell_top1(cell: Cell) -> float | None:
    """The finished cell's final-epoch student top-1 (None if not finished or not finite)."""
    if not is_done(cell):
        return None
    top1 = json.loads((cell.out_dir / SUMMARY).read_text()).get("student_top1")
    return float(top1) if isinstance(top1, (int, float)) and math.isfinite(top1) else None


#: seconds a cell that was passed a stop signal has to exit before it is killed
STOP_GRACE_SECONDS = 20
_cells_lock = threading.Lock()
#: the cells' processes running now, in this process (any thread)
_cells: set[subprocess.Popen] = set()
#: the signal the running cells were passed (no new cell starts meanwhile), else empty
_stopping: list[int] = []


def _end(proc: subprocess.Popen, signum: int) -> None:
    """Pass ``signum`` to the cell's process group and wait for it to exit (SIGKILL after
    :data:`STOP_GRACE_SECONDS`)."""
    stop_group(proc, ((signum, STOP_GRACE_SECONDS),))


def stop_cells(signum: int = signal.SIGTERM) -> int:
    """Pass ``signum`` to every cell running in this process (their ``qimera run`` stops
    as on Ctrl-C or SIGTERM: the last finished epoch's checkpoint stays) and start no new
    one until :func:`run_experiment` returns; returns how many were running. The cells'
    own threads wait for them and record them as "stopped"."""
    with _cells_lock:
        if not _stopping:
            _stopping.append(signum)
        running = [p for p in _cells if p.poll() is None]
    for proc in running:
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass
    return len(running)


def _wait_cells(timeout: float) -> None:
    """Wait for the cells :func:`stop_cells` stopped; SIGKILL what is left after ``timeout``."""
    deadline = time.monotonic() + timeout
    with _cells_lock:
        running = list(_cells)
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _end(proc, signal.SIGKILL)


def run_cell(cell: Cell, *, threads: int | None = None, env: dict[str, str] | None = None) -> dict | None:
    """Run one cell as ``qimera run`` on its resolved config (``config.yaml`` in its
    directory) in a child process, which resumes from the cell's checkpoint if one is
    there; record and return the outcome (``cell.json``'s content). ``threads`` sets
    ``OMP_NUM_THREADS`` for the child unless the environment already does; ``env`` adds
    variables for the child (e.g. ``QIMERA_EPOCH_HOOK``, :data:`qimera.api.EPOCH_HOOK_ENV`).

    The child runs in its own process group. When this call is interrupted (Ctrl-C, or
    SIGTERM raised as KeyboardInterrupt in this thread) the signal is passed on to it, the
    cell is recorded as "stopped" once it has exited, and the interruption goes on. Returns
    None without starting anything while :func:`stop_cells` is stopping the cells."""
    cell.out_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = cell.out_dir / CELL_CONFIG
    text = yaml.safe_dump(cell.cfg.model_dump(mode="json"), sort_keys=False)
    atomic_write(cfg_file, lambda h: h.write(text), "w")
    env = {**os.environ, **(env or {}), PARENT_PID_ENV: str(os.getpid())}
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    command = [sys.executable, "-m", "qimera.cli", "run", str(cfg_file)]
    with tempfile.TemporaryFile() as stderr:
        with _cells_lock:
            if _stopping:
                return None
            proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                                    start_new_session=True)
            _cells.add(proc)
        interrupted: BaseException | None = None
        try:
            proc.wait()
        except BaseException as exc:  # noqa: BLE001 - passed on to the cell, then raised again
            interrupted = exc
            _end(proc, signal_of(exc) if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM)
        finally:
            with _cells_lock:
                _cells.discard(proc)
        stderr.seek(0)
        lines = stderr.read().decode(errors="replace").strip().splitlines()
    error = (lines or [""])[-1][:2000]
    if proc.returncode == 0 and (cell.out_dir / SUMMARY).is_file():
        record = record_cell(cell, "done", returncode=0)
    elif interrupted is not None or _stopping:
        record = record_cell(cell, "stopped", returncode=proc.returncode, error=error)
    else:
        record = record_cell(cell, "failed", returncode=proc.returncode, error=error)
    if interrupted is not None:
        raise interrupted
    return record


def _run_tracked(cell: Cell, progress: Progress, threads: int, log) -> bool | None:
    with progress.lock:
        progress.running += 1
        log(f"{progress.line()} {cell.id}: started")
    try:
        record = run_cell(cell, threads=threads)
    finally:
        with progress.lock:
            progress.running -= 1
    if record is None:  # the experiment is being stopped: the cell did not start
        return None
    ok = record["status"] == "done"
    with progress.lock:
        if ok:
            progress.done += 1
            log(f"{progress.line()} {cell.id}: top-1 {cell_top1(cell)}")
        elif record["status"] == "stopped":
            log(f"{progress.line()} {cell.id}: stopped (exit {record['returncode']}); a rerun resumes it")
        else:
            progress.failed += 1
            log(f"{progress.line()} {cell.id}: FAILED (exit {record['returncode']}): {record['error']}")
    return ok


def check_experiment_dir(exp: Experiment) -> None:
    """Refuse an experiment whose directory (``runs/<name>``) cannot be created or written
    (``runs`` a plain file, a read-only disk) with one line, before any cell runs;
    leaves nothing behind."""
    try:
        probe_out_dir(exp.dir, "its runs directory")
    except ConfigError as exc:
        raise ExperimentError(f"{exp.path}: {exc}") from None


def select_grids(exp: Experiment, labels: Sequence[str]) -> list[Cell]:
    """The cells of the grids labelled ``labels`` (all cells when empty); an unknown label
    is an :class:`ExperimentError` that lists the file's labels."""
    known = [g.label for g in exp.spec.grids]
    for label in labels:
        if label not in known:
            raise ExperimentError(f"--grid {quoted(label)}: {exp.path} has no grid of that label; its grids are "
                                  + ", ".join(quoted(k) for k in known))
    return [c for c in exp.cells if not labels or c.grid in labels]


def run_experiment(exp: Experiment, *, jobs: int = 1, grids: Sequence[str] = (), log=None) -> dict[str, int]:
    """Run every cell that is not finished, ``jobs`` at a time; returns the counts
    ``{"skipped", "done", "failed"}``. ``grids``: run only the grids of these labels
    (:func:`select_grids`); the report still covers every finished cell. A failed cell
    does not stop the others. An interruption of the calling thread (Ctrl-C, SIGTERM as
    KeyboardInterrupt) is passed on to the running cells (:func:`stop_cells`); once they
    have exited it goes on."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    check_experiment_dir(exp)
    cells = select_grids(exp, grids)
    todo = [c for c in cells if not is_done(c)]
    skipped = len(cells) - len(todo)
    progress = Progress(total=len(cells), done=skipped)
    of = f" (grids {', '.join(quoted(g) for g in grids)})" if grids else ""
    log(f"experiment {exp.spec.name}{of}: {len(cells)} cells, {skipped} finished already, {len(todo)} to run, "
        f"{jobs} at a time")
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        futures = [pool.submit(_run_tracked, c, progress, threads, log) for c in todo]
        results = [f.result() for f in futures]
    except BaseException as exc:
        signum = signal_of(exc) if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM
        running = stop_cells(signum)
        log(f"experiment {exp.spec.name}: stopping ({signal.Signals(signum).name}): passed on to {running} running "
            "cell(s), starting no more; a rerun resumes them")
        pool.shutdown(wait=False, cancel_futures=True)
        _wait_cells(STOP_GRACE_SECONDS)
        raise
    finally:
        pool.shutdown(wait=True)
        with _cells_lock:
            _stopping.clear()
    failed = results.count(False)
    return {"skipped": skipped, "done": len(results) - failed, "failed": failed}


# --------------------------------------------------------------------------- the report


def cell_history(cell: Cell) -> list[dict]:
    """The finished cell's per-epoch records (``history.jsonl``; empty for the calibration
    methods, or when the file is missing)."""
    try:
        lines = (cell.out_dir / HISTORY_NAME).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            return []
    return out


def best_epoch_gap(cell: Cell, final: float) -> float | None:
    """``final − best`` top-1 over the cell's epochs (≤ 0), or None without a history. The
    best epoch is chosen on the test data, so this is a note on stability, not a result."""
    scores = [r["top1"] for r in cell_history(cell) if isinstance(r.get("top1"), (int, float))
              and math.isfinite(r["top1"])]
    return final - max(scores) if scores else None


@dataclass
class Entry:
    row: str
    column: str
    values: list[float]
    reduced: bool
    budgets: set[tuple[int, int, int]]
    paper: Optional[float]
    #: the final-epoch top-1 of each finished seed
    by_seed: dict[int, float] = field(default_factory=dict)
    #: each finished seed's final − best-epoch top-1 (seeds with a history)
    gaps: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else (0.0 if self.values else None)


def collect(exp: Experiment) -> list[Entry]:
    """The table entries (cells grouped over seeds), in the order the file defines them."""
    entries: dict[tuple[str, str], Entry] = {}
    for cell in exp.cells:
        key = (cell.row, cell.column)
        entry = entries.setdefault(key, Entry(cell.row, cell.column, [], False, set(),
                                              exp.spec.paper.get(cell.row, {}).get(cell.column)))
        entry.budgets.add(cell.budget)
        entry.reduced |= cell.budget != cell.base_budget
        top1 = cell_top1(cell)
        if top1 is not None:
            entry.values.append(top1)
            entry.by_seed[cell.seed] = top1
            gap = best_epoch_gap(cell, top1)
            if gap is not None:
                entry.gaps.append(gap)
    return list(entries.values())


@dataclass
class Paired:
    """``treatment − baseline`` at the same seed, for one entry of the other axis."""

    treatment: str
    baseline: str
    entry: str  #: the row (when the pair names columns) or the column they share
    diffs: dict[int, float]  #: seed -> difference

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.diffs.values()) if self.diffs else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.diffs.values()) if len(self.diffs) > 1 else (0.0 if self.diffs else None)

    @property
    def wins(self) -> int:
        return sum(d > 0 for d in self.diffs.values())

    def text(self) -> str:
        if not self.diffs:
            return "–"
        per_seed = ", ".join(f"{d:+.2f} (seed {s})" for s, d in sorted(self.diffs.items()))
        return (f"{per_seed}; mean {self.mean:+.2f} ± {self.std:.2f}; ahead at {self.wins} of {len(self.diffs)} seeds")


def paired(exp: Experiment, entries: list[Entry] | None = None) -> list[Paired]:
    """The file's ``compare`` pairs, per entry of the other axis, over the seeds both have."""
    entries = collect(exp) if entries is None else entries
    table = {(e.row, e.column): e for e in entries}
    rows = list(dict.fromkeys(e.row for e in entries))
    columns = list(dict.fromkeys(e.column for e in entries))
    out = []
    for treatment, baseline in exp.spec.compare:
        along_columns = treatment in columns and baseline in columns
        for other in (rows if along_columns else columns):
            key_t, key_b = ((other, treatment), (other, baseline)) if along_columns else \
                ((treatment, other), (baseline, other))
            if key_t not in table or key_b not in table:
                continue
            t, b = table[key_t].by_seed, table[key_b].by_seed
            out.append(Paired(treatment, baseline, other, {s: t[s] - b[s] for s in sorted(set(t) & set(b))}))
    return out


def _fmt(entry: Entry) -> str:
    if not entry.values:
        text = "–"
    else:
        text = f"{entry.mean:.2f} ± {entry.std:.2f} (N={len(entry.values)})"
    if entry.reduced and entry.values:
        text += " †"
    if entry.paper is not None:
        diff = "" if entry.mean is None else f", Δ {entry.mean - entry.paper:+.2f}"
        text += f" · paper {entry.paper:.2f}{diff}"
    return text


def report(exp: Experiment) -> dict[str, Path]:
    """Write report.md, report.csv (and report.png when matplotlib is there) into the
    experiment's directory; returns their paths."""
    entries = collect(exp)
    rows = list(dict.fromkeys(e.row for e in entries))
    columns = list(dict.fromkeys(e.column for e in entries))
    table = {(e.row, e.column): e for e in entries}
    budgets = sorted({b for e in entries for b in e.budgets})
    bases = sorted({c.base_budget for c in exp.cells})
    seeds = sorted({c.seed for c in exp.cells})
    lines = [f"# {exp.spec.title or exp.spec.name}", "",
             f"Experiment `{exp.path}`: {len(exp.cells)} cells, seeds {seeds}. Entries: final-epoch student "
             "top-1 (%), mean ± std over the seeds (N finished), the paper's number and the difference.", "",
             "Budget (epochs × iterations × batch): " + ", ".join(f"{e} × {i} × {b}" for e, i, b in budgets)
             + "; the base configs': " + ", ".join(f"{e} × {i} × {b}" for e, i, b in bases) + ".",
             "† run at another budget than its base config (for the paper presets: the paper's schedule).", "",
             FINAL_EPOCH_NOTE, "",
             "| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(_fmt(table[(row, c)]) if (row, c) in table else "" for c in columns)
                     + " |")
    pairs = paired(exp, entries)
    if pairs:
        lines += ["", "## Paired differences (same seed)", "",
                  "Treatment − baseline, final-epoch top-1 points, for each seed both finished; then the mean ± std "
                  "of those differences and at how many seeds the treatment is ahead.", "",
                  "| comparison | entry | difference per seed |", "|---|---|---|"]
        lines += [f"| {p.treatment} − {p.baseline} | {p.entry} | {p.text()} |" for p in pairs]
    diagnostics = _final_diagnostics(exp)
    if diagnostics:
        names = [k for k in DIAGNOSTIC_COLUMNS if any(k in d for d in diagnostics.values())]
        lines += ["", "## Diagnostics of the generated samples at the final epoch (mean over the seeds)", "",
                  "The generator's cross-entropy on the teacher (`loss_g_ce`); how often the teacher's top class is "
                  "the intended one on plain and on superposed batches (%, a superposed sample's intended class is "
                  "its largest soft label); the teacher's mean largest probability; the mean largest soft label.", "",
                  "| row | column | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
        for (row, column), values in diagnostics.items():
            lines.append(f"| {row} | {column} | " + " | ".join(
                f"{values[k]:.3f}" if k in values else "–" for k in names) + " |")
    recipe_cost = _fake_quant_pairs(exp)
    if recipe_cost:
        lines += ["", "## The integer-exact recipe against the fake-quant arithmetic (same weights)", "",
                  "For integer-exact students (`quant.integer_exact: true`), whose top-1 above is the deployed int8 "
                  "file's: that top-1 − the top-1 of the same final weights in the paper's fake-quant arithmetic, "
                  "per seed.", "", "| entry | fake-quant top-1 | difference per seed |", "|---|---|---|"]
        for (row, column), diffs in recipe_cost.items():
            fq = [f for _, f in diffs.values()]
            spread = f" ± {statistics.stdev(fq):.2f}" if len(fq) > 1 else ""
            per = [d for d, _ in diffs.values()]
            lines.append(f"| {row} / {column} | {statistics.fmean(fq):.2f}{spread} | "
                         + ", ".join(f"{d:+.2f}" for d in per) + f": {_mean_std(per)} |")
    if any(e.gaps for e in entries):
        lines += ["", "## Final epoch against best epoch (a note)", "",
                  "Final − best-epoch top-1, mean ± std over the seeds: how much a run loses between its best epoch "
                  "and its last. The best epoch is chosen on the test data, so it is never the result.", "",
                  "| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for row in rows:
            lines.append(f"| {row} | " + " | ".join(_fmt_gap(table.get((row, c))) for c in columns) + " |")
    out = exp.dir
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "report.md", "csv": out / "report.csv"}
    md = "\n".join(lines) + "\n"
    atomic_write(paths["md"], lambda h: h.write(md), "w")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["row", "column", "n", "mean_top1", "std_top1", "paper_top1", "difference", "reduced_budget",
                     "values", "seeds", "mean_final_minus_best"])
    for e in entries:
        writer.writerow([e.row, e.column, len(e.values), _num(e.mean), _num(e.std), _num(e.paper),
                         _num(None if e.mean is None or e.paper is None else e.mean - e.paper), e.reduced,
                         " ".join(f"{v:.4f}" for v in e.values), " ".join(str(s) for s in e.by_seed),
                         _num(statistics.fmean(e.gaps) if e.gaps else None)])
    atomic_write(paths["csv"], lambda h: h.write(buf.getvalue()), "w")
    if pairs:
        paths["pairs"] = out / "report-pairs.csv"
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["treatment", "baseline", "entry", "seed", "difference"])
        for p in pairs:
            for seed, d in p.diffs.items():
                writer.writerow([p.treatment, p.baseline, p.entry, seed, f"{d:.4f}"])
        atomic_write(paths["pairs"], lambda h: h.write(buf.getvalue()), "w")
    png = _plot(exp, rows, columns, table, out / "report.png")
    if png is not None:
        paths["png"] = png
    return paths


def _mean_std(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:+.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:+.2f}"


def _fake_quant_pairs(exp: Experiment) -> dict[tuple[str, str], dict[int, tuple[float, float]]]:
    """Per table entry and seed, ``(top1 − top1_fake_quant, top1_fake_quant)`` at the final
    epoch, for the cells whose history has the fake-quant top-1 (integer-exact students)."""

    out: dict[tuple[str, str], dict[int, tuple[float, float]]] = {}
    for cell in exp.cells:
        history = [r for r in cell_history(cell) if "top1" in r]
        if cell_top1(cell) is None or not history or not isinstance(history[-1].get(FAKE_QUANT_KEY), (int, float)):
            continue
        last = history[-1]
        out.setdefault((cell.row, cell.column), {})[cell.seed] = (last["top1"] - last[FAKE_QUANT_KEY],
                                                                   last[FAKE_QUANT_KEY])
    return out


#: the per-epoch values :func:`report` summarises at the final epoch (where the cells' histories have them)
DIAGNOSTIC_COLUMNS = ("loss_g_ce", "teacher_agree_plain", "teacher_agree_superposed", "teacher_max_prob",
                      "label_max")


def _final_diagnostics(exp: Experiment) -> dict[tuple[str, str], dict[str, float]]:
    """Per table entry, the mean over its finished seeds of each diagnostic at the final
    epoch (entries whose histories have none are left out)."""
    values: dict[tuple[str, str], dict[str, list[float]]] = {}
    for cell in exp.cells:
        if cell_top1(cell) is None:
            continue
        history = cell_history(cell)
        last = history[-1] if history else {}
        found = {k: float(last[k]) for k in DIAGNOSTIC_COLUMNS if isinstance(last.get(k), (int, float))}
        if "teacher_max_prob" not in found:  # a history from before the diagnostics existed
            continue
        entry = values.setdefault((cell.row, cell.column), {})
        for k, v in found.items():
            entry.setdefault(k, []).append(v)
    return {key: {k: statistics.fmean(v) for k, v in d.items()} for key, d in values.items()}


def _fmt_gap(entry: Entry | None) -> str:
    if entry is None or not entry.gaps:
        return "–" if entry is not None else ""
    std = statistics.stdev(entry.gaps) if len(entry.gaps) > 1 else 0.0
    return f"{statistics.fmean(entry.gaps):+.2f} ± {std:.2f}"


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def _plot(exp: Experiment, rows, columns, table, path: Path) -> Path | None:
    if exp.spec.plot == "none":
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(columns) + 2), 4 + 0.3 * len(rows) * (exp.spec.plot == "heatmap")))
    if exp.spec.plot == "heatmap":
        import numpy as np

        grid = np.array([[table[(r, c)].mean if (r, c) in table and table[(r, c)].mean is not None else np.nan
                          for c in columns] for r in rows], dtype=float)
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        for i, j in itertools.product(range(len(rows)), range(len(columns))):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=ax, label="final-epoch top-1 (%)")
    else:
        for r in rows:
            xs = [i for i, c in enumerate(columns) if (r, c) in table and table[(r, c)].values]
            ys = [table[(r, columns[i])].mean for i in xs]
            errs = [table[(r, columns[i])].std for i in xs]
            line = ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=r)
            paper = [(i, table[(r, c)].paper) for i, c in enumerate(columns) if (r, c) in table and table[(r, c)].paper]
            if paper:
                ax.plot([p[0] for p in paper], [p[1] for p in paper], ls="--", marker="x",
                        color=line[0].get_color(), alpha=0.7)
        ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
        has_paper = any(e.paper is not None for e in table.values())
        ax.set_ylabel("final-epoch top-1 (%)" + ("  (dashed: paper)" if has_paper else ""))
        ax.legend(fontsize=7)
    import textwrap

    ax.set_title("\n".join(textwrap.wrap(exp.spec.title or exp.spec.name, 70)), fontsize=9)
    fig.tight_layout()
    with path.open("wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
    return path
