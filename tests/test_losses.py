"""Soft CE, KD scaling and the BNS loss."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qimera.losses import BNStatsHook, kd_loss, soft_cross_entropy


def test_soft_ce_equals_hard_ce_for_one_hot():
    logits = torch.randn(6, 4)
    labels = torch.tensor([0, 3, 1, 1, 2, 0])
    torch.testing.assert_close(soft_cross_entropy(logits, F.one_hot(labels, 4).float()), F.cross_entropy(logits, labels))


def test_kd_mean_reduction_is_batchmean_over_classes():
    g = torch.Generator().manual_seed(0)
    a, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    mean = kd_loss(a, t, 20.0, "mean")
    batchmean = kd_loss(a, t, 20.0, "batchmean")
    torch.testing.assert_close(mean * 10, batchmean)
    assert kd_loss(t, t).abs().item() < 1e-4  # zero up to float error x tau^2 = 400


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv(self.bn1(x)))


def test_bns_loss_zero_when_statistics_match():
    net = _Net().eval()
    x = torch.randn(64, 3, 5, 5) * 2 + 1
    hook = BNStatsHook(net)
    net(x)
    # set the running statistics to exactly the batch's input statistics
    with torch.no_grad():
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        net.bn1.running_mean.copy_(mean)
        net.bn1.running_var.copy_(var)
        h = net.conv(net.bn1(x))
        var2, mean2 = torch.var_mean(h, dim=(0, 2, 3), correction=0)
        net.bn2.running_mean.copy_(mean2)
        net.bn2.running_var.copy_(var2)
    net(x)
    assert hook.loss().item() == pytest.approx(0.0, abs=1e-10)
    net(x + 1.0)
    assert hook.loss().item() > 0.1


def test_bns_loss_value_and_gradient_to_input():
    net = _Net().eval()
    hook = BNStatsHook(net)
    x = torch.randn(16, 3, 4, 4, requires_grad=True)
    net(x)
    loss = hook.loss()
    var, mean = torch.var_mean(x.detach(), dim=(0, 2, 3), correction=0)
    l1 = F.mse_loss(mean, torch.zeros(3)) + F.mse_loss(var, torch.ones(3))
    assert loss.item() > 0 and loss.item() >= l1.item() / 2 - 1e-6
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_model_without_bn_rejected():
    with pytest.raises(ValueError, match="BatchNorm2d"):
        BNStatsHook(nn.Sequential(nn.Conv2d(1, 1, 1)))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channel_mean_var_matches_var_mean(channels_last, dtype):
    from qimera.losses import channel_mean_var

    x = (torch.randn(8, 5, 6, 7) * 3 + 2).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, var = channel_mean_var(x)
    rv, rm = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, rm)
    torch.testing.assert_close(var, rv)
    assert mean.dtype == torch.float32
