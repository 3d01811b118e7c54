"""Faults a hostile user or a flaky machine causes: divergence is caught where it happens,
non-finite models are refused, and every fault is one line with the right exit status."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from qimera import cli
from qimera.config import ConfigError, load_config
from qimera.evaluate import NonFiniteError, check_finite_parameters, evaluate
from qimera.export import ExportError, check_verification, export_deployables
from qimera.models.digits_cnn import DigitsCNN
from qimera.trainer import CHECKPOINT_NAME, HISTORY_NAME, Trainer, TrainingDiverged, read_checkpoint


def _cli(capsys, config: dict, tmp_path, *overrides: str) -> tuple[int, str]:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    rc = cli.main(["run", str(path), *[a for o in overrides for a in ("--set", o)]])
    err = capsys.readouterr().err
    return rc, err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------- divergence


def test_divergence_stops_at_the_iteration_and_keeps_the_last_good_checkpoint(tiny_config, tiny_teacher, tmp_path):
    cfg = load_config(tiny_config, [f"train.out_dir={tmp_path / 'd'}", "train.warmup_epochs=1",
                                    "train.lr_student=1e30", "train.log_every=1"])
    trainer = Trainer(cfg, tiny_teacher)
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit()
    message = str(info.value)
    assert "epoch 2, iteration" in message and "loss_s is nan" in message
    assert "train.lr_student=1e+30" in message and "checkpoint of epoch 1 stays" in message
    state = read_checkpoint(tmp_path / "d")
    assert state["epoch"] == 1  # the diverged epoch wrote nothing
    history = [json.loads(x) for x in (tmp_path / "d" / HISTORY_NAME).read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1]
    assert all(math.isfinite(v) for r in history for v in r.values() if isinstance(v, float))
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


def test_generator_divergence_names_its_settings(tiny_config, tiny_teacher, tmp_path):
    cfg = load_config(tiny_config, [f"train.out_dir={tmp_path / 'g'}", "train.lr_generator=1e30"])
    with pytest.raises(TrainingDiverged, match=r"epoch 1, iteration \d/3: loss_g.* is nan .*train.lr_generator=1e\+30"):
        Trainer(cfg, tiny_teacher).fit()
    assert not (tmp_path / "g" / CHECKPOINT_NAME).exists()


@pytest.mark.parametrize("override, key", [
    ("train.lr_student=.inf", "train.lr_student"), ("train.lr_generator=.nan", "train.lr_generator"),
    ("generator.noise_scale=.inf", "generator.noise_scale"), ("train.bns_weight=.inf", "train.bns_weight"),
    ("train.kd_temperature=.inf", "train.kd_temperature"), ("teacher.mean=[.nan]", "teacher.mean"),
    ("quant.ema_momentum=.nan", "quant.ema_momentum"),
])
def test_configs_refuse_non_finite_numbers(tiny_config, override, key):
    with pytest.raises(ConfigError, match=rf"{key}(\.0)?=(inf|nan): Input should be a finite number"):
        load_config(tiny_config, [override])


@pytest.mark.parametrize("overrides, message", [
    (["train.epochs=3", "train.warmup_epochs=3"], "train.warmup_epochs=3 must be below train.epochs=3"),
    (["train.lr_milestones=[2, 2]"], r"train.lr_milestones=\[2, 2\]: must be strictly increasing"),
    (["train.epochs=3", "train.lr_milestones=[2, 5]"], r"has \[5\] beyond the last epoch \(train.epochs=3\)"),
])
def test_schedules_that_would_be_silently_wrong_are_refused(tiny_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(tiny_config, overrides)


# ----------------------------------------------------------------------- non-finite models


def _nan_model() -> DigitsCNN:
    model = DigitsCNN(10).eval()
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    return model


def test_evaluate_and_export_refuse_non_finite_models(tmp_path):
    x = torch.randn(8, 1, 8, 8)
    loader = [(x, torch.zeros(8, dtype=torch.long))]
    with pytest.raises(NonFiniteError, match="fc.weight holds 1 non-finite"):
        check_finite_parameters(_nan_model())
    with pytest.raises(NonFiniteError, match="logits are NaN or infinite on 8 of 8 images"):
        evaluate(_nan_model(), loader)
    from qimera.baselines import calibrate
    from qimera.quant import QuantRecipe, quantize_model

    student, _ = quantize_model(_nan_model(), QuantRecipe(4, 4))
    calibrate(student, [x])
    with pytest.raises(NonFiniteError):
        export_deployables(student, tmp_path / "out", loader, arch="qimera.models.digits_cnn:DigitsCNN",
                           input_size=(1, 8, 8))
    assert not (tmp_path / "out").exists()
    # NaN cannot pass the verification bounds
    with pytest.raises(ExportError):
        check_verification({"integer_max_abs_logit_delta": float("nan")})
    with pytest.raises(ExportError):
        check_verification({"onnx_top1": float("nan"), "student_top1": 10.0})


# ----------------------------------------------------------------------- one line per fault


def test_cli_faults_are_one_line_with_a_remedy(tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    tiny_config["train"]["out_dir"] = str(out)
    tiny_config["train"]["epochs"] = 2
    assert _cli(capsys, tiny_config, tmp_path)[0] == 0

    # a truncated checkpoint: say so and name the choices, never start over silently
    ckpt = out / CHECKPOINT_NAME
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[: len(good) // 3])
    rc, err = _cli(capsys, tiny_config, tmp_path)
    line = _one_line(err)
    assert rc == 2 and "corrupt or truncated checkpoint.pt" in line and "train.resume=false" in line
    ckpt.write_bytes(b"")
    assert _cli(capsys, tiny_config, tmp_path)[0] == 2
    ckpt.write_bytes(good)

    rc, err = _cli(capsys, tiny_config, tmp_path, "quant.a_bits=5")
    assert rc == 2 and "different configuration" in _one_line(err)
    rc, err = _cli(capsys, tiny_config, tmp_path, "train.epochs=1")
    assert rc == 2 and "2 epochs, more than train.epochs=1" in _one_line(err)
    rc, err = _cli(capsys, tiny_config, tmp_path, "train.device=mps", f"train.out_dir={tmp_path / 'mps'}")
    assert rc == 2 and "MPS (Apple GPU) is not available" in _one_line(err)
    assert not (tmp_path / "mps").exists()  # a failed run leaves no empty out_dir it created
    # the first allocation of a batch this size (8 TB of labels) is refused at once, before
    # any memory is touched
    rc, err = _cli(capsys, tiny_config, tmp_path, "train.batch_size=1000000000000", f"train.out_dir={tmp_path / 'big'}")
    assert rc == 1 and "out of memory" in _one_line(err) and "train.batch_size" in err
    assert not (tmp_path / "big").exists()
    rc, err = _cli(capsys, tiny_config, tmp_path, "train.lr_student=1e30", f"train.out_dir={tmp_path / 'nan'}")
    assert rc == 2 and "training diverged" in _one_line(err)


def test_machine_faults_are_told_apart_from_bugs():
    from qimera.runtime import machine_fault

    oom = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 40000000000 bytes. Error code 12 (Cannot allocate memory)")
    assert "out of memory" in machine_fault(oom) and "train.batch_size" in machine_fault(oom)
    assert "out of memory" in machine_fault(MemoryError())
    full = machine_fault(OSError(errno.ENOSPC, "No space left on device", "/x/checkpoint.pt"))
    assert "cannot write /x/checkpoint.pt: No space left on device" in full
    assert machine_fault(RuntimeError("shape mismatch")) is None
    assert machine_fault(OSError(errno.ENOENT, "No such file")) is None


def test_full_disk_while_checkpointing_is_one_line_and_leaves_no_temporary_file(tiny_config, tmp_path, capsys,
                                                                                monkeypatch):
    out = tmp_path / "full"
    tiny_config["train"]["out_dir"] = str(out)
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "fingerprint" in obj:  # the trainer's checkpoint
            f.write(b"partial")  # the disk filled up half-way through the temporary file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    rc, err = _cli(capsys, tiny_config, tmp_path)
    line = _one_line(err)
    assert rc == 1 and "No space left on device" in line and "free space" in line
    assert not out.exists()  # no checkpoint.pt.tmp, nothing half-written: not even the empty out_dir


def test_more_hostile_input_is_one_line(tiny_config, tmp_path, capsys):
    out = tmp_path / "h"
    tiny_config["train"]["out_dir"] = str(out)
    for overrides, code, needle in [
        (["train.lr_student=1e308"], 2, "a value overflowed"),  # overflow inside torch is divergence too
        (["train.batch_size=9223372036854775808"], 2, "too large"),
        (["train.epochs=true"], 2, "expected a number, not a boolean"),
        (["train.out_dir=''"], 2, "train.out_dir=''"),
        (["train.device=cuda:-1"], 2, "allowed: 'auto'"),
        (["train.epochs=[1,"], 2, "value is not valid YAML"),
        (["generator.p=1.5", "generator.k=0"], 2, "generator.k=0"),  # several errors, still one line
    ]:
        rc, err = _cli(capsys, tiny_config, tmp_path, *overrides)
        assert rc == code and needle in _one_line(err), (overrides, err)
    assert not out.exists()
    garbage = tmp_path / "garbage.yaml"
    garbage.write_bytes(b"\xe7\xff\x00binary")
    assert cli.main(["run", str(garbage)]) == 2 and "not UTF-8 text" in _one_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as info:
        cli.main(["run"])
    assert info.value.code == 2 and "the following arguments are required" in _one_line(capsys.readouterr().err)


def test_odd_checkpoints_and_stale_temporary_files(tiny_config, tmp_path, capsys):
    out = tmp_path / "c"
    tiny_config["train"]["out_dir"] = str(out)
    out.mkdir()
    (out / CHECKPOINT_NAME).mkdir()
    rc, err = _cli(capsys, tiny_config, tmp_path)
    assert rc == 2 and "is not a file" in _one_line(err)
    (out / CHECKPOINT_NAME).rmdir()
    torch.save(torch.zeros(3), out / CHECKPOINT_NAME)
    rc, err = _cli(capsys, tiny_config, tmp_path)
    assert rc == 2 and "not a qimera checkpoint" in _one_line(err)
    (out / CHECKPOINT_NAME).unlink()
    stale = out / f".{CHECKPOINT_NAME}.abc123.tmp"  # what a SIGKILL during a checkpoint write leaves
    stale.write_bytes(b"half")
    assert _cli(capsys, tiny_config, tmp_path)[0] == 0
    assert not stale.exists() and (out / CHECKPOINT_NAME).is_file()


def test_a_real_full_disk_error_chain_is_recognised():
    from qimera.runtime import machine_fault

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 92416 vs 92312")
    except RuntimeError as exc:
        assert "No space left on device" in machine_fault(exc)
    assert "File too large" in machine_fault(OSError(errno.EFBIG, "File too large"))


def test_a_corrupt_demo_teacher_cache_is_one_line(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "digits_cnn_seed0.pt").write_bytes(b"corrupt")  # the cached demo teacher, damaged
    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    rc = cli.main(["check", str(config), "--set", f"teacher.cache_dir={cache}",
                   "--set", f"train.out_dir={tmp_path / 'o'}"])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and "teacher.cache_dir=" in line and "corrupt" in line and "delete the cached file" in line
    assert not (tmp_path / "o").exists()


def test_a_teacher_with_a_nan_weight_fails_check_naming_it_and_check_writes_nothing(tiny_config, tmp_path, capsys):
    """Issue 21: a damaged teacher is refused by ``qimera check`` (not blamed on a diverged
    student by the run), and ``check`` leaves no ``out_dir`` behind."""
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(tiny_config))
    assert cli.main(["check", str(good)]) == 0
    capsys.readouterr()
    assert not Path(tiny_config["train"]["out_dir"]).exists()

    state = torch.load(tiny_config["teacher"]["weights"], weights_only=True)
    name = next(k for k, v in state.items() if k.endswith("weight") and v.is_floating_point())
    state[name] = state[name].clone()
    state[name].view(-1)[3] = math.nan
    bad = tmp_path / "nan.pt"
    torch.save(state, bad)
    rc, err = _cli(capsys, {**tiny_config, "teacher": {**tiny_config["teacher"], "weights": str(bad)}}, tmp_path)
    line = _one_line(err)
    assert rc == 2 and name in line and "NaN or infinite" in line and "diverged" not in line, line
    path = tmp_path / "run.yaml"
    assert cli.main(["check", str(path)]) == 2 and name in _one_line(capsys.readouterr().err)
    assert not Path(tiny_config["train"]["out_dir"]).exists()
