"""Issue 21 item 10: a hostile sweep kept in the repository. Every case feeds bad input to
the CLI (in process) or the library and asserts its exit status, ONE bounded line of error
naming what is wrong, and that no user file was lost or half-written output left behind."""

from __future__ import annotations

import pytest
import yaml

from qimera import cli

MAX_LINE = 600


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert len(lines[0]) <= MAX_LINE, lines[0][:200]
    return lines[0]


def _write(tmp_path, config: dict, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


# (override, fragment the one line must name)
SET_CASES = [
    ("train.epochs=-1", "train.epochs"), ("train.epochs=0", "train.epochs"), ("train.epochs=abc", "train.epochs"),
    ("train.epochs=1e400", "train.epochs"), ("train.epochs=[1, 2]", "train.epochs"),
    ("train.epochs={a: 1}", "train.epochs"), ("train.epochs=true", "train.epochs"),
    ("train.iters_per_epoch=0", "train.iters_per_epoch"), ("train.iters_per_epoch=-5", "train.iters_per_epoch"),
    ("train.batch_size=0", "train.batch_size"), ("train.batch_size=x", "train.batch_size"),
    ("train.lr_student=-1", "train.lr_student"), ("train.lr_student=nan", "train.lr_student"),
    ("train.lr_student=.inf", "train.lr_student"), ("train.lr_generator=abc", "train.lr_generator"),
    ("train.seed=-1", "train.seed"), ("train.seed=99999999999999999999999", "train.seed"),
    ("train.seed=1.5", "train.seed"), ("train.nosuchkey=1", "nosuchkey"),
    ("nosuchsection.key=1", "nosuchsection"), ("train..epochs=1", "train..epochs"),
    (".epochs=1", ".epochs"), ("train.=1", "train."), ("=1", "="), ("train.epochs", "train.epochs"),
    ("train", "train"), ("quant.w_bits=0", "quant.w_bits"), ("quant.w_bits=99", "quant.w_bits"),
    ("quant.w_bits=four", "quant.w_bits"), ("quant.a_bits=-4", "quant.a_bits"),
    ("generator.k=0", "generator.k"), ("generator.k=1", "generator.k"), ("generator.p=2", "generator.p"),
    ("generator.p=-0.1", "generator.p"), ("generator.p=abc", "generator.p"),
    ("generator.dm_layers=-1", "generator.dm_layers"), ("generator.embedding_init=bogus", "embedding_init"),
    ("generator.noise_scale=-1", "generator.noise_scale"), ("generator.variant=bogus", "generator.variant"),
    ("method=bogus", "method"), ("method=[qimera]", "method"), ("data.batch_size=0", "data.batch_size"),
    ("data.name=bogus", "data.name"), ("data.limit=-3", "data.limit"),
    ("train.lr_milestones=abc", "train.lr_milestones"), ("train.lr_milestones=[-1]", "train.lr_milestones"),
    ("train.warmup_epochs=-1", "train.warmup_epochs"), ("train.calibration_epochs=-1", "calibration_epochs"),
    ("train.device=quantum", "train.device"), ("teacher.source=bogus", "teacher.source"),
    ("teacher.num_classes=0", "teacher.num_classes"), ("teacher.num_classes=-10", "teacher.num_classes"),
    ("teacher.nosuchkey=1", "nosuchkey"), ("naive.batches=-1", "naive.batches"),
    ("train.epochs=" + "9" * 5000, "train.epochs"), ("train.out_dir=" + "x" * 10 + "\0", "out_dir"),
    ("train.epochs=&a", "train.epochs"), ("train.epochs=*a", "train.epochs"),
    ("train.epochs=[" * 200, "train.epochs"), ("train.epochs=!!python/object:os.system x", "train.epochs"),
]


@pytest.mark.parametrize("override,fragment", SET_CASES, ids=[(c.values if hasattr(c, "values") else c)[0][:40] for c in SET_CASES])
def test_check_refuses_a_bad_set_value_in_one_line(capsys, tiny_config, tmp_path, override, fragment):
    tiny_config["train"]["out_dir"] = str(tmp_path / "out")
    rc = cli.main(["check", str(_write(tmp_path, tiny_config)), "--set", override])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2, line
    assert line.startswith("qimera: error:") and fragment[:40] in line, line
    assert not (tmp_path / "out").exists()


YAML_CASES = [
    ("empty", "", None), ("list", "- 1\n- 2\n", None), ("scalar", "42\n", None),
    ("bad_syntax", "train: {epochs: [\n", None), ("tab_indent", "train:\n\tepochs: 1\n", None),
    ("binary", "\x00\x01\x02\xff", None), ("deep", "a: " + "[" * 5000 + "]" * 5000 + "\n", None),
    ("billion_laughs", "a: &a [1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b]\n"
     "d: &d [*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d]\nf: [*e,*e,*e,*e,*e,*e,*e,*e]\n", None),
    ("python_tag", "method: !!python/object/apply:os.system ['true']\n", None),
    ("unknown_top", "method: qimera\nbogus_section: {a: 1}\n", "bogus_section"),
    ("section_not_map", "method: qimera\ntrain: 5\n", "train"),
    ("huge_key", "method: qimera\n" + "k" * 100000 + ": 1\n", None),
]


@pytest.mark.parametrize("name,text,fragment", YAML_CASES, ids=[c[0] for c in YAML_CASES])
def test_check_refuses_a_hostile_yaml_file_in_one_line(capsys, tmp_path, name, text, fragment):
    path = tmp_path / "hostile.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text)
    rc = cli.main(["check", str(path)])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2, line
    if fragment:
        assert fragment in line, line


@pytest.mark.parametrize("path", ["/nonexistent/x.yaml", "", ".", "/dev/null"], ids=["missing", "empty", "dir", "devnull"])
def test_check_refuses_a_config_path_that_is_no_file(capsys, path):
    rc = cli.main(["check", path])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2, line


ARG_CASES = [
    ["run"], ["check"], ["bogus"], ["experiment"], ["experiment", "bogus", "x"],
    ["experiment", "run", "experiments/demo-grid.yaml", "--seeds", "0"],
    ["experiment", "run", "experiments/demo-grid.yaml", "--seeds", "-1"],
    ["experiment", "run", "experiments/demo-grid.yaml", "--seeds", "abc"],
    ["experiment", "run", "experiments/demo-grid.yaml", "--seeds", "1001"],
    ["experiment", "run", "experiments/demo-grid.yaml", "--jobs", "0"],
    ["experiment", "report", "experiments/demo-grid.yaml", "--seeds", "0"],
    ["experiment", "run", "/nonexistent.yaml"], ["experiment", "report", "/nonexistent.yaml"],
    ["figure"], ["figure", "bogus", "x"], ["figure", "pca", "/nonexistent"],
    ["figure", "samples", "/nonexistent"], ["figure", "pca", "x", "--samples", "0"],
    ["figure", "pca", "x", "--samples", "4097"], ["figure", "samples", "x", "--per-class", "65"],
    ["figure", "samples", "x", "--per-class", "0"], ["figure", "pca", "x", "--seed", "abc"],
]


@pytest.mark.parametrize("argv", ARG_CASES, ids=[" ".join(a)[:50] for a in ARG_CASES])
def test_bad_command_lines_exit_2_in_one_line(capsys, argv):
    try:
        rc = cli.main(argv)
    except SystemExit as exc:
        rc = exc.code
    line = _one_line(capsys.readouterr().err)
    assert rc == 2, line
    assert line.startswith("qimera"), line


def test_bad_experiment_files_exit_2(capsys, tmp_path):
    cases = ["", "name: x\n", "name: x\ngrids: 5\n", "name: x\nseeds: [-1]\ngrids: []\n", "- a\n",
             "name: " + "y" * 100000 + "\n"]
    for i, text in enumerate(cases):
        path = tmp_path / f"e{i}.yaml"
        path.write_text(text)
        rc = cli.main(["experiment", "report", str(path)])
        line = _one_line(capsys.readouterr().err)
        assert rc == 2, (text[:40], line)


def _garbage(run_dir):
    (run_dir / "checkpoint.pt").write_bytes(b"\x00garbage\xff" * 10)


def _truncated(run_dir):
    import torch
    import io
    buf = io.BytesIO()
    torch.save({"epoch": 1, "student": {}}, buf)
    (run_dir / "checkpoint.pt").write_bytes(buf.getvalue()[:20])


def _empty(run_dir):
    (run_dir / "checkpoint.pt").write_bytes(b"")


def _dir(run_dir):
    (run_dir / "checkpoint.pt").mkdir()


@pytest.mark.parametrize("make", [_garbage, _truncated, _empty, _dir], ids=["garbage", "truncated", "empty", "dir"])
@pytest.mark.parametrize("figure", ["pca", "samples"])
def test_figure_refuses_a_bad_checkpoint_and_keeps_user_files(capsys, tmp_path, make, figure):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    make(run_dir)
    rc = cli.main(["figure", figure, str(run_dir), "--device", "cpu"])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2, line
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert not (run_dir / "figures").exists() or not any((run_dir / "figures").iterdir())


@pytest.mark.parametrize("make", [_garbage, _truncated, _empty], ids=["garbage", "truncated", "empty"])
def test_run_refuses_to_resume_a_bad_checkpoint_and_keeps_it(capsys, tiny_config, tmp_path, make):
    out = tmp_path / "out"
    out.mkdir()
    make(out)
    before = (out / "checkpoint.pt").read_bytes()
    (out / "notes.txt").write_text("mine")
    tiny_config["train"]["out_dir"] = str(out)
    rc = cli.main(["run", str(_write(tmp_path, tiny_config))])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2, line
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "checkpoint.pt").read_bytes() == before


def test_run_into_an_out_dir_that_is_a_file_keeps_the_file(capsys, tiny_config, tmp_path):
    f = tmp_path / "afile"
    f.write_text("mine")
    tiny_config["train"]["out_dir"] = str(f)
    rc = cli.main(["run", str(_write(tmp_path, tiny_config))])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2, line
    assert f.read_text() == "mine"


SECRETS = [
    "https://user:hunter2secret@host/x", "http://host/?token=hunter2secret", "s3://b/k?X-Amz-Signature=hunter2secret",
    "http://host/?a=1&password=hunter2secret", "http://host/#access_token=hunter2secret",
    "http://host/?api_key=hunter2secret&x=1", "sqlite:///p?secret=hunter2secret",
    "https://u:hunter2secret@[::1]:5000/p", "http://host/?Credential=hunter2secret",
    "http://host/?auth=hunter2secret", "postgresql://u:hunter2secret@db/x?sslmode=require",
    "http://host/?sig=hunter2secret;b=2",
]


@pytest.mark.parametrize("uri", SECRETS)
def test_redact_removes_every_credential(uri):
    from stages.common import redact, redact_text
    assert "hunter2secret" not in redact(uri)
    assert "hunter2secret" not in redact_text(f"connection to {uri} failed: refused")


@pytest.mark.parametrize("text", ["failed: url: /api?token=hunter2secret", "GET /x?password=hunter2secret&y=1"])
def test_redact_text_removes_bare_parameters(text):
    from stages.common import redact_text
    assert "hunter2secret" not in redact_text(text)


# ------------------------------------------------------ issue 21 items 1-4, 8, 9: more cases


@pytest.fixture(scope="module")
def calibrated_student():
    import torch

    from qimera.models.digits_cnn import DigitsCNN
    from qimera.baselines import calibrate
    from qimera.quant import QuantRecipe, quantize_model

    torch.manual_seed(0)
    student, _ = quantize_model(DigitsCNN(10).eval(), QuantRecipe(4, 4))
    calibrate(student, [torch.randn(8, 1, 8, 8)])
    return student


def _foreign_dir(tmp_path):
    dest = tmp_path / "thesis"
    (dest / "sub").mkdir(parents=True)
    (dest / "thesis.txt").write_text("mine")
    (dest / "sub" / "data.csv").write_text("1,2")
    return dest


def _a_file(tmp_path):
    dest = tmp_path / "afile"
    dest.write_text("mine")
    return dest


def _a_link(tmp_path):
    target = _foreign_dir(tmp_path)
    (tmp_path / "link").symlink_to(target)
    return tmp_path / "link"


def _the_cwd(tmp_path):
    (tmp_path / "thesis.txt").write_text("mine")
    return tmp_path


def _a_parent_of_the_cwd(tmp_path):
    (tmp_path / "inner").mkdir()
    (tmp_path / "thesis.txt").write_text("mine")
    return tmp_path


def _snapshot(root):
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() and not p.is_symlink() else None)
                  for p in root.rglob("*"))


DEST_CASES = [_foreign_dir, _a_file, _a_link, _the_cwd, _a_parent_of_the_cwd]


@pytest.mark.parametrize("make", DEST_CASES, ids=[f.__name__.strip("_") for f in DEST_CASES])
@pytest.mark.parametrize("writer", ["export_integer", "export_deployables"])
def test_the_python_api_never_replaces_what_it_did_not_write(calibrated_student, tmp_path, monkeypatch, make, writer):
    """Item 1: a foreign directory, a file, a link, the working directory or a folder that
    holds it is refused in one line (OutputDirError) before any work, and kept as it was."""
    from qimera import export
    from qimera._files import OutputDirError

    dest = make(tmp_path)
    monkeypatch.chdir(tmp_path / "inner" if (tmp_path / "inner").is_dir() else tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(OutputDirError) as err:
        if writer == "export_integer":
            export.export_integer(calibrated_student, dest, arch="qimera.models.digits_cnn:DigitsCNN")
        else:
            export.export_deployables(calibrated_student, dest, [], arch="qimera.models.digits_cnn:DigitsCNN",
                                      input_size=(1, 8, 8), int8=False)
    assert "\n" not in str(err.value) and len(str(err.value)) <= MAX_LINE
    assert _snapshot(tmp_path) == before


def test_an_out_dir_held_by_another_run_is_one_line_and_untouched(capsys, tiny_config, tmp_path):
    """Item 3: the holder here is another thread of this process; another process is
    tests/test_lock.py's case."""
    import threading

    from qimera._lock import hold_out_dir

    out = tmp_path / "out"
    tiny_config["train"]["out_dir"] = str(out)
    held, release = threading.Event(), threading.Event()

    def holder():
        with hold_out_dir(out):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        held.wait(30)
        rc = cli.main(["run", str(_write(tmp_path, tiny_config))])
        line = _one_line(capsys.readouterr().err)
        assert rc == 2 and "in use by another run" in line and "another thread" in line, line
        assert sorted(p.name for p in out.iterdir()) == [".qimera.lock"]
        assert cli.main(["check", str(_write(tmp_path, tiny_config))]) == 0  # check writes nothing: no lock
    finally:
        release.set()
        thread.join()
    assert not out.exists()


def test_a_checkpoint_that_is_a_directory_is_refused_before_training(capsys, tiny_config, tmp_path):
    """Item 9: it trained a full epoch, then failed with IsADirectoryError."""
    out = tmp_path / "out"
    (out / "checkpoint.pt").mkdir(parents=True)
    tiny_config["train"]["out_dir"] = str(out)
    rc = cli.main(["run", str(_write(tmp_path, tiny_config))])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and "checkpoint.pt there is not a file (a directory)" in line, line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]


def _experiment(tmp_path, tiny_config, **spec):
    base = dict(tiny_config, naive={"enabled": False})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "x", "seeds": [1],
            "grids": [{"label": "d", "config": "base.yaml", "methods": ["qimera"], "bits": [4]}], **spec}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


EXPERIMENT_CASES = [
    ({"seeds": list(range(1, 1002))}, "1000"),
    ({"set": {"method": "gdfq"}}, "method"),
    ({"set": {"train.seed": 7}}, "train.seed"),
    ({"set": {"quant": {"w_bits": 2}}}, "quant.w_bits"),
    ({"set": {"train.out_dir": "/tmp/elsewhere"}}, "train.out_dir"),
    ({"grids": [{"label": "d", "config": "base.yaml", "methods": ["qimera"], "bits": [4],
                 "axes": {"generator.p": [i / 200 for i in range(101)], "train.lr_student": [1e-4] * 100}}],
      "seeds": list(range(1, 3))}, "at most 10000"),
    ({"grids": [{"label": "d", "config": "base.yaml", "methods": ["qimera"], "bits": [4],
                 "set": {"quant.a_bits": 2}}]}, "quant.a_bits"),
]


@pytest.mark.parametrize("spec,fragment", EXPERIMENT_CASES, ids=[str(i) for i in range(len(EXPERIMENT_CASES))])
def test_bounds_and_keys_written_inside_experiment_files_are_one_line(capsys, tiny_config, tmp_path, monkeypatch,
                                                                     spec, fragment):
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["experiment", "run", str(_experiment(tmp_path, tiny_config, **spec))])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and fragment in line, line
    assert not (tmp_path / "runs").exists()


def test_an_experiment_whose_runs_folder_is_a_file_keeps_it(capsys, tiny_config, tmp_path, monkeypatch):
    """Item 9: ``runs`` a plain file was a NotADirectoryError traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("mine")
    rc = cli.main(["experiment", "run", str(_experiment(tmp_path, tiny_config))])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and "runs" in line, line
    assert (tmp_path / "runs").read_text() == "mine"


def test_an_exclude_pattern_in_an_experiment_cell_fails_that_cell_in_one_line(capsys, tiny_config, tmp_path,
                                                                              monkeypatch):
    """Item 5 inside an experiment file: the cell's run refuses the pattern before training."""
    monkeypatch.chdir(tmp_path)
    spec = {"grids": [{"label": "d", "config": "base.yaml", "methods": ["qimera"], "bits": [4],
                       "set": {"quant.exclude": ["no_such_layer*"]}}]}
    rc = cli.main(["experiment", "run", str(_experiment(tmp_path, tiny_config, **spec))])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    failed = [line for line in err.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "no_such_layer*" in failed[0] and len(failed[0]) <= MAX_LINE, err
