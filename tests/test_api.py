"""The one entry point: qimera.run / `qimera run`, and early errors on bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

import qimera
from qimera.config import ConfigError
from qimera.data import DataError
from qimera.teachers import TeacherError

from qtest_paths import R20_ARCH, needs_shared, shared_r20_config


def test_run_returns_summary_and_writes_outputs(tiny_config, tmp_path):
    res = qimera.run(tiny_config)
    s = res.summary()
    for key in ("teacher_top1", "naive_top1", "student_top1", "student_top5", "iterations", "seconds"):
        assert key in s
    assert s["iterations"] == 9 and len(res.history) == 3
    assert res.history[-1]["top1"] == pytest.approx(s["student_top1"], abs=1e-3)  # final epoch
    out = tmp_path / "run"
    assert (out / "summary.json").is_file() and (out / "checkpoint.pt").is_file()
    assert len(json.loads((out / "summary.json").read_text())["student_per_class"]) == 10


@pytest.mark.parametrize("method", ["gdfq", "zeroq", "naive"])
def test_baselines_through_the_same_api(tiny_config, method):
    cfg = dict(tiny_config, method=method, zeroq={"batch_size": 8, "steps": 5})
    s = qimera.run(cfg, ["train.epochs=1"]).summary()
    assert s["method"] == method and 0.0 <= s["student_top1"] <= 100.0
    if method == "naive":
        assert s["student_top1"] == s["naive_top1"]


def _error(cfg, overrides=()):
    with pytest.raises((ConfigError, TeacherError, DataError)) as e:
        qimera.run(cfg, list(overrides))
    return str(e.value)


def test_k_larger_than_classes(tiny_config):
    assert "generator.k=11" in _error(tiny_config, ["generator.k=11"])


def test_exclude_that_matches_no_layer_or_every_layer_stops_check_and_run(tiny_config, tmp_path, capsys):
    """Issue 21: checked once the teacher is loaded, before any training: one line, status 2."""
    import yaml

    from qimera import cli

    tiny_config["train"]["out_dir"] = str(tmp_path / "out")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    for command in ("check", "run"):
        for exclude, needle in (('["*"]', "quant.exclude=['*'] matches every layer with weights (features.0, "),
                                ('["conv*"]', "quant.exclude: pattern 'conv*' matches no layer with weights")):
            assert cli.main([command, str(path), "--set", f"quant.exclude={exclude}"]) == 2
            out, err = capsys.readouterr()
            assert out == "" and err.count("\n") == 1 and err.startswith("qimera: error: ") and needle in err, err
    assert not (tmp_path / "out").exists()
    assert qimera.prepare(tiny_config, ['quant.exclude=["fc"]'], with_data=False).cfg.quant.exclude == ["fc"]


def test_teacher_without_batchnorm(tiny_config, tmp_path):
    import torch

    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    path = tmp_path / "nobn.pt"
    torch.save(lin.state_dict(), path)
    msg = _error(tiny_config, [f"teacher.weights={path}", "teacher.arch=tests.test_api:_no_bn"])
    assert "BatchNorm2d" in msg


def _no_bn(num_classes=10):
    import torch

    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes))


def test_weights_that_do_not_fit(tiny_config):
    msg = _error(tiny_config, [f"teacher.arch={R20_ARCH}", "teacher.input_size=[3, 32, 32]"])
    assert "missing" in msg.lower() and "unexpected" in msg.lower()


def test_npz_of_wrong_shape(tiny_config, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((10, 32, 32, 5), np.uint8), labels=np.zeros(10, np.int64))
    msg = _error(tiny_config, ["data.name=npz", f"data.path={bad}"])
    assert "data.path" in msg and "(10, 32, 32, 5)" in msg


def test_npz_input_size_mismatch(tiny_config, tmp_path):
    ok = tmp_path / "ok.npz"
    np.savez(ok, images=np.zeros((10, 32, 32, 3), np.uint8), labels=np.zeros(10, np.int64))
    assert "teacher expects" in _error(tiny_config, ["data.name=npz", f"data.path={ok}", "data.mean=[0.5, 0.5, 0.5]",
                                                "data.std=[0.2, 0.2, 0.2]"])


def test_unwritable_out_dir_before_anything(tiny_config, tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    assert "train.out_dir" in _error(tiny_config, [f"train.out_dir={blocker}/run"])


def test_bad_bits_before_teacher_loading(tiny_config):
    msg = _error(tiny_config, ["quant.w_bits=12", "teacher.weights=/does/not/exist"])
    assert "quant.w_bits=12" in msg


def test_cli_prints_json_summary_last(tiny_config, tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    out = subprocess.run([sys.executable, "-m", "qimera.cli", "run", str(path), "--set", "train.epochs=1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["iterations"] == 3 and summary["method"] == "qimera"


def test_cli_bad_input_exits_2_with_clear_message(tiny_config, tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    out = subprocess.run([sys.executable, "-m", "qimera.cli", "run", str(path), "--set", "generator.p=2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "generator.p=2" in out.stderr and "less than or equal to 1" in out.stderr
    assert not (tmp_path / "run").exists()  # nothing written before the error


@needs_shared
def test_shared_teacher_fp_accuracy_on_shared_npz(tmp_path):
    prep = qimera.prepare(shared_r20_config(tmp_path))
    from qimera.evaluate import evaluate

    res = evaluate(prep.teacher.model, prep.eval_data.loader, num_classes=10)
    assert res.num_samples == 10000
    assert res.top1 == pytest.approx(81.03, abs=0.05)
