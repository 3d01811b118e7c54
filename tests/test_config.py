"""Config validation: every bad input names its key, its value and what is allowed."""

import pytest

from qimera.config import ConfigError, apply_overrides, check_out_dir, load_config

BASE = {"quant": {"w_bits": 4, "a_bits": 4}}


def cfg(**sections):
    d = {"quant": {"w_bits": 4, "a_bits": 4}}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return load_config(d)


@pytest.mark.parametrize(
    "section, key, value, needle",
    [
        ("quant", "w_bits", 9, "quant.w_bits=9"),
        ("quant", "a_bits", 1, "quant.a_bits=1"),
        ("quant", "w_bits", "four", "quant.w_bits='four'"),
        ("generator", "p", 1.5, "generator.p=1.5"),
        ("generator", "p", -0.1, "generator.p=-0.1"),
        ("generator", "k", 0, "generator.k=0"),
        ("generator", "dm_layers", -1, "generator.dm_layers=-1"),
        ("generator", "embedding_init", "fc", "generator.embedding_init='fc'"),
        ("train", "epochs", 0, "train.epochs=0"),
        ("train", "device", "tpu", "train.device='tpu'"),
        ("train", "amp", "int8", "train.amp='int8'"),
        ("data", "name", "mnist", "data.name='mnist'"),
        ("teacher", "eval_resize", 0, "teacher.eval_resize=0"),
        ("teacher", "eval_resize", "big", "teacher.eval_resize='big'"),
        ("teacher", "eval_interpolation", "lanczos", "teacher.eval_interpolation='lanczos'"),
    ],
)
def test_bad_values_name_key_value_and_allowed(section, key, value, needle):
    with pytest.raises(ConfigError) as e:
        cfg(**{section: {key: value}})
    msg = str(e.value)
    assert needle in msg
    assert "should be" in msg or "allowed" in msg or "must" in msg


def test_bits_message_says_range():
    with pytest.raises(ConfigError, match=r"quant.w_bits=9: Input should be less than or equal to 8"):
        cfg(quant={"w_bits": 9})


def test_unknown_keys_list_allowed():
    with pytest.raises(ConfigError, match=r"train.epoch: unknown key; allowed keys in train: .*epochs"):
        cfg(train={"epoch": 3})
    with pytest.raises(ConfigError, match=r"trian: unknown key; allowed keys: .*train"):
        load_config({**BASE, "trian": {}})


def test_method_allowed_values():
    with pytest.raises(ConfigError, match=r"method='qimeraa'.*'qimera', 'gdfq', 'zeroq' or 'naive'"):
        load_config({**BASE, "method": "qimeraa"})


def test_quant_bits_required():
    with pytest.raises(ConfigError, match="quant.w_bits"):
        load_config({"quant": {"a_bits": 4}})


def test_checkpoint_source_needs_arch_and_weights():
    with pytest.raises(ConfigError, match="teacher.arch and teacher.weights"):
        cfg(teacher={"source": "checkpoint"})
    with pytest.raises(ConfigError, match="teacher.name is required"):
        cfg(teacher={"source": "pytorchcv"})


def test_eval_transform_keys():
    """Both default to None (the source's own transform); a bad value is one error naming the key."""
    assert (cfg().teacher.eval_resize, cfg().teacher.eval_interpolation) == (None, None)
    c = cfg(teacher={"eval_resize": 235, "eval_interpolation": "bicubic"})
    assert (c.teacher.eval_resize, c.teacher.eval_interpolation) == (235, "bicubic")
    for bad, needle in (({"eval_resize": True}, "teacher.eval_resize=True: expected a number"),
                        ({"eval_resize": 2.5}, "teacher.eval_resize=2.5"),
                        ({"eval_interpolation": "lanczos"}, "'nearest', 'bilinear' or 'bicubic'")):
        with pytest.raises(ConfigError) as e:
            cfg(teacher=bad)
        assert needle in str(e.value) and "\n" not in str(e.value) and str(e.value).count("teacher.") == 1


def test_fingerprint_of_a_config_without_the_new_teacher_keys_is_unchanged():
    """Keys added later (FINGERPRINT_WHEN_SET) count only once set: a config that does not
    use them has the fingerprint it had before they existed (recorded with the previous
    release), so that its checkpoint resumes and finished experiment cells stay done."""
    base = {"teacher": {"source": "checkpoint", "arch": "a.b:c", "weights": "w.pt"}, "quant": {"w_bits": 4, "a_bits": 4}}
    before = "ce70b15f10fa4931a266ec88ee323dcd879955690b4bbdd954d7321f3dcf1bc1"
    assert load_config(base).fingerprint() == before
    for key, value in (("eval_resize", 235), ("eval_interpolation", "bicubic")):
        changed = load_config({**base, "teacher": {**base["teacher"], key: value}})
        assert changed.fingerprint() != before
    # train.compile (issue 15): "none" is the eager step of before; a compiled run is another run
    assert load_config({**base, "train": {"compile": "none"}}).fingerprint() == before
    assert load_config({**base, "train": {"compile": "default"}}).fingerprint() != before
    # issue 20's generator keys: the paper's CBN mix and the input embedding are the behaviour of before
    assert load_config({**base, "generator": {"cbn_mix": "sum", "input_embedding": "auto"}}).fingerprint() == before
    assert load_config({**base, "generator": {"input_embedding": "on"}}).fingerprint() == before
    assert load_config({**base, "generator": {"cbn_mix": "mean"}}).fingerprint() != before
    # issue 23: the paper's recipe is the behaviour of before; the integer-exact one is another run
    assert load_config({**base, "quant": {**base["quant"], "integer_exact": False}}).fingerprint() == before
    assert load_config({**base, "quant": {**base["quant"], "integer_exact": True}}).fingerprint() != before


def test_overrides_parse_yaml_values():
    c = load_config(BASE, ["generator.p=0.25", "train.lr_milestones=[2, 3]", "teacher.weights=/x.th",
                           "teacher.source=checkpoint", "teacher.arch=a.b:c"])
    assert c.generator.p == 0.25 and c.train.lr_milestones == [2, 3]
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides({}, ["generator.p"])


def test_gdfq_resolves_its_fixed_generator():
    c = load_config({**BASE, "method": "gdfq", "generator": {"p": 0.4, "k": 2, "dm_layers": 1,
                                                           "noise_scale": 0.5}})
    g = c.effective_generator()
    assert (g.p, g.dm_layers, g.combine, g.embedding_init, g.noise_scale) == (0.0, 0, "multiply", "random", 0.5)
    assert c.resolved()["generator"]["combine"] == "multiply"
    assert g.input_embedding == "on"  # the CIFAR generator: class embedding at the input


def test_gdfq_keeps_the_configured_embedding_init_and_drops_its_imagenet_input_embedding():
    """A comparison of methods need not change the embedding init with the method (issue 20):
    GDFQ takes teacher_fc when asked; on ImageNet its generator feeds the noise alone, as
    GDFQ's own code does, unless input_embedding says otherwise."""
    gdfq = load_config({**BASE, "method": "gdfq", "generator": {"embedding_init": "teacher_fc"}})
    assert gdfq.effective_generator().embedding_init == "teacher_fc"
    imagenet = {**BASE, "generator": {"variant": "imagenet"}}
    assert load_config({**imagenet, "method": "gdfq"}).effective_generator().input_embedding == "off"
    assert load_config(imagenet).effective_generator().input_embedding == "on"
    forced = {**BASE, "method": "gdfq", "generator": {"variant": "imagenet", "input_embedding": "on"}}
    assert load_config(forced).effective_generator().input_embedding == "on"
    with pytest.raises(ConfigError, match=r"input_embedding='off' needs generator.variant='imagenet'"):
        load_config({**BASE, "generator": {"input_embedding": "off"}})
    with pytest.raises(ConfigError, match=r"generator.cbn_mix='avg'.*'sum' or 'mean'"):
        load_config({**BASE, "generator": {"cbn_mix": "avg"}})


def test_yaml_file_and_missing_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("quant: {w_bits: 5, a_bits: 5}\ngenerator: {p: 0.1}\n")
    assert load_config(p).generator.p == 0.1
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_fingerprint_ignores_given_keys():
    a = load_config(BASE, ["train.epochs=300"])
    b = load_config(BASE, ["train.epochs=500"])
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint(ignore=("train.epochs",)) == b.fingerprint(ignore=("train.epochs",))


def test_out_dir_on_read_only_filesystem():
    # /proc refuses new directories even to root
    with pytest.raises(ConfigError, match="train.out_dir='/proc/qimera-run'"):
        check_out_dir("/proc/qimera-run")


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"train.out_dir='.*file/run': cannot create or write"):
        check_out_dir(blocker / "run")
    assert check_out_dir(tmp_path / "ok").is_dir()


def test_every_preset_validates():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 12
    for path in configs:
        c = load_config(path)
        assert c.preset, path
        if "-w4a4" in path.name:
            assert (c.quant.w_bits, c.quant.a_bits) == (4, 4)
        if "-w5a5" in path.name:
            assert (c.quant.w_bits, c.quant.a_bits) == (5, 5)
    spec = {  # SPEC §3: preset -> (p, K at 4 bits, K at 5 bits, embedding init)
        "cifar10": (0.4, 2, 2, "random"),
        "cifar100": (0.4, 10, 50, "teacher_fc"),
        "imagenet-resnet18": (0.4, 500, 100, "random"),
        "imagenet-resnet50": (0.7, 500, 100, "teacher_fc"),
        "imagenet-mobilenetv2": (0.4, 100, 100, "random"),
    }
    root = Path(__file__).resolve().parents[1] / "configs"
    for name, (p, k4, k5, init) in spec.items():
        for bits, k in ((4, k4), (5, k5)):
            c = load_config(root / f"{name}-w{bits}a{bits}.yaml")
            assert (c.generator.p, c.generator.k, c.generator.embedding_init) == (p, k, init)
            assert c.train.epochs == 400 and c.train.iters_per_epoch == 200
            imagenet = name.startswith("imagenet")
            assert c.train.batch_size == (16 if imagenet else 200)
            assert c.train.lr_student == (1e-6 if imagenet else 1e-4)
            assert c.train.warmup_epochs == (50 if imagenet else 4)
            assert c.generator.variant == ("imagenet" if imagenet else "cifar")


# --------------------------------------------------------------------------- issue 21: settings that cannot take effect


@pytest.mark.parametrize("section, values, needle", [
    ("teacher", {"weights": "x"}, "teacher.weights='x': not used by teacher.source='demo' (it reads: name,"),
    ("teacher", {"arch": "a.b:c"}, "teacher.arch='a.b:c': not used by teacher.source='demo'"),
    ("teacher", {"source": "pytorchcv", "name": "resnet20_cifar10", "arch": "a.b:c"},
     "teacher.arch='a.b:c': not used by teacher.source='pytorchcv'"),
    ("teacher", {"source": "torchvision", "name": "resnet18", "weights": "w.pt"},
     "teacher.weights='w.pt': not used by teacher.source='torchvision'"),
    ("teacher", {"source": "timm", "name": "resnet18", "arch": "a.b:c"}, "not used by teacher.source='timm'"),
    ("data", {"path": "x.npz"}, "data.path='x.npz': not used by data.name='digits' (it reads: mean, std"),
    ("data", {"root": "data/cifar10"}, "data.root='data/cifar10': not used by data.name='digits'"),
    ("data", {"name": "npz", "path": "x.npz", "download": True}, "data.download=True: not used by data.name='npz'"),
    ("data", {"name": "cifar10", "path": "x.npz"}, "data.path='x.npz': not used by data.name='cifar10'"),
    ("data", {"name": "imagenet", "path": "val", "root": "r"}, "data.root='r': not used by data.name='imagenet'"),
])
def test_a_key_the_source_does_not_read_is_refused(section, values, needle):
    with pytest.raises(ConfigError) as e:
        cfg(**{section: values})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_keys_the_source_reads_are_accepted():
    """What each source reads, and the two keys accepted everywhere (a cache location set
    once for any source; pretrained, whose default every written-out config carries)."""
    checkpoint = {"source": "checkpoint", "arch": "a.b:c", "weights": "w.pt", "name": "r20", "num_classes": 10,
                  "input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.2] * 3, "eval_resize": 36,
                  "cache_dir": "c", "pretrained": False}
    assert cfg(teacher=checkpoint).teacher.arch == "a.b:c"
    assert cfg(teacher={"source": "timm", "name": "resnet18", "weights": "w.pt", "cache_dir": "c"}).teacher.weights
    assert cfg(teacher={"source": "demo", "name": "digits", "cache_dir": "c", "num_classes": 10}).teacher.cache_dir
    assert cfg(data={"name": "cifar10", "root": "r", "download": True, "limit": 5}).data.root == "r"
    assert cfg(data={"name": "npz", "path": "x.npz", "batch_size": 7, "mean": [0.5], "std": [0.5]}).data.path
    # a round trip through model_dump (every key written out, at its default) still validates
    c = cfg(teacher=checkpoint, data={"name": "npz", "path": "x.npz"})
    assert load_config(c).teacher == c.teacher and load_config(c.model_dump(mode="json")).data == c.data


def test_a_registered_source_is_not_checked():
    from qimera._registry import TEACHER_SOURCES

    TEACHER_SOURCES.register("probe-any", lambda config: None)
    try:
        assert cfg(teacher={"source": "probe-any", "arch": "a.b:c", "weights": "w"}).teacher.weights == "w"
    finally:
        TEACHER_SOURCES.unregister("probe-any")


def test_one_class_superposition_is_refused():
    with pytest.raises(ConfigError, match=r"generator.k=1 with generator.p=0.4: a superposition of one class is a "
                                          r"plain sample"):
        cfg(generator={"k": 1})
    assert cfg(generator={"k": 1, "p": 0.0}).generator.k == 1
    assert cfg(method="gdfq", generator={"k": 2}).effective_generator().k == 1  # GDFQ's own setting stays


@pytest.mark.parametrize("item", ["..train..epochs..=3", "train..epochs=3", ".train.epochs=3", "train.epochs.=3",
                                  " . =3"])
def test_empty_key_parts_are_refused(item):
    with pytest.raises(ConfigError) as e:
        load_config(BASE, [item])
    assert "empty" in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- issue 21: bounded work


def test_yaml_aliases_are_refused_with_file_line_and_column(tmp_path):
    """A few hundred bytes of nested aliases expand to gigabytes (and to a 17 MB error line)."""
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
    path = tmp_path / "bomb.yaml"
    path.write_text("quant: {w_bits: 4, a_bits: 4}\ntrain:\n  epochs: 3\n" + "".join("  " + ln + "\n" for ln in
                                                                                  bomb.splitlines()))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and "alias *a refused" in msg and "at line 5, column" in msg and len(msg) < 400
    with pytest.raises(ConfigError, match=r"--set 'train.lr_milestones=\[\*x\]': value is not valid YAML \(alias"):
        load_config(BASE, ["train.lr_milestones=[*x]"])
    path.write_text("quant: {w_bits: 4, a_bits: 4}\ntrain: &t {epochs: 3, warmup_epochs: 1, lr_milestones: []}\n")
    assert load_config(path).train.epochs == 3  # an anchor alone is harmless


def test_error_messages_quote_a_short_excerpt_of_the_value():
    from qimera.config import EXCERPT_CHARS, quoted

    assert quoted("x" * 1000).endswith("…") and len(quoted("x" * 1000)) == EXCERPT_CHARS and quoted("ab") == "'ab'"
    for overrides in (["data.name=" + "d" * 100_000], ["teacher.eval_interpolation=" + "x" * 100_000],
                      ["train.lr_milestones=[" + ",".join(map(str, range(1, 20_000))) + "]"],
                      ["x" * 100_000 + "=1"], ["train.epochs=" + "[" * 50_000]):
        with pytest.raises(ConfigError) as e:
            load_config(BASE, overrides)
        assert len(str(e.value)) < 1000 and "…" in str(e.value), str(e.value)[:300]
