"""Generators, superposition sampling and soft labels."""

import pytest
import torch

from qimera.generators import (
    GEN_BN_EPS,
    ClassMix,
    ConditionalBatchNorm2d,
    Generator,
    pair_mix,
    sample_plain,
    sample_superposed,
)


def test_soft_labels_sum_to_one_and_duplicates_add_up():
    mix = ClassMix(torch.tensor([[3, 3], [1, 2]]), torch.tensor([[0.25, 0.75], [0.4, 0.6]]))
    y = mix.soft_labels(5)
    torch.testing.assert_close(y.sum(1), torch.ones(2))
    assert y[0, 3].item() == pytest.approx(1.0)  # class 3 drawn twice: 0.25 + 0.75
    assert y[1, 1].item() == pytest.approx(0.4) and y[1, 2].item() == pytest.approx(0.6)


def test_superposed_sampling_shapes_and_simplex():
    g = torch.Generator().manual_seed(0)
    mix = sample_superposed(64, 10, 3, generator=g, device="cpu")
    assert mix.labels.shape == (64, 3) and mix.lam.shape == (64, 3)
    torch.testing.assert_close(mix.lam.sum(1), torch.ones(64))
    assert (mix.lam > 0).all()
    torch.testing.assert_close(mix.soft_labels(10).sum(1), torch.ones(64))
    plain = sample_plain(8, 10, generator=g, device="cpu")
    assert plain.labels.shape == (8, 1) and torch.equal(plain.lam, torch.ones(8, 1))


@pytest.mark.parametrize("dm", [0, 1, 2, 4, 8])
def test_dm_layers(dm):
    gen = Generator(10, 64, img_size=32, dm_layers=dm)
    linears = [m for m in gen.dm if isinstance(m, torch.nn.Linear)]
    assert len(linears) == dm
    assert gen.fc.in_features == (100 if dm else 64)
    x = gen(sample_plain(4, 10, generator=None, device="cpu"))
    assert x.shape == (4, 3, 32, 32)


def test_superposition_happens_after_dm():
    torch.manual_seed(0)
    gen = Generator(5, 16, img_size=8, channels=1, dm_layers=2)
    mix = ClassMix(torch.tensor([[0, 3]]), torch.tensor([[0.3, 0.7]]))
    noise = torch.randn(1, 2, 16)
    h = gen.latent(mix, noise)
    u = torch.nn.functional.layer_norm(gen.embedding.weight[[0, 3]] + noise[0], (16,))
    expected = 0.3 * gen.dm(u[0]) + 0.7 * gen.dm(u[1])
    torch.testing.assert_close(h[0], expected)


def test_standardize_per_vector_and_noise_scale():
    gen = Generator(3, 32, img_size=8, dm_layers=0, noise_scale=0.5)
    mix = ClassMix(torch.tensor([[1]]), torch.ones(1, 1))
    noise = torch.randn(1, 1, 32)
    u = gen.latent(mix, noise)
    ref = gen.embedding.weight[1] + 0.5 * noise[0, 0]
    torch.testing.assert_close(u[0], (ref - ref.mean()) / ref.var(unbiased=False).add(1e-5).sqrt())


def test_gdfq_multiplies_noise():
    gen = Generator(3, 8, img_size=8, dm_layers=0, combine="multiply", noise_scale=2.0)
    mix = ClassMix(torch.tensor([[2]]), torch.ones(1, 1))
    noise = torch.randn(1, 1, 8)
    torch.testing.assert_close(gen.latent(mix, noise)[0], gen.embedding.weight[2] * 2.0 * noise[0, 0])


def test_architecture_constants():
    gen = Generator(10, 64, img_size=32)
    assert gen.bn1.bn.eps == GEN_BN_EPS == 0.8 and gen.bn2.bn.eps == 0.8
    assert gen.out_bn.affine is False
    assert gen.fc.out_features == 128 * 8 * 8


def test_teacher_fc_init_copies_weight():
    w = torch.randn(10, 64)
    gen = Generator(10, 64)
    gen.init_embeddings_from(w)
    assert torch.equal(gen.embedding.weight.detach(), w)
    with pytest.raises(ValueError, match="shape"):
        gen.init_embeddings_from(torch.randn(10, 32))


def test_conditional_bn_mixes_gamma_beta_with_lambda():
    cbn = ConditionalBatchNorm2d(4, 3)
    with torch.no_grad():
        cbn.gamma.weight.copy_(torch.arange(12.0).reshape(3, 4))
        cbn.beta.weight.copy_(-torch.arange(12.0).reshape(3, 4))
    x = torch.randn(2, 4, 5, 5)
    mix = ClassMix(torch.tensor([[0, 2], [1, 1]]), torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    out = cbn(x, mix)
    normed = cbn.bn(x)
    g0 = 0.25 * cbn.gamma.weight[0] + 0.75 * cbn.gamma.weight[2]  # Σ λ γ, not averaged over K
    b0 = 0.25 * cbn.beta.weight[0] + 0.75 * cbn.beta.weight[2]
    torch.testing.assert_close(out[0], normed[0] * g0[:, None, None] + b0[:, None, None])
    torch.testing.assert_close(out[1], normed[1] * cbn.gamma.weight[1][:, None, None] + cbn.beta.weight[1][:, None, None])


def test_conditional_bn_mean_is_the_authors_sum_over_k():
    """cbn_mix='mean' (the authors' ImageNet code, SPEC §5.8) divides the λ-weighted γ and β by K."""
    paper, authors = ConditionalBatchNorm2d(4, 3), ConditionalBatchNorm2d(4, 3, mix="mean")
    with torch.no_grad():
        for cbn in (paper, authors):
            cbn.gamma.weight.copy_(torch.arange(12.0).reshape(3, 4) + 1)
            cbn.beta.weight.copy_(torch.arange(12.0).reshape(3, 4))
    x = torch.randn(2, 4, 5, 5)
    mix = ClassMix(torch.tensor([[0, 2], [1, 1]]), torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    normed = paper.bn(x)
    lam = mix.lam / 2
    g = (paper.gamma(mix.labels) * lam[..., None]).sum(1)
    b = (paper.beta(mix.labels) * lam[..., None]).sum(1)
    torch.testing.assert_close(authors(x, mix), normed * g[:, :, None, None] + b[:, :, None, None])
    plain = ClassMix(torch.tensor([[1], [2]]), torch.ones(2, 1))  # K = 1: both forms agree
    torch.testing.assert_close(authors(x, plain), paper(x, plain))
    with pytest.raises(ValueError, match="cbn_mix='avg'"):
        ConditionalBatchNorm2d(4, 3, mix="avg")


def test_generator_without_input_embedding_feeds_the_noise_alone():
    """GDFQ's ImageNet generator (its own code): the class enters through the conditional
    BatchNorm only, so the embedding table has no effect and gets no gradient."""
    gen = Generator(5, 8, img_size=8, conditional_bn=True, combine="multiply", input_embedding=False)
    mix = ClassMix(torch.tensor([[0], [3]]), torch.ones(2, 1))
    noise = torch.randn(2, 1, 8)
    torch.testing.assert_close(gen.latent(mix, noise), gen.dm(noise * gen.noise_scale)[:, 0])
    out = gen(mix, noise)
    with torch.no_grad():
        gen.embedding.weight.mul_(7.0)
    torch.testing.assert_close(gen(mix, noise), out)
    gen(mix, noise).pow(2).mean().backward()
    assert gen.embedding.weight.grad is None and gen.bn1.gamma.weight.grad is not None
    with pytest.raises(ValueError, match="needs the conditional BatchNorm"):
        Generator(5, 8, img_size=8, input_embedding=False)


def test_imagenet_variant_runs_and_backprops_to_embeddings():
    gen = Generator(7, 16, img_size=16, conditional_bn=True)
    g = torch.Generator().manual_seed(0)
    x = gen(sample_superposed(4, 7, 2, generator=g, device="cpu"), generator=g)
    assert x.shape == (4, 3, 16, 16)
    x.pow(2).mean().backward()
    assert gen.embedding.weight.grad is not None
    assert gen.bn1.gamma.weight.grad is not None


def test_pair_mix():
    mix = pair_mix(1, 4, torch.tensor([0.0, 0.5, 1.0]))
    y = mix.soft_labels(5)
    torch.testing.assert_close(y[:, 1], torch.tensor([1.0, 0.5, 0.0]))
    torch.testing.assert_close(y[:, 4], torch.tensor([0.0, 0.5, 1.0]))


def test_initial_embeddings_are_the_seeds_and_not_the_global_rng():
    from types import SimpleNamespace

    from qimera.generators import initial_embeddings

    teacher = SimpleNamespace(num_classes=10, feature_dim=64, fc_weight=torch.randn(10, 64))
    torch.manual_seed(0)
    a = initial_embeddings("random", teacher, 3)
    torch.manual_seed(1)
    b = initial_embeddings("random", teacher, 3)
    assert a.shape == (10, 64) and torch.equal(a, b)  # another process draws the same table
    assert not torch.equal(a, initial_embeddings("random", teacher, 4))
    assert torch.equal(initial_embeddings("teacher_fc", teacher, 3), teacher.fc_weight)


# ----------------------------------------------------------------- sides not divisible by 4


def test_generated_side_rounds_up_to_a_multiple_of_4():
    from qimera.generators import generated_side

    assert [generated_side((3, s, s)) for s in (32, 224, 299, 30, 1)] == [32, 224, 300, 32, 4]
    with pytest.raises(ValueError, match=r"teacher input size \(3, 224, 200\): the generator makes square images"):
        generated_side((3, 224, 200))


def test_center_crop_window():
    from qimera.generators import center_crop

    x = torch.arange(36.0).reshape(1, 1, 6, 6)
    assert torch.equal(center_crop(x, 3), x[..., 1:4, 1:4])  # offset (6 - 3) // 2
    assert torch.equal(center_crop(x, 5), x[..., :5, :5])  # odd surplus: extra row/column left out at the end
    assert center_crop(x, 6) is not None and torch.equal(center_crop(x, 6), x)


def test_generator_for_a_299_teacher_generates_300_and_crops():
    gen = Generator(5, 16, img_size=299, conditional_bn=True)
    assert (gen.img_size, gen.generated_size, gen.init_size) == (299, 300, 75)
    assert gen.fc.out_features == 128 * 75 * 75
    g = torch.Generator().manual_seed(0)
    x = gen(sample_superposed(2, 5, 2, generator=g, device="cpu"), generator=g)
    assert x.shape == (2, 3, 299, 299)
    # cropped before the output BatchNorm: the images the teacher sees are standardised
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.var((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-2, rtol=0)  # eps 1e-5
    x.mean().backward()
    assert gen.embedding.weight.grad is not None


def test_generator_sizes_divisible_by_4_are_not_cropped():
    gen = Generator(3, 8, img_size=32)
    assert (gen.generated_size, gen.init_size) == (32, 8)
