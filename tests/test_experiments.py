"""Experiments: a grid of runs from one file, resumable, reported like the paper's tables."""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qimera.experiments import ExperimentError, load_experiment, report, run_experiment, select_grids

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tiny_config, tmp_path, monkeypatch) -> Path:
    """A directory to run experiments from, holding the tiny config as base.yaml."""
    base = dict(tiny_config)
    base["train"] = {**base["train"], "epochs": 1, "iters_per_epoch": 2}
    base["naive"] = {"enabled": False}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _experiment(workdir: Path, name: str = "tiny", **extra) -> Path:
    spec = {"name": name, "title": "tiny grid", "seeds": [1, 2],
            "grids": [{"label": "digits", "config": "base.yaml", "methods": ["qimera"], "bits": [4],
                       "axes": {"generator.p": [0.25, 0.75]}, "row": "{label} {bits}", "column": "p={generator.p}"}],
            "paper": {"digits 4w4a": {"p=0.25": 50.0}}, "plot": "lines", **extra}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _quiet(line: str) -> None:
    pass


@pytest.mark.slow
def test_grid_runs_resumes_and_reports_the_cells(workdir):
    exp = load_experiment(_experiment(workdir))
    assert len(exp.cells) == 4 and {c.out_dir.parent for c in exp.cells} == {Path("runs/tiny")}
    assert run_experiment(exp, jobs=1, log=_quiet) == {"skipped": 0, "done": 4, "failed": 0}
    paths = report(exp)
    rows = {(r["row"], r["column"]): r for r in csv.DictReader(paths["csv"].open())}
    for column in ("p=0.25", "p=0.75"):
        tops = [json.loads((c.out_dir / "summary.json").read_text())["student_top1"]
                for c in exp.cells if c.column == column]
        entry = rows[("digits 4w4a", column)]
        assert int(entry["n"]) == 2 and float(entry["mean_top1"]) == pytest.approx(statistics.fmean(tops), abs=1e-4)
        assert entry["reduced_budget"] == "False"  # the cells run the base config's own budget
    assert float(rows[("digits 4w4a", "p=0.25")]["paper_top1"]) == 50.0
    md = paths["md"].read_text()
    assert "| digits 4w4a |" in md and "paper 50.00, Δ" in md and "final epoch" in md and "1 × 2 × 16" in md
    assert paths["png"].stat().st_size > 1000
    # a rerun runs nothing
    assert run_experiment(load_experiment(_experiment(workdir)), log=_quiet) == {"skipped": 4, "done": 0, "failed": 0}
    # --jobs 2 gives the same numbers as --jobs 1
    twin = load_experiment(_experiment(workdir, "twin"))
    assert run_experiment(twin, jobs=2, log=_quiet)["done"] == 4
    for a, b in zip(exp.cells, twin.cells):
        sa, sb = (json.loads((c.out_dir / "summary.json").read_text()) for c in (a, b))
        assert sa["student_top1"] == sb["student_top1"] and sa["naive_top1"] == sb["naive_top1"]


def test_grid_selection_runs_the_named_grids_only(workdir):
    second = {"label": "digits p0", "config": "base.yaml", "methods": ["gdfq"], "bits": [4], "row": "{label}",
              "column": "{method}"}
    first = {**json.loads(json.dumps(second)), "label": "digits", "methods": ["qimera"]}
    path = _experiment(workdir, "two", grids=[first, second], paper={})
    exp = load_experiment(path)
    assert [c.grid for c in select_grids(exp, ["digits p0"])] == ["digits p0", "digits p0"]
    assert len(select_grids(exp, [])) == len(exp.cells) == 4
    with pytest.raises(ExperimentError, match=r"--grid 'digit'.*its grids are 'digits', 'digits p0'"):
        select_grids(exp, ["digit"])
    with pytest.raises(ExperimentError, match="no grid of that label"):
        run_experiment(exp, grids=["nope"], log=_quiet)  # before any cell starts
    assert not (workdir / "runs" / "two").exists() or not any((workdir / "runs" / "two").iterdir())


@pytest.mark.slow
def test_killed_experiment_reruns_only_the_missing_cells(workdir):
    path = _experiment(workdir, "killed")
    proc = subprocess.Popen([sys.executable, "-m", "qimera.cli", "experiment", "run", str(path)], cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    records = workdir / "runs" / "killed"
    deadline = time.monotonic() + 180
    while not list(records.glob("*/cell.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    finished = len(list(records.glob("*/cell.json")))
    assert 1 <= finished < 4
    counts = run_experiment(load_experiment(path), log=_quiet)
    assert counts == {"skipped": finished, "done": 4 - finished, "failed": 0}


def _cell_processes(marker: str) -> list[int]:
    """The pids of the processes whose command line holds ``marker`` (a cell's config path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.mark.slow
def test_sigterm_to_the_runner_stops_its_cells_and_a_rerun_resumes_them(workdir):
    """Issue 21 item 8: SIGTERM to the parent alone (what a scheduler sends) reaches the
    running cell, which checkpoints and stops; the runner exits 143 within seconds, the cell
    is recorded as stopped, no process of it is left, and a rerun resumes it."""
    base = yaml.safe_load((workdir / "base.yaml").read_text())
    base["train"] = {**base["train"], "epochs": 3, "iters_per_epoch": 40, "lr_milestones": [2]}
    (workdir / "long.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "stopped", "title": "stop", "seeds": [1],
            "grids": [{"label": "d", "config": "long.yaml", "methods": ["qimera"], "bits": [4]}]}
    path = workdir / "stopped.yaml"
    path.write_text(yaml.safe_dump(spec))
    cell = load_experiment(path).cells[0]
    proc = subprocess.Popen([sys.executable, "-m", "qimera.cli", "experiment", "run", str(path)], cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (cell.out_dir / "checkpoint.pt").exists():  # the first epoch is checkpointed
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)  # the runner only, not its group
        start = time.monotonic()
        err = proc.communicate(timeout=60)[1]
        assert time.monotonic() - start < 30
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err
    assert "stopping (SIGTERM)" in err and "rerun the same command to resume" in err, err
    record = json.loads((cell.out_dir / "cell.json").read_text())
    assert record["status"] == "stopped", record
    assert _cell_processes(str(cell.out_dir / "config.yaml")) == []
    before = [json.loads(line) for line in (cell.out_dir / "history.jsonl").read_text().splitlines()]
    assert 1 <= len(before) < 3
    assert run_experiment(load_experiment(path), log=_quiet) == {"skipped": 0, "done": 1, "failed": 0}
    after = [json.loads(line) for line in (cell.out_dir / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in after] == [1, 2, 3] and after[: len(before)] == before  # resumed, not redone


def test_bad_experiment_files_fail_before_any_cell(workdir):
    cases = [
        ({"colour": "red"}, "colour"),
        ({"grids": [{"label": "x", "config": "base.yaml", "axes": {"generator.pp": [1]}}]},
         "'generator.pp' is not a config key"),
        ({"grids": [{"label": "x", "config": "base.yaml", "axes": {"generator.p": []}}]}, "axis 'generator.p' is empty"),
        ({"grids": [{"label": "x", "config": "base.yaml", "axes": {"generator.p": [1.5]}}]},
         "generator.p=1.5: Input should be less than or equal to 1"),
        ({"grids": [{"label": "x", "config": "base.yaml", "axes": {"generator.p": [0.5, 0.5]}}]},
         "resolve to the same run"),
        ({"grids": [{"label": "x", "config": "missing.yaml"}]}, "config 'missing.yaml' does not exist"),
        ({"paper": {"digits 4w4a": {"p=0.3": 1.0}}}, r"paper\['digits 4w4a'\]\['p=0.3'\] matches no table entry"),
        ({"grids": [{"label": "x", "config": "base.yaml", "column": "{generator.q}"}]}, "{generator.q} names nothing"),
        ({"grids": [{"label": "x", "config": "base.yaml", "bits": ["2x4"]}]}, "bits entry '2x4'"),
        ({"grids": [{"label": "x", "config": "base-{bits}.yaml", "bits": ["2w4a"]}]}, r"bits 2w4a: .*names \{bits\}"),
    ]
    for extra, message in cases:
        path = _experiment(workdir, "bad", **extra)
        with pytest.raises(ExperimentError, match=message) as info:
            load_experiment(path)
        assert str(path) in str(info.value)
    assert not (workdir / "runs").exists()
    with pytest.raises(Exception, match="expected section.key=value"):
        load_experiment(_experiment(workdir), overrides=("train.epochs",))


def test_bits_may_differ_for_weights_and_activations(workdir):
    grids = [{"label": "x", "config": "base.yaml", "methods": ["naive"], "bits": [3, "2w4a"], "row": "{bits}",
              "column": "{method}"}]
    exp = load_experiment(_experiment(workdir, "pairs", grids=grids, paper={}))
    got = {(c.cfg.quant.w_bits, c.cfg.quant.a_bits, c.row, c.id.split("-")[2]) for c in exp.cells}
    assert got == {(3, 3, "3w3a", "w3a3"), (2, 4, "2w4a", "w2a4")}


def test_cli_reports_bad_experiments_in_one_line(workdir):
    path = _experiment(workdir, "bad", grids=[{"label": "x", "config": "base.yaml", "axes": {"generator.pp": [1]}}])
    res = subprocess.run([sys.executable, "-m", "qimera.cli", "experiment", "run", str(path)], cwd=workdir,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0 and "not a config key" in res.stderr


@pytest.mark.parametrize("name", ["demo-grid", "demo-ladder", "demo-ladder-budget", "demo-ablation", "demo-superposition",
                                  "demo-additions", "shared-additions", "shared-budget", "shared-evidence", "shared-explore",
                                  "shared-integer-exact", "main", "table6", "table7",
                                  "table8", "table9", "table10", "shared-dm"])
def test_shipped_experiments_validate(name, monkeypatch):
    path = REPO / "experiments" / f"{name}.yaml"
    if not path.is_file():
        pytest.skip(f"{path} not written yet")
    monkeypatch.chdir(REPO)
    exp = load_experiment(path)
    assert exp.cells and all(c.cfg.train.out_dir.startswith(f"runs/{name}/") for c in exp.cells)


def _fake_finished(cell, top1: float, history: list[float]) -> None:
    """Record a cell as finished with a given final top-1 and per-epoch top-1s (no training)."""
    from qimera.experiments import record_cell

    cell.out_dir.mkdir(parents=True, exist_ok=True)
    diag = {"loss_g_ce": 0.5, "teacher_agree_plain": 90.0, "teacher_max_prob": 0.8, "label_max": 1.0}
    (cell.out_dir / "history.jsonl").write_text("".join(json.dumps({"epoch": i + 1, "top1": v, **diag}) + "\n"
                                                        for i, v in enumerate(history)))
    record_cell(cell, "done", {"student_top1": top1})


def test_report_gives_paired_differences_per_seed_and_the_final_against_best_gap(workdir):
    """compare: [treatment, baseline] names two columns; the report gives treatment − baseline
    at each seed, their mean ± std and the wins, and per entry final − best epoch (issue 20)."""
    spec = {"name": "pairs", "seeds": [1, 2, 3],
            "grids": [{"label": "d", "config": "base.yaml", "methods": ["gdfq", "qimera"], "bits": [4, "2w4a"],
                       "row": "{bits}", "column": "{method}"}],
            "compare": [["qimera", "gdfq"]]}
    path = workdir / "pairs.yaml"
    path.write_text(yaml.safe_dump(spec))
    exp = load_experiment(path)
    finals = {("gdfq", 1): 90.0, ("gdfq", 2): 92.0, ("gdfq", 3): 91.0,
              ("qimera", 1): 91.5, ("qimera", 2): 91.0, ("qimera", 3): 93.0}
    for cell in exp.cells:
        if cell.bits == "2w4a" and cell.seed == 3:
            continue  # unfinished: pairs use only the seeds both have
        top1 = finals[(cell.method, cell.seed)] - (0 if cell.bits == "4w4a" else 10)
        _fake_finished(cell, top1, [top1 - 1.0, top1 + 2.5, top1])
    paths = report(exp)
    md = paths["md"].read_text()
    assert ("| qimera − gdfq | 4w4a | +1.50 (seed 1), -1.00 (seed 2), +2.00 (seed 3); mean +0.83 ± 1.61; "
            "ahead at 2 of 3 seeds |") in md
    assert "| qimera − gdfq | 2w4a | +1.50 (seed 1), -1.00 (seed 2); mean +0.25 ± 1.77; ahead at 1 of 2 seeds |" in md
    assert "| 4w4a | qimera | 0.500 | 90.000 | 0.800 | 1.000 |" in md  # no superposed column: no such batches
    assert "## Final epoch against best epoch" in md and "| 4w4a | -2.50 ± 0.00 | -2.50 ± 0.00 |" in md
    rows = list(csv.DictReader(paths["pairs"].open()))
    assert [(r["entry"], r["seed"], float(r["difference"])) for r in rows][:3] == [
        ("4w4a", "1", 1.5), ("4w4a", "2", -1.0), ("4w4a", "3", 2.0)]
    entry = next(csv.DictReader(paths["csv"].open()))
    assert entry["seeds"] == "1 2 3" and float(entry["mean_final_minus_best"]) == -2.5


def test_report_sets_an_integer_exact_students_top1_beside_its_fake_quant_one(workdir):
    """Issue 23: cells whose histories carry top1_fake_quant (integer-exact students) get
    the int8 file's top-1 − the fake-quant top-1 of the same weights, per seed."""
    spec = {"name": "exact", "seeds": [1, 2],
            "grids": [{"label": "d", "config": "base.yaml", "methods": ["qimera"], "bits": [4],
                       "row": "{bits}", "column": "{method}"}]}
    path = workdir / "exact.yaml"
    path.write_text(yaml.safe_dump(spec))
    exp = load_experiment(path)
    for cell, (exact, fake) in zip(exp.cells, [(90.0, 90.5), (91.0, 90.75)]):
        _fake_finished(cell, exact, [exact - 1.0, exact])
        lines = (cell.out_dir / "history.jsonl").read_text().splitlines()
        last = {**json.loads(lines[-1]), "top1_fake_quant": fake}
        (cell.out_dir / "history.jsonl").write_text("\n".join(lines[:-1] + [json.dumps(last)]) + "\n")
    md = report(exp)["md"].read_text()
    assert "## The integer-exact recipe against the fake-quant arithmetic (same weights)" in md
    assert "| 4w4a / qimera | 90.62 ± 0.18 | -0.50, +0.25: -0.12 ± 0.53 |" in md
    plain = load_experiment(_experiment(workdir, "plain"))
    assert "integer-exact" not in report(plain)["md"].read_text()


def test_compare_names_must_be_two_columns_or_two_rows(workdir):
    for compare, needle in (([["qimera", "gdfq"]], "name two columns"), ([["p=0.25", "p=0.25"]], "two different"),
                            ([["p=0.25"]], "two different")):
        with pytest.raises(ExperimentError, match=needle):
            load_experiment(_experiment(workdir, "bad", compare=compare))
    assert load_experiment(_experiment(workdir, "ok", compare=[["p=0.75", "p=0.25"]])).spec.compare


def test_keys_the_cells_set_themselves_are_refused(workdir):
    """Issue 21: `--set method=gdfq --set quant.w_bits=2 --set train.seed=7` ran GDFQ at 2w4a
    filed as `…-qimera-w4a4-seed1` and dropped the seed. Now each is one line naming the key
    and where to say it instead; the file's own set and axes likewise."""
    path = _experiment(workdir)
    for item, needle in (("method=gdfq", "--set method is set by each cell itself: list the methods in the grid's"),
                         ("quant.w_bits=2", "--set quant.w_bits is set by each cell itself: list the bit widths"),
                         ("quant.a_bits=2", "--set quant.a_bits is set"),
                         ("train.seed=7", "--set train.seed is set by each cell itself: list the seeds in the file's "
                                          "seeds, or give --seeds N"),
                         ("train.out_dir=elsewhere", "--set train.out_dir is set by each cell itself"),
                         ("quant={w_bits: 2, a_bits: 4}", "--set quant.w_bits is set"),
                         ("train={seed: 3}", "--set train.seed is set")):
        with pytest.raises(ExperimentError) as info:
            load_experiment(path, overrides=(item,))
        assert needle in str(info.value) and "\n" not in str(info.value), (item, str(info.value))
    grid = {"label": "x", "config": "base.yaml"}
    for extra, needle in (({"set": {"method": "gdfq"}}, ": set: method is set by each cell itself"),
                          ({"grids": [{**grid, "set": {"quant.w_bits": 2}}]}, "grids[0] (x): set: quant.w_bits is set"),
                          ({"grids": [{**grid, "axes": {"train.seed": [1, 2]}}]}, "grids[0] (x): axes: train.seed is set"),
                          ({"grids": [{**grid, "axes": {"method": ["gdfq"]}}]}, "axes: method is set")):
        with pytest.raises(ExperimentError) as info:
            load_experiment(_experiment(workdir, "bad", **extra))
        assert needle in str(info.value) and str(workdir / "bad.yaml") in str(info.value)
    assert not (workdir / "runs").exists()
    assert load_experiment(path, overrides=("train.epochs=1", "naive.enabled=false")).cells  # others still apply


def test_seeds_and_cells_are_bounded(workdir):
    from qimera.experiments import MAX_CELLS, MAX_SEEDS

    path = _experiment(workdir)
    for seeds in (0, MAX_SEEDS + 1, 10**9):
        with pytest.raises(ExperimentError, match=rf"--seeds {seeds}: expected a whole number N from 1 to {MAX_SEEDS}"):
            load_experiment(path, seeds=seeds)
    with pytest.raises(ExperimentError, match=rf"seeds=.*at most {MAX_SEEDS} items"):
        load_experiment(_experiment(workdir, "many", seeds=list(range(MAX_SEEDS + 1))))
    start = time.monotonic()  # refused before any cell is built: no 10,001 config validations
    grids = [{"label": "x", "config": "base.yaml", "axes": {"generator.noise_scale": [1 + i / 1e4 for i in range(5001)]}}]
    with pytest.raises(ExperimentError, match=rf"10002 cells .*: at most {MAX_CELLS} per experiment"):
        load_experiment(_experiment(workdir, "huge", grids=grids, paper={}))
    assert time.monotonic() - start < 5


def test_experiment_errors_quote_a_short_excerpt(workdir):
    """Issue 21: a 5 MB file without a name was echoed whole in the error line."""
    path = workdir / "big.yaml"
    path.write_text(yaml.safe_dump({"title": "t" * 5_000_000, "grids": [{"label": "x", "config": "base.yaml"}]}))
    with pytest.raises(ExperimentError) as info:
        load_experiment(path)
    assert "name" in str(info.value) and "…" in str(info.value) and len(str(info.value)) < 500
    with pytest.raises(ExperimentError) as info:
        load_experiment(_experiment(workdir, "label", grids=[{"label": "L" * 100_000, "config": "base.yaml",
                                                               "axes": {"generator.p": [1.5]}}], paper={}))
    assert "generator.p=1.5" in str(info.value) and len(str(info.value)) < 500


def test_experiment_files_refuse_yaml_aliases(workdir):
    path = workdir / "alias.yaml"
    path.write_text("name: alias\nseeds: &s [1, 2]\ngrids:\n  - {label: x, config: base.yaml}\npaper: {a: *s}\n")
    with pytest.raises(ExperimentError, match=r"alias.yaml' is not valid YAML: alias \*s refused .* at line 5, column"):
        load_experiment(path)
