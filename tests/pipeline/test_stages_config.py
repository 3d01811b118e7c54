"""The pipeline's pieces without DVC: presets and params, the repository root inside
experiment copies, MLflow URIs and params, the stage graph, figures and the history CSV."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from qimera.config import ConfigError, load_config
from qimera.figures import grid_classes, sample_grid, save_sample_grid
from stages import common, tracking
from stages.common import PipelineError, preset_file, resolve_config
from stages.train import history_csv

REPO = Path(__file__).resolve().parents[2]
PAPER = ("cifar10", "cifar100", "imagenet-resnet18", "imagenet-resnet50", "imagenet-mobilenetv2")


def params(**sections) -> dict:
    """params.yaml with ``sections`` merged in; the ladder off (these tests run outside the repository)."""
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    base["ladder"] = {"experiment": None}
    for key, value in sections.items():
        if isinstance(value, dict):
            base.setdefault(key, {}).update(value)
        else:
            base[key] = value
    return base


def test_default_params_run_the_demo_preset():
    cfg = resolve_config(params(), REPO)
    demo = load_config(REPO / "configs" / "demo.yaml")
    got, want = cfg.resolved(), demo.resolved()
    assert got["train"].pop("out_dir") == "outputs/train"
    want["train"].pop("out_dir")
    assert got == want


@pytest.mark.parametrize("preset", PAPER)
@pytest.mark.parametrize("bits", [4, 5])
def test_paper_presets_with_one_override(preset, bits):
    cfg = resolve_config(params(preset=preset, quant={"w_bits": bits, "a_bits": bits}), REPO)
    path = preset_file(REPO, preset, bits, bits)
    assert path.name == f"{preset}-w{bits}a{bits}.yaml"
    want = load_config(path).resolved()
    got = cfg.resolved()
    assert got["train"].pop("out_dir") == "outputs/train"
    want["train"].pop("out_dir")
    assert got == want and cfg.preset == preset


def test_paper_settings_come_from_the_preset_files():
    def gen(preset, bits=4):
        return resolve_config(params(preset=preset, quant={"w_bits": bits, "a_bits": bits}), REPO).generator

    assert (gen("cifar10").p, gen("cifar10").k, gen("cifar10").embedding_init) == (0.4, 2, "random")
    assert (gen("cifar100").k, gen("cifar100", 5).k, gen("cifar100").embedding_init) == (10, 50, "teacher_fc")
    assert (gen("imagenet-resnet50").p, gen("imagenet-resnet50").k) == (0.7, 500)
    assert gen("imagenet-resnet18", 5).k == 100 and gen("imagenet-mobilenetv2").variant == "imagenet"


def test_other_bit_widths_use_the_4bit_file_with_the_bits_replaced():
    cfg = resolve_config(params(preset="cifar100", quant={"w_bits": 6, "a_bits": 3}), REPO)
    assert (cfg.quant.w_bits, cfg.quant.a_bits, cfg.generator.k) == (6, 3, 10)
    assert preset_file(REPO, "cifar100", 6, 3).name == "cifar100-w4a4.yaml"
    demo = resolve_config(params(quant={"w_bits": 5, "a_bits": 5}), REPO)
    assert (demo.quant.w_bits, demo.quant.a_bits) == (5, 5)


def test_non_null_params_override_and_null_keeps_the_preset():
    cfg = resolve_config(params(generator={"p": 0.25, "k": None}, train={"epochs": 3, "lr_milestones": [2]},
                                naive={"batches": 1}, method="gdfq"), REPO)
    assert cfg.train.epochs == 3 and cfg.train.lr_milestones == [2] and cfg.naive.batches == 1
    assert cfg.generator.p == 0.25 and cfg.generator.k == 2  # k: the demo preset's value
    assert cfg.method == "gdfq" and cfg.effective_generator().p == 0.0
    # keys params.yaml does not list are accepted too (dvc exp run -S +train.lr_student=...)
    assert resolve_config(params(train={"lr_student": 1e-5}), REPO).train.lr_student == 1e-5


def test_unknown_preset_lists_the_allowed_ones():
    with pytest.raises(PipelineError) as err:
        resolve_config(params(preset="resnet9000"), REPO)
    assert str(err.value) == (
        "preset='resnet9000' is not a preset; allowed: cifar10, cifar10-shared, cifar100, demo, "
        "imagenet-inceptionv3, imagenet-mobilenetv2, imagenet-resnet18, imagenet-resnet50, imagenet-shufflenet, "
        "imagenet-sqnxt23")
    with pytest.raises(PipelineError):
        resolve_config(params(preset=None), REPO)


@pytest.mark.parametrize("section, values, expected", [
    ("generator", {"p": 2}, "generator.p=2: Input should be less than or equal to 1"),
    ("quant", {"a_bits": 9}, "quant.a_bits=9: Input should be less than or equal to 8"),
    ("generator", {"embedding_init": "zeros"}, "generator.embedding_init='zeros'"),
    ("train", {"device": "tpu"}, "train.device='tpu'"),
    ("generator", {"typo": 1}, "generator.typo: unknown key"),
])
def test_invalid_values_give_qimeras_message(section, values, expected):
    with pytest.raises(ConfigError) as err:
        resolve_config(params(**{section: values}), REPO)
    assert expected in str(err.value)


def test_missing_input_files_are_reported_with_the_root(tmp_path):
    cfg = resolve_config(params(teacher={"source": "checkpoint", "arch": "a.b:c", "weights": "nope.pt"}), REPO)
    with pytest.raises(PipelineError, match=r"teacher.weights='nope.pt': file not found .*repository root"):
        common.check_input_files(cfg, tmp_path)
    (tmp_path / "nope.pt").write_bytes(b"x")
    common.check_input_files(cfg, tmp_path)
    assert common.root_relative(cfg, tmp_path).teacher.weights == str(tmp_path / "nope.pt")


def test_remote_teacher_weights_are_checked_for_form_only():
    cfg = resolve_config(params(teacher={"source": "checkpoint", "arch": "a.b:c", "weights": "s3://b/t.pt"}), REPO)
    common.check_input_files(cfg, REPO)  # fetched by fetch_teacher, not checked for existence here
    assert common.root_relative(cfg, REPO).teacher.weights == "s3://b/t.pt"
    for bad, msg in (("https://host/t.pt", "allowed are a local file path or s3://bucket/key"),
                     ("s3://bucket-only", "no object key")):
        cfg = resolve_config(params(teacher={"source": "checkpoint", "arch": "a.b:c", "weights": bad}), REPO)
        with pytest.raises(PipelineError, match=msg):
            common.check_input_files(cfg, REPO)


@pytest.mark.parametrize("section, message", [
    ({"s3_prefix": "bucket/x"}, "export.s3_prefix='bucket/x': expected s3://bucket/prefix"),
    ({"s3_prefix": "s3:///x"}, "no bucket"),
    ({"verify_samples": 0}, "export.verify_samples=0: expected a positive integer"),
    ({"onnx_opset": 13}, "export.onnx_opset=13: expected an integer from 18 to 23"),
    ({"latency_runs": -1}, "export.latency_runs=-1: expected a whole number"),
    ({"latency_runs": 2.5}, "export.latency_runs=2.5: expected a whole number"),
    ({"int8_form": "yes"}, "export.int8_form='yes': expected true"),
    ({"s3": "x"}, "export.s3: unknown key; allowed: s3_prefix, verify_samples, onnx_opset, latency_runs, int8_form"),
])
def test_export_section_is_validated(section, message):
    with pytest.raises(PipelineError, match=message):
        common.export_params({"export": section})


def test_export_section_defaults():
    assert common.export_params({}) == {"s3_prefix": None, "verify_samples": None, "onnx_opset": 20,
                                        "latency_runs": 30, "int8_form": True}
    assert common.export_params({"export": {"s3_prefix": "s3://b/p", "verify_samples": None}})["s3_prefix"] == "s3://b/p"


def test_repo_root_from_an_experiment_copy(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    exp = root / ".dvc" / "tmp" / "exps" / "tmpab12" / "sub"
    exp.mkdir(parents=True)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert common.repo_root(exp) == root
    assert common.repo_root(exp.parent) == root
    (root / "dvc.yaml").write_text("stages: {}\n")
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.setenv("DVC_ROOT", str(root))
    assert common.repo_root(other) == root
    monkeypatch.delenv("DVC_ROOT")
    assert common.repo_root(root) == root
    assert common.repo_root(other) == common.PROJECT_DIR


def test_tracking_uri_default_env_and_params(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri({}, tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.tracking_uri({}, tmp_path).startswith("sqlite:////")  # absolute
    p = {"mlflow": {"tracking_uri": "sqlite:///stores/m.db"}}
    assert tracking.tracking_uri(p, tmp_path) == f"sqlite:///{tmp_path}/stores/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(p, tmp_path) == "http://127.0.0.1:5000"
    for bad in ("mlruns", "file:///tmp/mlruns"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", bad)
        with pytest.raises(PipelineError, match="no plain file store"):
            tracking.tracking_uri({}, tmp_path)
    db_uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.artifact_location(db_uri, "cifar10 w4") == (tmp_path / "mlartifacts" / "cifar10_w4").as_uri()
    assert tracking.artifact_location("http://host:5000", "demo") is None
    assert tracking.redact("https://bob:secret@host:5000/x") == "https://host:5000/x"


def test_unreachable_store_is_one_clear_error():
    with pytest.raises(PipelineError, match=r"'http://127.0.0.1:9' is not usable: \[Errno 111\] Connection refused"):
        tracking.connect("http://127.0.0.1:9")


def test_params_are_flattened_without_secrets():
    flat = tracking.flatten({"train": {"epochs": 2, "lr_milestones": [1, 2], "device": "cpu"},
                             "teacher": {"name": None, "api_token": "x"}, "db": {"password": "y"}})
    assert flat == {"train.epochs": "2", "train.lr_milestones": "[1, 2]", "train.device": "cpu",
                    "teacher.name": "null"}


def test_prefect_flow_run_id_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "abc")
    assert tracking.prefect_flow_run_id() == "abc"
    cfg = resolve_config(params(), REPO)
    monkeypatch.setenv("DVC_EXP_NAME", "sunny-day")
    tags = tracking.run_tags(cfg, torch.device("cpu"))
    assert tags["prefect.flow_run_id"] == "abc" and tags["dvc.exp_name"] == "sunny-day"
    assert tags["device"] == "cpu" and tracking.run_name(cfg) == "demo-w4a4-sunny-day"


def test_stage_graph_is_exact():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == ["resolve", "fetch_teacher", "init_embeddings", "train", "evaluate", "export", "ladder"]
    assert dvc["resolve"]["params"] == [{"params.yaml": None}]  # all of params.yaml
    for name, stage in dvc.items():
        assert stage["cmd"] == f"python -m stages.{name}"
        # the others read config fragments; export and ladder also read their params sections
        assert name == "resolve" or stage.get("params", []) == ([name] if name in ("export", "ladder") else [])
    # the ladder does not depend on the preset's pipeline: a new preset never reruns it
    assert not any(d.startswith("outputs/") for d in dvc["ladder"]["deps"])
    assert {"outputs/ladder.json": {"cache": False}} in dvc["ladder"]["metrics"]
    deps = {name: set(stage["deps"]) for name, stage in dvc.items()}
    assert "outputs/config/teacher.yaml" in deps["fetch_teacher"]
    assert "outputs/config/embeddings.yaml" in deps["init_embeddings"]
    for name in ("fetch_teacher", "init_embeddings"):
        assert "outputs/config/run.yaml" not in deps[name]  # quant.a_bits does not rerun them
    for name in ("train", "evaluate", "export"):
        assert "outputs/config/run.yaml" in deps[name] and "qimera" in deps[name]
    assert {"outputs/train": {"persist": True}} in dvc["train"]["outs"]
    assert {"metrics.json": {"cache": False}} in dvc["evaluate"]["metrics"]
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    assert [next(iter(p)) for p in plots] == ["losses", "accuracy"]


def test_resolve_writes_fragments_that_change_only_with_what_they_hold(tmp_path, monkeypatch):
    from stages import resolve

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(resolve, "repo_root", lambda: REPO)
    checked = []
    monkeypatch.setattr(resolve, "connect", checked.append)  # the store is checked (tested above)

    def run(**sections):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params(**sections)))
        resolve.main()
        return {f.name: f.read_text() for f in (tmp_path / "outputs" / "config").iterdir()}

    base = run()
    assert set(base) == {"run.yaml", "teacher.yaml", "embeddings.yaml"}
    bits = run(quant={"w_bits": 4, "a_bits": 5})
    assert bits["run.yaml"] != base["run.yaml"]
    assert bits["teacher.yaml"] == base["teacher.yaml"] and bits["embeddings.yaml"] == base["embeddings.yaml"]
    init = run(generator={"embedding_init": "teacher_fc"})  # the demo preset starts from random embeddings
    assert init["embeddings.yaml"] != base["embeddings.yaml"] and init["teacher.yaml"] == base["teacher.yaml"]
    data = run(data={"limit": 100})
    assert data["teacher.yaml"] != base["teacher.yaml"] and data["embeddings.yaml"] == base["embeddings.yaml"]
    mlflow_only = run(mlflow={"experiment": "elsewhere"})
    assert mlflow_only == base
    assert len(checked) == 5 and all(uri.startswith("sqlite:////") or "://" in uri for uri in checked)


def test_resolve_takes_every_method_and_refuses_an_unknown_one(tmp_path, monkeypatch):
    from qimera.config import ConfigError
    from stages import resolve

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(resolve, "repo_root", lambda: REPO)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params(method="foo")))
    with pytest.raises(ConfigError, match="method='foo'.*'zeroq' or 'naive'"):
        resolve.main()
    assert not (tmp_path / "outputs").exists()
    for method in ("zeroq", "naive"):  # the calibration-only baselines run through the pipeline too
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params(method=method)))
        resolve.main()
        assert yaml.safe_load((tmp_path / "outputs" / "config" / "run.yaml").read_text())["method"] == method


def test_teacher_arch_rebuilds_every_source(tmp_path, monkeypatch):
    from qimera.teachers import load_teacher

    def arch(source, name, cfg_arch=None, **fields):
        return load_teacher(source, name=name, arch=cfg_arch, pretrained=False, **fields).arch

    # a checkpoint teacher keeps its own arch: an importable pkg.mod:fn with its weights file
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "mod.py").write_text("from qimera.models.digits_cnn import DigitsCNN as fn\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from qimera.models.digits_cnn import DigitsCNN

    torch.save(DigitsCNN().state_dict(), tmp_path / "w.pt")
    checkpoint = dict(weights=str(tmp_path / "w.pt"), input_size=[1, 8, 8], mean=[0.3], std=[0.4])

    assert arch("demo", "digits_cnn") == "qimera.models.digits_cnn:DigitsCNN"
    assert arch("checkpoint", "x", "pkg.mod:fn", **checkpoint) == "pkg.mod:fn"
    assert arch("torchvision", "resnet18") == "torchvision.models:resnet18"
    assert arch("torchvision", "inception_v3") == "qimera.teachers.torchvision:inception_v3"
    assert arch("pytorchcv", "resnet20_cifar10") == "pytorchcv.models.resnet_cifar:resnet20_cifar10"
    assert arch("pytorchcv", "mobilenetv2_w1") == "pytorchcv.models.mobilenetv2:mobilenetv2_w1"


def test_fetch_teacher_writes_both_files_or_neither(tmp_path, monkeypatch):
    from stages import fetch_teacher

    monkeypatch.chdir(tmp_path)
    common.write_yaml(common.TEACHER_CONFIG, {"teacher": {"source": "demo"}, "data": {"name": "digits", "limit": 50},
                                              "device": "cpu"})

    def broken(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr(fetch_teacher, "write_json", broken)
    with pytest.raises(OSError, match="disk full"):
        fetch_teacher.main()
    assert not (tmp_path / "outputs" / "teacher").exists()
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["config"]  # no temporary left either

    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    fetch_teacher.main()
    record = common.read_json(common.TEACHER_RECORD)
    assert record["arch"] == "qimera.models.digits_cnn:DigitsCNN" and record["num_samples"] == 50
    from qimera._files import sha256_file

    assert record["sha256"] == sha256_file(common.TEACHER_WEIGHTS)
    # the demo teacher's transform (the standard ratio: 8 / 0.875 -> 10, bilinear) and no class names
    assert (record["eval_resize"], record["eval_interpolation"], record["class_names"]) == (10, "bilinear", None)


def _record_of(teacher) -> dict:
    """``teacher.json`` as fetch_teacher writes it for ``teacher`` (through JSON)."""
    import json
    from types import SimpleNamespace

    from stages import fetch_teacher

    data = SimpleNamespace(name="digits")
    res = SimpleNamespace(num_samples=1, top1=0.0, top5=0.0, per_class=[0.0] * teacher.num_classes)
    return json.loads(json.dumps(fetch_teacher._record(teacher, data, res, None, "0" * 64)))


def test_workspace_teacher_keeps_the_evaluation_transform(tiny_weights):
    """A teacher evaluated as timm's are (its own resize, bicubic) is rebuilt with that
    transform from teacher.json; a teacher.json without the keys gets the standard one."""
    from qimera.teachers import load_teacher
    from stages import fetch_teacher

    teacher = load_teacher("checkpoint", arch="qimera.models.digits_cnn:DigitsCNN", weights=str(tiny_weights),
                           input_size=[1, 8, 8], mean=[0.3], std=[0.4], eval_resize=9, eval_interpolation="bicubic")
    record = _record_of(teacher)
    assert (record["eval_resize"], record["eval_interpolation"], record["class_names"]) == (9, "bicubic", None)
    rebuilt = load_teacher(common.workspace_teacher(record, tiny_weights))
    assert rebuilt.eval_transform == teacher.eval_transform
    fetch_teacher.check_rebuilt(teacher, rebuilt)

    older = {k: v for k, v in record.items() if k not in ("eval_resize", "eval_interpolation", "class_names")}
    t = load_teacher(common.workspace_teacher(older, tiny_weights)).eval_transform
    assert (t.resize, t.crop, t.interpolation) == (10, (8, 8), "bilinear")
    with pytest.raises(RuntimeError, match="evaluation transform"):
        fetch_teacher.check_rebuilt(teacher, load_teacher(common.workspace_teacher(older, tiny_weights)))


def test_history_csv_leaves_missing_values_empty():
    text = history_csv([{"epoch": 1, "loss_g": 2.5, "loss_g_ce": 2.0, "loss_g_bns": 5.0, "iters_per_second": 3.0},
                        {"epoch": 2, "loss_g": 2.0, "loss_g_ce": 1.5, "loss_g_bns": 5.0, "loss_s": 1.0,
                         "top1": 50.0, "top5": 90.0, "iters_per_second": float("nan"), "teacher_agree_plain": 97.5,
                         "teacher_max_prob": 0.875, "label_max": 1.0}])
    assert text.splitlines() == [
        "epoch,loss_g,loss_g_ce,loss_g_bns,loss_s,top1,top5,iters_per_second,"
        "teacher_agree_plain,teacher_agree_superposed,teacher_max_prob,label_max",
        "1,2.5,2,5,,,,3,,,,", "2,2,1.5,5,1,50,90,,97.5,,0.875,1"]


def test_sample_grid_is_a_class_by_class_figure(tmp_path):
    from qimera.generators import Generator

    assert grid_classes(10) == list(range(10)) and grid_classes(20) == list(range(20))
    assert grid_classes(1000) == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]  # the paper's Figure 6c/d
    torch.manual_seed(0)
    gen = Generator(num_classes=10, embed_dim=16, img_size=8, channels=1, dm_layers=1)
    grid = sample_grid(gen, [0, 3, 7], mean=(0.3,), std=(0.4,))
    assert grid.shape == (3 * 9 - 1, 3 * 9 - 1, 1) and grid.min() >= 0 and grid.max() <= 1
    assert gen.training  # the generator's mode is restored
    save_sample_grid(tmp_path / "g.png", grid, [0, 3, 7])
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]  # written atomically, no leftovers


def test_run_stage_exit_status(capsys):
    def bad_input():
        raise PipelineError("preset='x' is not a preset")

    def bug():
        raise RuntimeError("boom")

    with pytest.raises(SystemExit) as ex:
        common.run_stage("resolve", bad_input)
    assert ex.value.code == 2
    assert capsys.readouterr().err == "qimera stage resolve: error: preset='x' is not a preset\n"
    with pytest.raises(SystemExit) as ex:
        common.run_stage("train", bug)
    assert ex.value.code == 1 and "Traceback" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ex:
        common.run_stage("train", lambda: (_ for _ in ()).throw(ConfigError("generator.k=50: too big")))
    assert ex.value.code == 2


def test_summary_table_for_make_demo():
    from stages.summary import table

    m = {"w_bits": 4, "a_bits": 4, "teacher": {"top1": 98.8889, "top5": 100.0},
         "naive": {"top1": 99.0741, "top5": 100.0}, "student": {"top1": 98.5185, "top5": 99.5}}
    assert table(m).splitlines() == [
        "model                                top-1   top-5",
        "teacher (full precision)             98.89  100.00",
        "naive 4w4a (noise calibration)       99.07  100.00",
        "Qimera 4w4a (final epoch)            98.52   99.50",
    ]
    assert "naive" not in table({**m, "naive": None}, "gdfq") and "GDFQ 4w4a" in table(m, "gdfq")


def test_summary_names_the_exports(tmp_path):
    import json

    from stages.summary import exports_line

    assert "no export yet" in exports_line(tmp_path)
    (tmp_path / "verification.json").write_text(json.dumps({
        "samples": 540, "onnx_top1": 98.33, "onnx_prediction_agreement": 1.0, "integer_max_abs_logit_delta": 1e-6}))
    (tmp_path / "model.json").write_text(json.dumps({
        "registered_model": "qimera-demo-w4a4", "registered_version": "2", "champion": False,
        "champion_version": "1", "s3_uri": "s3://b/p/qimera-demo-w4a4/r"}))
    text = exports_line(tmp_path)
    assert "onnxruntime top-1 98.33%, same prediction on 100.00% of 540 images" in text and "int8" not in text
    forms = {"fp32": {"file_bytes": 1000, "latency_ms": {"1": 0.5, "64": 8.0}},
             "int8": {"file_bytes": 100, "latency_ms": {"1": 0.25, "64": 4.0}}}
    (tmp_path / "verification.json").write_text(json.dumps({
        "samples": 540, "onnx_top1": 98.33, "onnx_prediction_agreement": 1.0, "integer_max_abs_logit_delta": 1e-6,
        "onnx_int8_top1": 98.15, "onnx_int8_prediction_agreement": 0.9963, "deployment": {"forms": forms}}))
    assert ("student.int8.onnx (integer kernels): top-1 98.15%, same prediction on 99.63%; batch 1 0.25 ms vs FP32 "
            "0.50 ms, batch 64 4.00 ms vs FP32 8.00 ms; 10.0x smaller") in exports_line(tmp_path)
    v = json.loads((tmp_path / "verification.json").read_text())
    v["onnx_int8"] = {"rejected": "why"}
    (tmp_path / "verification.json").write_text(json.dumps(v))
    assert "student.int8.onnx (integer kernels) not shipped: top-1 98.15%" in exports_line(tmp_path)
    assert "version 2 (champion: version 1)" in text and "uploaded to s3://b/p/qimera-demo-w4a4/r/" in text


def test_model_card_names_teacher_bits_accuracies_and_config():
    from stages.model_card import render_model_card

    config = {"method": "qimera", "preset": "cifar10", "data": {"name": "cifar10"},
              "quant": {"w_bits": 4, "a_bits": 4},
              "generator": {"variant": "cifar", "dm_layers": 1, "embedding_init": "random", "p": 0.4, "k": 2},
              "train": {"calibration_epochs": 4, "epochs": 400, "iters_per_epoch": 200, "batch_size": 200,
                        "seed": 1}}
    teacher = {"source": "pytorchcv", "name": "resnet20_cifar10", "arch": "a.b:c", "num_classes": 10,
               "input_size": [3, 32, 32], "sha256": "ab" * 32, "source_sha256": None}
    metrics = {"epochs": 400, "teacher": {"top1": 93.89, "top5": 99.8}, "naive": None,
               "student": {"top1": 91.26, "top5": 99.7}}
    card = render_model_card(name="qimera-cifar10-w4a4", config=config, teacher=teacher, metrics=metrics,
                             version="3")
    assert card.startswith("# qimera-cifar10-w4a4 (version 3)")
    assert "4-bit weights, 4-bit activations" in card and "**Qimera**" in card
    assert "93.89% top-1" in card and "91.26% top-1" in card and "| –" in card
    assert "`pytorchcv`, name `resnet20_cifar10`" in card and "p = 0.4" in card and "K = 2" in card
    assert "```yaml\nmethod: qimera" in card
    assert "onnxruntime" not in card  # no verification given: no deployment section
    assert "Beyond the paper" not in card  # no parts section: the paper's method
    assert "Quantization recipe: the paper's (fake-quantized" in card
    exact = render_model_card(name="n", config={**config, "quant": {**config["quant"], "integer_exact": True}},
                              teacher=teacher, metrics=metrics, version="3")
    assert "Quantization recipe: **integer-exact**" in exact and "the accuracy of `student.int8.onnx`" in exact
    averaged = render_model_card(name="n", config={**config, "parts": {"averaging": "swa", "image_filter": "none"}},
                                 teacher=teacher, metrics=metrics, version="3")
    assert "5. Beyond the paper: the exported student is the **SWA weight average**" in averaged
    assert "(parts `averaging: swa`)" in averaged

    teacher.update(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    verification = {"samples": 10000, "student_top1": 91.26, "integer_top1": 91.26,
                    "integer_max_abs_logit_delta": 2e-6, "onnx_top1": 91.25, "onnx_prediction_agreement": 0.9996,
                    "onnx": {"opset": 20, "qdq_weights": 20, "qdq_activations": 19, "float_weights": [],
                             "float_activations": ["act_quant_3"]}}
    card = render_model_card(name="qimera-cifar10-w4a4", config=config, teacher=teacher, metrics=metrics,
                             version=None, verification=verification)
    assert "ONNX (opset 20) with QuantizeLinear/DequantizeLinear: 20 integer weight tensors" in card
    assert "(1 kept as exact float ops" in card and "onnxruntime 91.25%" in card and "99.96% of the images" in card
    assert "mean [0.5, 0.5, 0.5] and std [0.25, 0.25, 0.25]" in card

    # the int8 form and the deployment figures (export.latency_runs > 0)
    forms = {name: {"file_bytes": size, "latency_ms": {"1": b1, "64": b64},
                    "integer_ops": {"QLinearConv": 9} if name == "int8" else {}}
             for name, size, b1, b64 in (("fp32", 1_090_000, 0.74, 35.2), ("qdq", 327_000, 1.59, 74.9),
                                         ("int8", 178_000, 0.5, 21.0))}
    verification.update(
        onnx_int8_top1=91.2, onnx_int8_prediction_agreement=0.991,
        onnx_int8={"opset": 21, "folded_batchnorms": 19, "int4_weights": 20, "requantized": []},
        deployment={"machine": {"cpu": "Test CPU", "capability": "AVX2", "cpu_count": 2, "onnxruntime": "1.32.0",
                                "threads": 2}, "runs": 30, "batches": [1, 64], "forms": forms})
    card = render_model_card(name="qimera-cifar10-w4a4", config=config, teacher=teacher, metrics=metrics,
                             version=None, verification=verification)
    assert "`student.int8.onnx`: the deployable form (opset 21)" in card and "19 BatchNorm layers folded" in card
    assert "(20 tensors stored as packed int4)" in card and "int8 form 91.20% (same prediction on 99.10%)" in card
    assert "| `student.int8.onnx`: int8 form | 178.0 kB | 0.50 ms | 21.00 ms | 91.20% | 99.10% |" in card
    assert "| float teacher, plain ONNX (for comparison) | 1.09 MB | 0.74 ms | 35.20 ms | – | – |" in card
    assert "runs 9 QLinearConv" in card and "Measured on Test CPU (AVX2, 2 logical CPUs), onnxruntime 1.32.0" in card
    assert "threads: 2; median of 30 calls" in card and "requantized" not in card
    verification["onnx_int8"]["requantized"] = ["layer1.0.conv2"]
    card = render_model_card(name="qimera-cifar10-w4a4", config=config, teacher=teacher, metrics=metrics,
                             version=None, verification=verification)
    assert "1 convolution outputs requantized to 8 bits before their residual addition (an approximation)" in card
    verification["onnx_int8"]["rejected"] = "its top-1 91.20% differs from the student's 91.26% by 0.2 points"
    card = render_model_card(name="qimera-cifar10-w4a4", config=config, teacher=teacher, metrics=metrics,
                             version=None, verification=verification)
    assert "no `student.int8.onnx`: the int8 form was made and measured but not shipped: its top-1 91.20%" in card
    assert "the file is not shipped" in card
    verification["onnx_int8"] = {"skipped": "the student is not a torch.fx graph"}
    for key in ("onnx_int8_top1", "onnx_int8_prediction_agreement", "deployment"):
        del verification[key]
    card = render_model_card(name="qimera-cifar10-w4a4", config=config, teacher=teacher, metrics=metrics,
                             version=None, verification=verification)
    assert "no `student.int8.onnx`: the student is not a torch.fx graph" in card and "latency" not in card


def test_ladder_params_are_checked_in_one_line(tmp_path, monkeypatch):
    from stages.ladder import DEFAULTS, ladder_params, load_ladder

    monkeypatch.chdir(REPO)
    assert ladder_params({}) == DEFAULTS
    assert len(load_ladder({}).cells) == 9  # the shipped ladder: 3 methods x 2w2a x 3 seeds
    assert len(load_ladder({"ladder": {"seeds": 1}}).cells) == 3
    assert load_ladder({"ladder": {"experiment": None}}) is None
    for section, message in [("x", "ladder='x': must be a mapping"), ({"job": 2}, "ladder.job: unknown key"),
                             ({"jobs": 0}, "ladder.jobs=0"), ({"jobs": True}, "ladder.jobs=True"),
                             ({"seeds": 0}, "ladder.seeds=0"), ({"seeds": "3"}, "ladder.seeds='3'"),
                             ({"set": "train.epochs=1"}, "ladder.set='train.epochs=1'"),
                             ({"experiment": 3}, "ladder.experiment=3"),
                             ({"experiment": "experiments/nope.yaml"}, "ladder.experiment='experiments/nope.yaml': file")]:
        with pytest.raises(PipelineError, match=message):
            load_ladder({"ladder": section})


def test_summary_prints_the_ladder_table():
    from stages.summary import ladder_table

    text = ladder_table({"experiment": "experiments/demo-ladder.yaml", "columns": ["4w4a", "2w2a"],
                         "rows": {"naive": {"4w4a": 98.5, "2w2a": 45.7}, "qimera": {"4w4a": 98.3, "2w2a": None}},
                         "teacher_top1": 98.7, "budget": "20 x 50 x 128", "report": "r.md"})
    lines = text.splitlines()
    assert "20 x 50 x 128" in lines[0] and lines[1].split() == ["model", "4w4a", "2w2a"]
    assert lines[2].split()[-2:] == ["98.70", "98.70"] and lines[3].split()[-2:] == ["98.50", "45.70"]
    assert lines[4].startswith("Qimera") and lines[4].split()[-2:] == ["98.30", "–"]
    assert ladder_table({"experiment": None, "skipped": "off"}) == ""
    # several seeds: mean ± std per entry, then the paired differences per seed
    text = ladder_table({"experiment": "e.yaml", "columns": ["2w4a"], "seeds": [1, 2, 3],
                         "rows": {"gdfq": {"2w4a": 94.0}, "qimera": {"2w4a": 95.5}},
                         "std": {"gdfq": {"2w4a": 2.5}, "qimera": {"2w4a": 1.25}},
                         "n": {"gdfq": {"2w4a": 3}, "qimera": {"2w4a": 3}},
                         "pairs": [{"treatment": "qimera", "baseline": "gdfq", "entry": "2w4a",
                                    "by_seed": {"1": 1.5, "2": -0.5, "3": 3.5}, "mean": 1.5, "std": 2.0, "wins": 2}],
                         "teacher_top1": 98.7, "budget": "10 x 50 x 128", "report": "r.md"})
    lines = text.splitlines()
    assert "mean ± std over seeds 1, 2, 3" in lines[0]
    assert lines[3].startswith("GDFQ") and lines[3].endswith("94.00 ± 2.50") and lines[4].endswith("95.50 ± 1.25")
    assert lines[6] == "  Qimera − GDFQ at 2w4a: +1.50 -0.50 +3.50; mean +1.50 ± 2.00, ahead at 2/3"
