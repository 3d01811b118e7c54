"""Method parts (qimera/parts.py): the paper's methods as compositions of parts, exactly, and
one short test for each addition (hard-sample rule, low-pass filter, weight averaging)."""

import json

import pytest
import torch
import torch.nn as nn

from qimera.config import ConfigError, load_config
from qimera.losses import kd_loss, soft_cross_entropy
from qimera.parts import (AveragingRule, GeneratorBatch, StudentBatch, compose, deployed_student_state,
                          gaussian_lowpass, generator_margin, lowpass_d0, swa_start_epoch, teacher_difficulty)
from qimera.trainer import CHECKPOINT_NAME, Trainer


def _paper_generator_loss(trainer):
    """The generator's loss as the trainer computed it before the parts existed."""
    def step(labels, lam, noise, y, with_student=False):
        from qimera.generators import ClassMix

        trainer.bn_hook.enabled = True
        x = trainer.generator(ClassMix(labels, lam), noise)
        t = trainer.teacher(x)
        trainer.bn_hook.enabled = False
        ce, bns = soft_cross_entropy(t, y), trainer.bn_hook.loss()
        return ce + trainer.tc.bns_weight * bns, {"ce": ce, "bns": bns}, x, t
    return step


def _paper_student_loss(trainer):
    def step(x, t, y):
        a = trainer.student(x)
        return kd_loss(a, t, trainer.tc.kd_temperature, trainer.tc.kd_reduction) + soft_cross_entropy(a, y)
    return step


@pytest.mark.parametrize("method", ["qimera", "gdfq"])
def test_the_default_parts_are_the_paper_method_to_the_last_digit(tiny_config, tiny_teacher, tmp_path, method):
    runs = []
    for name in ("parts", "paper"):
        cfg = load_config(tiny_config, [f"method={method}", f"train.out_dir={tmp_path / name}", "train.epochs=2"])
        trainer = Trainer(cfg, tiny_teacher)
        if name == "paper":
            trainer._generator_step = _paper_generator_loss(trainer)
            trainer._student_step = _paper_student_loss(trainer)
        runs.append((trainer.fit().history, trainer.student.state_dict(), trainer.generator.state_dict()))
    (h1, s1, g1), (h2, s2, g2) = runs
    strip = [{k: v for k, v in r.items() if k not in ("seconds", "iters_per_second")} for r in h1]
    assert strip == [{k: v for k, v in r.items() if k not in ("seconds", "iters_per_second")} for r in h2]
    for a, b in ((s1, s2), (g1, g2)):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_loss_terms_sum_to_the_paper_formulas_exactly(tiny_config):
    cfg = load_config(tiny_config)
    parts = compose(cfg, (1, 8, 8))
    torch.manual_seed(0)
    t, a = torch.randn(6, 10), torch.randn(6, 10)
    y = torch.softmax(torch.randn(6, 10), 1)
    bns = torch.tensor(0.37)
    loss_g, terms = parts.generator_loss(GeneratorBatch(t, y, lambda: bns), cfg)
    assert torch.equal(loss_g, soft_cross_entropy(t, y) + cfg.train.bns_weight * bns)
    assert set(terms) == {"ce", "bns"}
    loss_s, _ = parts.student_loss(StudentBatch(a, t, y), cfg)
    assert torch.equal(loss_s, kd_loss(a, t, cfg.train.kd_temperature, cfg.train.kd_reduction)
                       + soft_cross_entropy(a, y))
    assert parts.image_filter is None and parts.averaging is None


def test_default_parts_leave_the_fingerprint_as_it_was(tiny_config):
    """A config that does not set the parts keeps its fingerprint (old checkpoints resume,
    finished experiment cells are not rerun); choosing an addition changes it."""
    import hashlib

    from qimera.config import FINGERPRINT_WHEN_SET

    cfg = load_config(tiny_config)
    d = cfg.resolved()
    d.pop("parts")
    for dotted, before in FINGERPRINT_WHEN_SET.items():
        sec, _, key = dotted.partition(".")
        if sec != "parts" and d[sec].get(key, object()) == before:
            d[sec].pop(key)
    assert cfg.fingerprint() == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
    assert load_config(tiny_config, ["parts.averaging=ema"]).fingerprint() != cfg.fingerprint()


def test_hard_samples_learn_from_the_teacher_only():
    """SynQ's rule: the label's CE only where the teacher's difficulty (1 - p_T(y) for a
    one-hot label) is below tau; the batch mean counts the hard samples as zeros."""
    cfg = load_config({"quant": {"w_bits": 4, "a_bits": 4}, "parts": {"student_loss": ["kd", "ce_easy"]}})
    t = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])  # sample 0 easy (label 0), sample 1 hard (label 0)
    y = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    difficulty = teacher_difficulty(t, y)
    assert torch.allclose(difficulty, 1 - torch.softmax(t, 1)[:, 0])
    a = torch.randn(2, 3)
    from qimera.parts import student_ce_easy

    expected = -torch.log_softmax(a, 1)[0, 0] / 2
    assert torch.allclose(student_ce_easy(StudentBatch(a, t, y), cfg), expected)
    # a superposed label the teacher reproduces exactly is easy
    mix = torch.tensor([[0.5, 0.5, 0.0]])
    assert float(teacher_difficulty(torch.log(mix + 1e-12), mix)) < 1e-5


def test_lowpass_matches_the_shifted_spectrum_formula():
    """The filter against PyTorch's own FFT with the spectrum centred (fftshift), the way
    SynQ writes it: the same gain exp(-D²/(2·D0²)) around the zero frequency."""
    torch.manual_seed(0)
    for side in (8, 9, 32):
        x = torch.randn(2, 3, side, side)
        d0 = 3.0
        c = side // 2
        yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        gain = torch.exp(-((yy - c) ** 2 + (xx - c) ** 2).float() / (2 * d0 ** 2))
        spec = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1)) * gain
        ref = torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1))).real
        assert torch.allclose(gaussian_lowpass(x, d0), ref, atol=1e-5)
    flat = torch.full((1, 1, 8, 8), 0.7)
    assert torch.allclose(gaussian_lowpass(flat, 1.0), flat, atol=1e-6)  # the mean passes
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1.0
    assert gaussian_lowpass(checker[None, None], 1.0).abs().max() < 1e-6  # the finest detail goes


def test_lowpass_cutoff_scales_synq_d0_to_the_input_side(tiny_config):
    cfg = load_config(tiny_config, ["parts.image_filter=lowpass"])
    assert lowpass_d0(cfg, (3, 224, 224)) == 80.0 and lowpass_d0(cfg, (3, 32, 32)) == pytest.approx(80 * 32 / 224)
    assert lowpass_d0(load_config(tiny_config, ["parts.image_filter=lowpass", "parts.lowpass_d0=5"]),
                      (3, 224, 224)) == 5.0


def test_swa_is_the_mean_of_the_steps_and_keeps_the_trained_buffers():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval()
    rule = AveragingRule(net, start_epoch=1)
    seen = []
    for epoch, value in ((0, 5.0), (1, 1.0), (1, 2.0), (2, 6.0)):
        with torch.no_grad():
            net[0].weight.fill_(value)
        rule.update(net, epoch)
        if epoch >= 1:
            seen.append(value)
    assert rule.count == 3
    with torch.no_grad():
        net[1].running_mean.fill_(0.25)
    deployed = rule.deployed(net)
    assert deployed is not net and torch.allclose(deployed[0].weight, torch.full((2, 2), sum(seen) / len(seen)))
    assert torch.equal(deployed[1].running_mean, net[1].running_mean) and not deployed.training
    state = {"student": net.state_dict(), "student_average": rule.state_dict()}
    merged = deployed_student_state(state)
    assert torch.equal(merged["0.weight"], deployed[0].weight) and torch.equal(merged["1.running_mean"],
                                                                                net[1].running_mean)
    plain = {"student": net.state_dict()}
    assert deployed_student_state(plain) is plain["student"]
    empty = AveragingRule(net, start_epoch=5)
    assert empty.deployed(net) is net  # nothing averaged yet: the trained student
    before = {"student": net.state_dict(), "student_average": empty.state_dict()}
    assert deployed_student_state(before) is before["student"]


def test_averaged_student_resumes_exactly_and_is_the_one_evaluated(tiny_config, tiny_teacher, tmp_path):
    """EMA from the first trained epoch: the average is checkpointed and resumed bit for
    bit, and it (not the trained student) is what the epoch's top-1 and the final
    evaluation measure."""
    class Kill(Exception):
        pass

    over = ["parts.averaging=ema", "parts.ema_decay=0.5"]
    full = Trainer(load_config(tiny_config, over + [f"train.out_dir={tmp_path / 'a'}"]), tiny_teacher)
    history = full.fit().history

    def kill_after_two(record):
        if record["epoch"] == 2:
            raise Kill

    cfg_b = load_config(tiny_config, over + [f"train.out_dir={tmp_path / 'b'}"])
    with pytest.raises(Kill):
        Trainer(cfg_b, tiny_teacher, callbacks=(kill_after_two,)).fit()
    resumed = Trainer(cfg_b, tiny_teacher)
    assert resumed.fit().resumed_from_epoch == 2
    a, b = full.average.state_dict(), resumed.average.state_dict()
    assert torch.equal(a["n_averaged"], b["n_averaged"]) and int(a["n_averaged"]) == 3 * 3
    assert all(torch.equal(a["parameters"][k], b["parameters"][k]) for k in a["parameters"])

    deployed = full.deployed_student()
    assert deployed is not full.student
    differs = [k for k, v in deployed.state_dict().items() if not torch.equal(v, full.student.state_dict()[k])]
    assert differs and all(k in a["parameters"] for k in differs)  # only parameters are averaged
    assert [r["averaged_steps"] for r in history] == [3, 6, 9]
    state = torch.load(tmp_path / "a" / CHECKPOINT_NAME, weights_only=True)
    merged = deployed_student_state(state)
    assert all(torch.equal(merged[k], v) for k, v in deployed.state_dict().items())


def test_filter_and_easy_ce_train_and_change_the_run(tiny_config, tiny_teacher, tmp_path):
    base = Trainer(load_config(tiny_config, [f"train.out_dir={tmp_path / 'base'}", "train.epochs=1"]),
                   tiny_teacher).fit().history[-1]
    for i, over in enumerate((["parts.image_filter=lowpass", "parts.lowpass_d0=1.5"],
                              ["parts.student_loss=[kd, ce_easy]", "parts.easy_tau=0.9"])):
        rec = Trainer(load_config(tiny_config, over + [f"train.out_dir={tmp_path / str(i)}", "train.epochs=1"]),
                      tiny_teacher).fit().history[-1]
        assert rec["loss_g"] == base["loss_g"]  # the generator's side is untouched
        assert rec["loss_s"] != base["loss_s"] and torch.isfinite(torch.tensor(rec["loss_s"]))


def test_margin_keeps_the_disagreement_between_its_bounds(tiny_config):
    """AdaDFQ's margin: the batch-normalised entropy of softmax(t - a), penalised below
    margin_low and above margin_high; zero without the student's logits (calibration)."""
    cfg = load_config(tiny_config, ["parts.generator_loss=[ce, bns, margin]", "parts.margin_low=0.2",
                                    "parts.margin_high=0.6"])
    torch.manual_seed(0)
    t = torch.randn(8, 10)
    a = (t + torch.randn(8, 10) * torch.linspace(0.1, 5, 8)[:, None]).requires_grad_()
    y = torch.softmax(torch.randn(8, 10), 1)
    loss = generator_margin(GeneratorBatch(t, y, lambda: torch.tensor(0.0), a), cfg)
    d = t - a.detach()
    h = -(torch.softmax(d, 1) * torch.log_softmax(d, 1)).sum(1)
    hn = (h - h.min()) / (torch.log(torch.tensor(10.0)) - h.min())
    expected = torch.relu(0.2 - hn).mean() + torch.relu(hn - 0.6).mean()
    assert torch.allclose(loss, expected) and loss > 0
    loss.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0  # it reaches the student's input side
    assert generator_margin(GeneratorBatch(t, y, lambda: torch.tensor(0.0)), cfg) == 0
    assert compose(cfg, (1, 8, 8)).generator_needs_student and not compose(load_config(tiny_config), (1, 8, 8)).generator_needs_student


def test_margin_trains_the_generator_through_the_student(tiny_config, tiny_teacher, tmp_path):
    """With the margin, the generator's loss has a margin term once the student trains,
    and the run differs from plain Qimera's from then on."""
    base = Trainer(load_config(tiny_config, [f"train.out_dir={tmp_path / 'base'}", "train.epochs=1"]),
                   tiny_teacher).fit().history[-1]
    rec = Trainer(load_config(tiny_config, ["parts.generator_loss=[ce, bns, margin]",
                                            f"train.out_dir={tmp_path / 'm'}", "train.epochs=1"]),
                  tiny_teacher).fit().history[-1]
    assert rec["loss_g_margin"] > 0 and rec["loss_g"] != base["loss_g"]
    assert torch.isfinite(torch.tensor([rec["loss_g"], rec["loss_s"]])).all()


@pytest.mark.parametrize("over, words", [
    (["parts.ema_decay=0.9"], "parts.ema_decay=0.9 is read only with 'ema' in parts.averaging"),
    (["parts.easy_tau=0.3"], "with 'ce_easy' in parts.student_loss"),
    (["parts.student_loss=[kd, ce, ce_easy]"], "list one of them"),
    (["parts.student_loss=[kd, kd]"], "kd listed more than once"),
    (["parts.generator_loss=[ce, nope]"], "unknown generator-loss term; allowed: ce, bns, margin"),
    (["parts.averaging=mean"], "unknown averaging rule; allowed: none, ema, swa"),
    (["parts.margin_low=0.3"], "with 'margin' in parts.generator_loss"),
    (["parts.generator_loss=[ce, bns, margin]", "parts.margin_low=0.8", "parts.margin_high=0.5"],
     "parts.margin_low=0.8 must be below parts.margin_high=0.5"),
    (["parts.image_filter=blur"], "unknown image filter; allowed: none, lowpass"),
    (["parts.averaging=swa", "parts.swa_start_epoch=9"], "parts.swa_start_epoch=9: SWA averages trained epochs"),
    (["parts.student_loss=[]"], "parts.student_loss=[]"),
])
def test_parts_config_errors_name_the_key_and_what_is_allowed(tiny_config, over, words):
    with pytest.raises(ConfigError) as err:
        load_config(tiny_config, over)
    assert words in str(err.value)


def test_swa_starts_after_the_last_lr_step(tiny_config):
    cfg = load_config(tiny_config, ["parts.averaging=swa", "train.epochs=10", "train.lr_milestones=[4, 8]",
                                    "train.warmup_epochs=1"])
    assert swa_start_epoch(cfg) == 9
    assert swa_start_epoch(load_config(tiny_config, ["parts.averaging=swa", "train.lr_milestones=[]",
                                                     "train.warmup_epochs=2", "train.epochs=4"])) == 3


def test_a_run_evaluates_and_returns_the_averaged_student(tiny_config):
    """qimera.run with SWA: the final top-1, the summary and the returned model are the
    average's; the trained student's top-1 is recorded beside it."""
    import qimera
    from qimera.evaluate import evaluate

    res = qimera.run(tiny_config, ["parts.averaging=swa", "naive.enabled=false"])
    last = res.history[-1]
    assert last["averaged_steps"] == 2 * 3 and "top1_trained" in last  # epochs 2-3 (after the lr step at 1)
    assert res.summary()["student_top1"] == round(last["top1"], 4)
    prep = qimera.prepare(tiny_config)
    again = evaluate(res.student_model, prep.eval_data.loader, device=torch.device("cpu"), num_classes=10)
    assert again.top1 == pytest.approx(last["top1"])
