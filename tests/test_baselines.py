"""The calibration-only methods (naive, ZeroQ): ``calibrated_student`` is what ``qimera run``
and the pipeline's ``train`` stage both call, so it must give the very student the
building blocks give, with the config's settings and seed."""

import pytest
import torch

from qimera.baselines import (
    CALIBRATION_METHODS,
    calibrate,
    calibrated_student,
    distill_zeroq_images,
    naive_student,
)
from qimera.config import load_config
from qimera.quant import build_student


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_zeroq_is_calibration_on_the_configs_distilled_images(tiny_config, tiny_teacher):
    cfg = load_config(dict(tiny_config, method="zeroq", zeroq={"batch_size": 6, "steps": 4, "lr": 0.3}))
    got = calibrated_student(cfg, tiny_teacher)
    assert got.iterations == 4 and got.images.shape == (6, 1, 8, 8)
    images = distill_zeroq_images(tiny_teacher.model, (1, 8, 8), batch_size=6, steps=4, lr=0.3, seed=3)
    assert torch.equal(got.images, images)
    expected = calibrate(build_student(cfg, tiny_teacher), [images])
    assert _states_equal(got.student, expected)
    assert not got.student.training
    # the seed is train.seed: another seed distils other images
    other = calibrated_student(load_config(dict(tiny_config, method="zeroq", zeroq={"batch_size": 6, "steps": 4},
                                                train={**tiny_config["train"], "seed": 4})), tiny_teacher)
    assert not torch.equal(other.images, got.images)


def test_naive_is_the_naive_baseline(tiny_config, tiny_teacher):
    cfg = load_config(dict(tiny_config, method="naive"))
    got = calibrated_student(cfg, tiny_teacher)
    assert got.images is None and got.iterations == 0
    assert _states_equal(got.student, naive_student(cfg, tiny_teacher))


def test_a_generator_method_is_refused(tiny_config, tiny_teacher):
    assert CALIBRATION_METHODS == ("zeroq", "naive")
    with pytest.raises(ValueError, match="method='qimera' is not calibration-only"):
        calibrated_student(load_config(tiny_config), tiny_teacher)
