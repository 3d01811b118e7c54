"""``qimera figure pca|samples`` on a real tiny run: the files, the points, the no-noise
path's endpoints (recomputed here without the library's figure code) and the bad-input
errors (one line, status 2, before any work)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import qimera
from qimera.config import load_config
from qimera.figures import FigureError, parse_classes, parse_pairs
from qimera.generators import ClassMix, build_generator
from qimera.teachers import load_teacher
from qimera.trainer import read_checkpoint


def cli(*args: str) -> subprocess.Popen:
    """``python -m qimera.cli figure ...``, started (several run at once to save time)."""
    return subprocess.Popen([sys.executable, "-m", "qimera.cli", "figure", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_one_line_error(res: subprocess.CompletedProcess, *words: str) -> None:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qimera: error: "), res.stderr
    assert res.stdout == "" and "Traceback" not in res.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def trained(tiny_config):
    """A real one-epoch, two-iteration Qimera run; its out_dir."""
    cfg = dict(tiny_config, naive={"enabled": False})
    cfg["train"] = dict(cfg["train"], epochs=1, iters_per_epoch=2)
    qimera.run(cfg)
    return cfg["train"]["out_dir"]


def no_noise_features(run_dir: str, classes: list[int]) -> np.ndarray:
    """The teacher's classifier input for the plain (K = 1) embedding of each class with the
    generator's noise zeroed, computed from the checkpoint with a hook of its own."""
    state = read_checkpoint(run_dir)
    cfg = load_config(state["config"])
    teacher = load_teacher(cfg.teacher)
    gen = build_generator(cfg, teacher)
    gen.load_state_dict(state["generator"])
    gen.eval()
    labels = torch.tensor(classes).view(-1, 1)
    mix = ClassMix(labels, torch.ones(len(classes), 1))
    head = [m for m in teacher.model.modules() if isinstance(m, torch.nn.Linear)][-1]
    seen = []
    handle = head.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].flatten(1)))
    with torch.no_grad():
        teacher.model(gen(mix, torch.zeros(len(classes), 1, gen.embed_dim)))
    handle.remove()
    return seen[0].double().numpy()


def test_pca_command_writes_the_figures_and_the_points(trained, tmp_path):
    bad = cli("pca", trained, "--pairs", "0-1,9-10", "--out", str(tmp_path / "never"))
    res = finish(cli("pca", trained, "--pairs", "0-1,3-4,8-9", "--samples", "16"))
    assert res.returncode == 0, res.stderr
    folder = f"{trained}/figures"
    assert res.stdout.split() == [f"{folder}/pca_pairs.png", f"{folder}/pca_all.png", f"{folder}/pca_points.npz"]
    for png in ("pca_pairs.png", "pca_all.png"):
        assert open(f"{folder}/{png}", "rb").read(4) == b"\x89PNG"

    pts = np.load(f"{folder}/pca_points.npz")
    assert pts["pairs"].tolist() == [[0, 1], [3, 4], [8, 9]]
    steps = np.arange(101) / 100
    for i, (a, b) in enumerate(pts["pairs"]):
        pair = pts["pair"] == i
        path = pair & (pts["kind"] == "path")
        assert path.sum() == 101 and np.allclose(pts["lam"][path], steps)
        assert np.allclose(pts["lam"][path & pts["mark"]], np.arange(11) / 10)  # every 10th percentile
        assert (pair & (pts["kind"] == "boundary")).sum() == 16
        assert sorted(pts["cls"][pair & (pts["kind"] == "class")].tolist()) == [a] * 16 + [b] * 16
        # the path's ends are the two plain class embeddings without noise, in this pair's PCA
        feats = no_noise_features(trained, [int(a), int(b)])
        ends = (feats - pts["pca_mean"][i]) @ pts["pca_components"][i].T
        xy = np.stack([pts["x"][path], pts["y"][path]], axis=1)
        assert np.allclose(xy[[0, -1]], ends, atol=1e-4), (xy[[0, -1]], ends)
    # Figure 3: every class (C = 10 <= 20), plain samples only, in one more PCA
    every = pts["pair"] == -1
    assert set(pts["kind"][every]) == {"class"} and sorted(set(pts["cls"][every])) == list(range(10))
    assert pts["pca_components"].shape[:2] == (4, 2)

    assert_one_line_error(finish(bad), "--pairs", "class 10 is outside 0..9")
    assert not (tmp_path / "never").exists()  # refused before any work


def test_samples_command_writes_the_grids(trained, tmp_path):
    bad = cli("samples", trained, "--classes", "0,3,12")
    res = finish(cli("samples", trained, "--classes", "0,3,7", "--per-class", "5", "--out", str(tmp_path / "f")))
    assert res.returncode == 0, res.stderr
    names = ["samples_grid.png", "samples_rows.png", "samples_boundary.png", "samples.npz"]
    assert res.stdout.split() == [str(tmp_path / "f" / n) for n in names]
    for png in names[:3]:
        assert (tmp_path / "f" / png).read_bytes()[:4] == b"\x89PNG"
    arrays = np.load(tmp_path / "f" / "samples.npz")
    cell = 8 + 1  # 8x8 digits and one white pixel between cells
    assert arrays["grid_classes"].tolist() == list(range(10))  # C <= 20: the whole C x C grid
    assert arrays["grid"].shape == (10 * cell - 1, 10 * cell - 1, 1)
    assert arrays["boundary"].shape == (3 * cell - 1, 3 * cell - 1, 1)
    assert arrays["rows"].shape == (3 * cell - 1, 5 * cell - 1, 1)
    assert arrays["classes"].tolist() == [0, 3, 7]
    for key in ("grid", "boundary", "rows"):
        assert 0.0 <= arrays[key].min() and arrays[key].max() <= 1.0
    assert_one_line_error(finish(bad), "--classes", "class 12 is outside 0..9")


def test_bad_input_is_one_line_with_status_2(tiny_config, tmp_path):
    for text in ("0-1,2", "a-b", "0-1-2", "", "3-3", "0-1,,1-2"):
        with pytest.raises(FigureError, match="--pairs"):
            parse_pairs(text)
    for text in ("", "1,x", "-1", "2,2"):
        with pytest.raises(FigureError, match="--classes"):
            parse_classes(text)
    assert parse_pairs(" 0-1, 8-9") == [(0, 1), (8, 9)] and parse_classes("0,100") == [0, 100]

    # what `qimera run` leaves for zeroq: summary.json (its method), no checkpoint
    (tmp_path / "zeroq").mkdir()
    (tmp_path / "zeroq" / "summary.json").write_text(json.dumps({"method": "zeroq", "iterations": 2}))
    # the pipeline's form of a calibration-only run: a checkpoint without a generator
    (tmp_path / "naive").mkdir()
    torch.save({"epoch": 0, "generator": None, "student": {}, "history": [],
                "config": load_config(dict(tiny_config, method="naive")).resolved()},
               tmp_path / "naive" / "checkpoint.pt")
    (tmp_path / "empty").mkdir()
    runs = [cli("pca", str(tmp_path / "zeroq")), cli("samples", str(tmp_path / "naive")),
            cli("pca", str(tmp_path / "empty")), cli("pca", str(tmp_path / "empty"), "--pairs", "0-1,1:2")]
    zeroq_res, naive_res, empty_res, pairs_res = (finish(p) for p in runs)
    assert_one_line_error(zeroq_res, "method zeroq", "has no generator")
    assert_one_line_error(naive_res, "method naive", "has no generator")
    assert_one_line_error(empty_res, "has no checkpoint.pt")
    assert_one_line_error(pairs_res, "--pairs", "'1:2' is not a pair")


def test_defaults_and_the_neutral_noise_of_both_generators():
    from qimera.figures import default_classes, default_pairs, neutral_noise, plain_mix
    from qimera.generators import Generator

    assert default_pairs(10) == [(i, i + 1) for i in range(9)] and default_pairs(3) == [(0, 1), (1, 2)]
    assert default_classes(10) == list(range(10)) and default_classes(1000)[:3] == [0, 100, 200]
    mix = plain_mix([0, 1], 2)
    assert mix.labels.tolist() == [[0], [0], [1], [1]]
    # add: standardize(E[c] + 0); multiply (GDFQ): E[c] * 1, since E[c] * 0 would erase the class
    for combine, fill in (("add", 0.0), ("multiply", 1.0)):
        gen = Generator(num_classes=3, embed_dim=5, img_size=8, channels=1, combine=combine)
        noise = neutral_noise(gen, mix)
        assert noise.shape == (4, 1, 5) and bool((noise == fill).all())


def test_class_labels_prefer_the_teachers_names():
    from qimera.figures import class_labels, dataset_class_names

    teacher_names = [f"class {i}, more" for i in range(10)]
    assert class_labels(teacher_names, "cifar10", 10) == teacher_names  # the teacher's, over the dataset's
    assert class_labels(tuple(teacher_names), "digits", 10) == teacher_names
    assert class_labels(None, "cifar10", 10) == dataset_class_names("cifar10", 10)
    assert class_labels(teacher_names[:9], "cifar10", 10) == dataset_class_names("cifar10", 10)  # not one per class
    assert class_labels(None, "digits", 10) is None  # label by index


def test_sample_counts_are_bounded_before_any_work(tmp_path):
    """Issue 21: ``--samples`` and ``--per-class`` have upper bounds, named in one line."""
    from qimera.figures import MAX_PER_CLASS, MAX_SAMPLES, pca_figures, sample_figures

    missing = tmp_path / "nothing-here"  # the bound is checked before the run is opened
    with pytest.raises(FigureError, match=rf"--samples {MAX_SAMPLES + 1}: at most {MAX_SAMPLES} samples"):
        pca_figures(missing, samples=MAX_SAMPLES + 1)
    with pytest.raises(FigureError, match="--samples 1: need at least 2"):
        pca_figures(missing, samples=1)
    with pytest.raises(FigureError, match=rf"--per-class {MAX_PER_CLASS + 1}: expected 1 to {MAX_PER_CLASS}"):
        sample_figures(missing, per_class=MAX_PER_CLASS + 1)
    assert_one_line_error(finish(cli("pca", str(missing), "--samples", "100000")), "--samples 100000", "at most")
    assert not missing.exists()


def test_a_mismatched_config_and_an_interrupted_figure_are_one_line_and_leave_nothing(trained, tiny_config, tmp_path,
                                                                                       monkeypatch, capsys):
    """Issue 21: ``--config`` that does not describe the run's generator is one line (not a
    load_state_dict traceback); a figure interrupted mid-write leaves no part of its output
    and does not speak of resuming."""
    import yaml

    import qimera.figures as figures
    from qimera import cli as qcli

    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(dict(tiny_config, generator={**tiny_config["generator"], "dm_layers": 2})))
    rc = qcli.main(["figure", "pca", trained, "--samples", "8", "--config", str(other), "--out", str(tmp_path / "x")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "does not describe the run's generator" in lines[0], lines
    assert str(other) in lines[0] and not (tmp_path / "x").exists()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(figures, "save_pca_all", interrupted)  # after pca_pairs.png is written
    out = tmp_path / "deep" / "figs"
    rc = qcli.main(["figure", "pca", trained, "--samples", "8", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 130 and "not finished" in err and "resume" not in err, err
    assert not (tmp_path / "deep").exists()
