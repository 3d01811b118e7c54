"""The GPU paths (skipped without CUDA): fake quantization, a bf16 training run with resume,
and the CUDA-trained student moved to the CPU and exported."""

import pytest
import torch

from qimera.baselines import calibrate, gaussian_batches
from qimera.config import load_config
from qimera.data import load_eval_data
from qimera.evaluate import evaluate
from qimera.quant import QuantRecipe, quantize_model
from qimera.quant.functional import fake_quant, fake_quant_reference, per_channel_minmax
from qimera.trainer import CHECKPOINT_NAME, Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_fake_quant_on_cuda_matches_cpu_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, 8, 8, generator=g) * 3
    lo, hi = per_channel_minmax(x.transpose(0, 1).contiguous())
    lo, hi = lo.reshape(1, -1, 1, 1), hi.reshape(1, -1, 1, 1)
    for bits in (2, 4, 5, 8):
        ref = fake_quant_reference(x, lo, hi, bits)
        got = fake_quant(x.cuda(), lo.cuda(), hi.cuda(), bits).cpu()
        assert (got != ref).float().mean() < 1e-4  # at most a rare rounding-boundary flip
        assert (got - ref).abs().max() <= (hi - lo).max() / (2 ** bits - 1) + 1e-6
        bf = fake_quant(x.cuda().bfloat16(), lo.cuda(), hi.cuda(), bits)
        assert bf.dtype == torch.bfloat16


def test_bf16_training_on_cuda_resumes_and_exports_on_cpu(tiny_config, tiny_teacher, tmp_path):
    cfg = load_config(tiny_config, ["train.device=cuda", "train.amp=bf16", f"train.out_dir={tmp_path / 'a'}"])
    trainer = Trainer(cfg, tiny_teacher)
    res = trainer.fit()
    assert [r["epoch"] for r in res.history] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss_s"])) for r in res.history if r.get("loss_s") is not None)
    assert next(trainer.student.parameters()).is_cuda
    state = torch.load(tmp_path / "a" / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert state["epoch"] == 3
    again = Trainer(cfg, tiny_teacher).fit()  # a finished run resumes to nothing
    assert again.resumed_from_epoch == 3 and again.iterations == 0

    data = load_eval_data("digits", batch_size=256)
    on_gpu = evaluate(trainer.student, data.loader, device="cuda", num_classes=10)
    student = trainer.student.cpu().float()
    on_cpu = evaluate(student, data.loader, num_classes=10)
    assert abs(on_gpu.top1 - on_cpu.top1) <= 1.0

    from qimera.export import export_integer, load_integer

    export_integer(student, tmp_path / "int", arch=tiny_config["teacher"]["arch"],
                   arch_kwargs={"num_classes": 10})
    x, _ = next(iter(data.loader))
    with torch.no_grad():
        assert (load_integer(tmp_path / "int")(x) - student(x)).abs().max() <= 1e-5


def test_calibration_on_cuda_matches_cpu(tiny_teacher):
    noise = list(gaussian_batches(2, 32, (1, 8, 8), seed=5))  # the same images on both devices
    ranges = []
    for device in ("cpu", "cuda"):
        student, _ = quantize_model(tiny_teacher.model, QuantRecipe(4, 4))
        calibrate(student.to(device), [b.to(device) for b in noise])
        ranges.append(torch.stack([torch.stack(m.range) for n, m in student.named_modules()
                                   if n.startswith("act_quant")]).cpu())
    assert torch.allclose(ranges[0], ranges[1], rtol=1e-4, atol=1e-5)
