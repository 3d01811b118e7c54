"""Training loop: phases, frozen embeddings, checkpoints and exact resume on CPU."""

import json

import pytest
import torch

from qimera.config import load_config
from qimera.quant import act_quantizers
from qimera.trainer import CHECKPOINT_NAME, HISTORY_NAME, Trainer


class Kill(Exception):
    pass


def _strip_timing(history):
    return [{k: v for k, v in r.items() if k not in ("seconds", "iters_per_second")} for r in history]


def test_resume_reproduces_uninterrupted_run_exactly(tiny_config, tiny_teacher, tmp_path):
    cfg_a = load_config(tiny_config, [f"train.out_dir={tmp_path / 'a'}"])
    full = Trainer(cfg_a, tiny_teacher)
    res_a = full.fit()

    cfg_b = load_config(tiny_config, [f"train.out_dir={tmp_path / 'b'}"])

    def kill_after_two(record):
        if record["epoch"] == 2:
            raise Kill

    with pytest.raises(Kill):
        Trainer(cfg_b, tiny_teacher, callbacks=(kill_after_two,)).fit()
    state = torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=True)
    assert state["epoch"] == 2
    resumed = Trainer(cfg_b, tiny_teacher)
    res_b = resumed.fit()
    assert res_b.resumed_from_epoch == 2 and res_b.iterations == 3  # one epoch left

    for name in ("student", "generator"):
        sa = getattr(full, name).state_dict()
        sb = getattr(resumed, name).state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k} differs after resume"
    assert _strip_timing(res_a.history) == _strip_timing(res_b.history)
    lines = (tmp_path / "b" / HISTORY_NAME).read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]


def test_same_seed_same_numbers_different_seed_differs(tiny_config, tiny_teacher, tmp_path):
    runs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        cfg = load_config(tiny_config, [f"train.out_dir={tmp_path / name}", f"train.seed={seed}",
                                        "train.epochs=2"])
        runs.append(Trainer(cfg, tiny_teacher).fit().history)
    assert _strip_timing(runs[0]) == _strip_timing(runs[1])
    assert _strip_timing(runs[0]) != _strip_timing(runs[2])


def test_phases_calibration_warmup_and_frozen_embeddings(tiny_config, tiny_teacher):
    cfg = load_config(tiny_config, ["generator.freeze_embeddings=true", "train.epochs=3",
                                    "train.calibration_epochs=1", "train.warmup_epochs=2"])
    tr = Trainer(cfg, tiny_teacher)
    emb0 = tr.generator.embedding.weight.detach().clone()
    torch.testing.assert_close(emb0, tiny_teacher.fc_weight)  # teacher_fc initialisation
    student0 = {k: v.clone() for k, v in tr.student.state_dict().items()}

    tr.run_epoch()  # epoch 0: calibrating, student not trained
    steps = [q.steps.item() for q in act_quantizers(tr.student)]
    assert all(s == 3 for s in steps)  # one observation per iteration
    weights_same = all(torch.equal(student0[k], v) for k, v in tr.student.state_dict().items()
                       if "act_quant" not in k)
    assert weights_same
    ranges = [tuple(t.clone() for t in q.range) for q in act_quantizers(tr.student)]

    tr.run_epoch()  # epoch 1: ranges frozen, still warm-up
    tr.run_epoch()  # epoch 2: student trained
    for q, (lo, hi) in zip(act_quantizers(tr.student), ranges):
        assert torch.equal(q.range[0], lo) and torch.equal(q.range[1], hi)
        assert q.steps.item() == 3
    assert torch.equal(tr.generator.embedding.weight, emb0)  # frozen embeddings do not move
    assert any(not torch.equal(student0[k], v) for k, v in tr.student.state_dict().items())
    assert [r["student_trained"] for r in tr.history] == [False, False, True]
    tr.close()


def test_embeddings_train_when_not_frozen(tiny_config, tiny_teacher):
    cfg = load_config(tiny_config, ["train.epochs=1"])
    tr = Trainer(cfg, tiny_teacher)
    emb0 = tr.generator.embedding.weight.detach().clone()
    tr.fit()
    assert not torch.equal(tr.generator.embedding.weight, emb0)


def test_evaluation_does_not_move_activation_ranges(tiny_config, tiny_teacher):
    from qimera.data import load_eval_data

    data = load_eval_data("digits", batch_size=256)
    cfg = load_config(tiny_config, ["train.epochs=1", "train.calibration_epochs=1"])
    tr = Trainer(cfg, tiny_teacher, data)
    tr.run_epoch()
    steps = [q.steps.item() for q in act_quantizers(tr.student)]
    assert all(s == 3 for s in steps)  # the 540 test images were not observed
    assert "top1" in tr.history[-1] and "top5" in tr.history[-1]
    tr.close()


def test_checkpoint_of_other_config_refused(tiny_config, tiny_teacher, tmp_path):
    cfg = load_config(tiny_config, ["train.epochs=1"])
    Trainer(cfg, tiny_teacher).fit()
    other = load_config(tiny_config, ["train.epochs=2", "quant.a_bits=5"])
    with pytest.raises(ValueError, match="different configuration"):
        Trainer(other, tiny_teacher).fit()
    # more epochs with the same settings resumes
    longer = load_config(tiny_config, ["train.epochs=2"])
    res = Trainer(longer, tiny_teacher).fit()
    assert res.resumed_from_epoch == 1 and len(res.history) == 2


def test_teacher_not_in_checkpoint_and_loads_weights_only(tiny_config, tiny_teacher):
    cfg = load_config(tiny_config, ["train.epochs=1"])
    tr = Trainer(cfg, tiny_teacher)
    tr.fit()
    state = torch.load(tr.checkpoint_path, weights_only=True)
    assert set(state) >= {"student", "generator", "opt_s", "opt_g", "sched_s", "sched_g", "rng", "history"}
    assert "teacher" not in state
    assert any("act_quant" in k and k.endswith("max_avg") for k in state["student"])


@pytest.mark.parametrize("p, k", [(1.0, 10), (0.0, 2)])  # k=1 with p > 0 is refused (test_config.py)
def test_superposed_or_plain_batches_anywhere(tiny_config, tiny_teacher, p, k):
    # p=1: every batch, the last of each epoch included, is superposed (the authors'
    # code crashes there on NumPy >= 1.25); K may equal the number of classes
    cfg = load_config(tiny_config, [f"generator.p={p}", f"generator.k={k}", "train.epochs=2"])
    tr = Trainer(cfg, tiny_teacher)
    mix = tr.sample_mix()
    assert mix.labels.shape == (16, k if p == 1.0 else 1)
    res = tr.fit()
    assert len(res.history) == 2
    assert all(torch.isfinite(torch.tensor(r["loss_g"])) for r in res.history)


def test_initial_embeddings_from_elsewhere(tiny_config, tiny_teacher):
    cfg = load_config(tiny_config, ["generator.embedding_init=random", "generator.freeze_embeddings=true"])
    table = torch.arange(10 * 64, dtype=torch.float32).reshape(10, 64)
    tr = Trainer(cfg, tiny_teacher, initial_embeddings=table)
    assert torch.equal(tr.generator.embedding.weight.detach(), table)
    with pytest.raises(ValueError, match="shape"):
        Trainer(cfg, tiny_teacher, initial_embeddings=torch.zeros(10, 3))
    tr.close()


def test_amp_auto_resolves_per_device(tiny_config, tiny_teacher, monkeypatch):
    from qimera import trainer as tr_mod

    cpu = torch.device("cpu")
    assert tr_mod.resolve_amp("none", cpu) == "none" and tr_mod.resolve_amp("bf16", cpu) == "bf16"
    monkeypatch.setattr(tr_mod, "bf16_is_fast", lambda device: False)
    assert tr_mod.resolve_amp("auto", cpu) == "none"
    tr = Trainer(load_config(tiny_config, ["train.amp=auto"]), tiny_teacher)
    assert tr.amp == "none" and not tr.channels_last
    tr.close()
    monkeypatch.setattr(tr_mod, "bf16_is_fast", lambda device: True)
    cuda = torch.device("cuda")
    assert tr_mod.resolve_amp("auto", cuda, (3, 32, 32)) == "none"  # launch-bound: fp32/TF32 is faster
    assert tr_mod.resolve_amp("auto", cuda, (3, 224, 224)) == "bf16"
    assert tr_mod.resolve_amp("auto", cpu, (3, 32, 32)) == "bf16"
    tr = Trainer(load_config(tiny_config, ["train.amp=auto", "train.epochs=1"]), tiny_teacher)
    assert tr.amp == "bf16" and tr.channels_last
    res = tr.fit()  # one bf16 epoch runs end to end
    assert torch.isfinite(torch.tensor(res.history[-1]["loss_s"]))


def test_resume_status_is_the_one_answer_to_may_this_run_continue(tiny_config, tiny_teacher, tmp_path):
    out = tmp_path / "r"
    cfg = load_config(tiny_config, [f"train.out_dir={out}", "train.epochs=1"])
    extra = {"teacher_sha256": "aaa"}
    trainer = Trainer(cfg, tiny_teacher, extra_fingerprint=extra)
    assert trainer.resume_status().state == "none" and not trainer.resume_status().found
    trainer.fit()

    again = Trainer(cfg, tiny_teacher, extra_fingerprint=extra).resume_status()
    assert again.resumable and again.epoch == 1 and [r["epoch"] for r in again.history] == [1]
    fewer = load_config(tiny_config, [f"train.out_dir={out}", "train.epochs=1"])
    more = load_config(tiny_config, [f"train.out_dir={out}", "train.epochs=3"])
    assert Trainer(more, tiny_teacher, extra_fingerprint=extra).resume_status().resumable
    assert Trainer(fewer, tiny_teacher, extra_fingerprint={"teacher_sha256": "bbb"}).resume_status().state == "mismatch"
    other_seed = load_config(tiny_config, [f"train.out_dir={out}", "train.epochs=1", "train.seed=9"])
    assert Trainer(other_seed, tiny_teacher, extra_fingerprint=extra).resume_status().state == "mismatch"
    no_resume = load_config(tiny_config, [f"train.out_dir={out}", "train.resume=false"])
    assert Trainer(no_resume, tiny_teacher, extra_fingerprint=extra).resume_status().state == "disabled"

    # a checkpoint of more epochs than asked is reported as such
    ahead = Trainer(more, tiny_teacher, extra_fingerprint=extra)
    ahead.fit()
    status = Trainer(fewer, tiny_teacher, extra_fingerprint=extra).resume_status()
    assert status.state == "ahead" and "3 epochs, more than train.epochs=1" in status.reason

    # an unreadable checkpoint; discard_checkpoint leaves nothing to resume
    tr = Trainer(fewer, tiny_teacher, extra_fingerprint=extra)
    tr.checkpoint_path.write_bytes(b"not a checkpoint")
    assert tr.resume_status().state == "unreadable"
    tr.discard_checkpoint()
    assert not tr.checkpoint_path.exists() and not tr.history_path.exists()
    assert tr.resume_status().state == "none"


def test_epoch_diagnostics_of_the_generated_samples(tiny_config, tiny_teacher):
    """Each epoch records the teacher's agreement with the intended class on plain and on
    superposed batches, its mean largest probability and the mean largest soft label
    (issue 20), computed from the step's own teacher logits and labels."""
    cfg = load_config(tiny_config, ["generator.p=0.5", "generator.k=2"])
    tr = Trainer(cfg, tiny_teacher)
    seen = []
    step = tr._generator_step

    def spy(labels, lam, noise, y, with_student=False):
        out = step(labels, lam, noise, y, with_student)
        seen.append((labels.shape[1] > 1, out[3].detach(), y))
        return out

    tr._generator_step = spy
    record = tr.run_epoch()
    for kind, superposed in (("plain", False), ("superposed", True)):
        batches = [(t, y) for s, t, y in seen if s == superposed]
        key = f"teacher_agree_{kind}"
        if not batches:
            assert key not in record
            continue
        hits = sum(int((t.argmax(1) == y.argmax(1)).sum()) for t, y in batches)
        assert record[key] == pytest.approx(100.0 * hits / sum(len(t) for t, _ in batches))
    t = torch.cat([t for _, t, _ in seen])
    y = torch.cat([y for _, _, y in seen])
    assert record["teacher_max_prob"] == pytest.approx(float(torch.softmax(t, 1).max(1).values.mean()), rel=1e-5)
    assert record["label_max"] == pytest.approx(float(y.max(1).values.mean()), rel=1e-5)
    # plain batches only: every soft label is one-hot, and no superposed agreement is recorded
    plain = Trainer(load_config(tiny_config, ["generator.p=0.0"]), tiny_teacher).run_epoch()
    assert plain["label_max"] == 1.0 and "teacher_agree_superposed" not in plain
    assert 0.0 <= plain["teacher_agree_plain"] <= 100.0 and 0.1 <= plain["teacher_max_prob"] <= 1.0


def test_a_teacher_changed_in_place_is_not_resumed(tiny_config, tmp_path):
    """The fingerprint holds the teacher's weights, not its path: the same file rewritten
    with other weights between a run and its resume is refused, naming the teacher."""
    from qimera.teachers import load_teacher

    weights = tmp_path / "teacher.pt"
    weights.write_bytes(open(tiny_config["teacher"]["weights"], "rb").read())
    config = {**tiny_config, "teacher": {**tiny_config["teacher"], "weights": str(weights)}}
    t = config["teacher"]

    def teacher():
        return load_teacher("checkpoint", arch=t["arch"], weights=t["weights"], num_classes=10,
                            input_size=(1, 8, 8), mean=(0.3,), std=(0.4,))

    Trainer(load_config(config, ["train.epochs=1"]), teacher()).fit()
    longer = load_config(config, ["train.epochs=2"])
    assert Trainer(longer, teacher()).resume_status().resumable  # the same bytes: resumed
    state = torch.load(weights, weights_only=True)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] + 0.01
    torch.save(state, weights)
    status = Trainer(longer, teacher()).resume_status()
    assert status.state == "mismatch" and "other teacher weights" in status.reason, status.reason
    with pytest.raises(ValueError, match="other teacher weights.*teacher.weights="):
        Trainer(longer, teacher()).fit()


def test_a_resume_on_other_evaluation_data_is_recorded_in_the_history(tiny_config, tiny_teacher, capsys):
    """data may change on resume (RESUME_MAY_CHANGE), but every evaluated epoch names its
    evaluation set, and the resume says that it changed."""
    from qimera.data import load_eval_data

    def data(limit):
        return load_eval_data(load_config(tiny_config, [f"data.limit={limit}"]).data, default_mean=(0.3,),
                              default_std=(0.4,))

    Trainer(load_config(tiny_config, ["train.epochs=1", "data.limit=64"]), tiny_teacher, data(64)).fit()
    tr = Trainer(load_config(tiny_config, ["train.epochs=2", "data.limit=7"]), tiny_teacher, data(7))
    res = tr.fit()
    assert res.resumed_from_epoch == 1
    assert [(r["epoch"], r["eval_images"]) for r in res.history] == [(1, 64), (2, 7)]
    assert res.history[0]["eval_set"] != res.history[1]["eval_set"]
    err = capsys.readouterr().err
    assert "resuming with another evaluation set: epoch 1 was evaluated on 64 images" in err
    assert tr.eval_set_change and "on 7 images" in tr.eval_set_change


def test_an_integer_exact_run_reports_the_int8_forms_top1_and_the_fake_quant_one_beside_it(tiny_config):
    """quant.integer_exact: every evaluated epoch's top-1 is the integer-exact form's
    (what the int8 file computes), with the same weights' fake-quant top-1 beside it; the
    training itself is the paper's (same losses as the paper's recipe at the same seed)."""
    import qimera
    from qimera.evaluate import evaluate
    from qimera.export.onnx_int8 import int8_model
    from qimera.trainer import FAKE_QUANT_KEY

    exact = qimera.run(tiny_config, ["quant.integer_exact=true", "naive.enabled=false"])
    paper = qimera.run(tiny_config, ["naive.enabled=false", "train.out_dir=" + tiny_config["train"]["out_dir"] + "-p"])
    last = exact.history[-1]
    assert FAKE_QUANT_KEY in last and FAKE_QUANT_KEY not in paper.history[-1]
    assert [r["loss_s"] for r in exact.history] == [r["loss_s"] for r in paper.history]
    assert last[FAKE_QUANT_KEY] == pytest.approx(paper.history[-1]["top1"])
    prep = qimera.prepare(tiny_config)
    twin = evaluate(int8_model(exact.student_model)[0], prep.eval_data.loader, num_classes=10)
    assert twin.top1 == pytest.approx(last["top1"]) and exact.summary()["student_top1"] == round(last["top1"], 4)
