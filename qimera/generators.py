"""Conditional generators (SPEC §2) and the class-mixture sampler behind superposition.

A batch of generator inputs is described by a :class:`ClassMix`: for every sample ``K``
class indices and ``K`` mixing coefficients ``λ`` (``K = 1``, ``λ = 1`` for a plain
batch). The generator embeds each slot, maps it through the disentanglement mapping (DM)
and sums the slots with ``λ`` **after** the DM layers; the ImageNet variant mixes its
class-conditional BatchNorm ``γ``/``β`` with the same ``λ``. The soft label of a sample
is ``Σ_k λ_k · onehot(c_k)`` (scatter-add: a class drawn twice adds up).

Choices where the paper is silent (documented in README):

* ``standardize`` is ``F.layer_norm`` over the D features without affine (eps 1e-5),
  i.e. per vector, per superposition slot - not the authors' BatchNorm1d over the batch
  (SPEC §5.5).
* Between stacked DM layers stands LeakyReLU(0.2); there is none after the last one.
* GDFQ's variant multiplies embedding and noise (``E[c] ⊙ σ_z·ε``) and does not
  standardize; it has no DM layers and is never superposed. Its ImageNet generator feeds
  the noise alone (``generator.input_embedding: auto``): in GDFQ's own code the class
  enters through the conditional BatchNorm only.
* The conditional BatchNorm mixes ``γ``/``β`` as Σλγ (``generator.cbn_mix: sum``, the
  paper); ``mean`` gives the authors' released Σλγ/K.
* The network doubles its side twice, so it makes sides divisible by 4. A teacher whose
  side is not (Inception-v3: 299) gets images generated at the next multiple of 4 (300)
  and centre-cropped (:func:`generated_side`, :meth:`Generator.forward`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import upsample2x_conv3x3

#: eps of the two hidden BatchNorm2d layers. Inherited from the DCGAN/ACGAN code that
#: GDFQ and Qimera descend from, where 0.8 was meant as the momentum argument. Kept for
#: fidelity with the published numbers.
GEN_BN_EPS = 0.8
DM_WIDTH = 100
LEAKY_SLOPE = 0.2


def generated_side(input_size: Sequence[int]) -> int:
    """The side the generator network works at for a teacher input ``(C, H, W)``: the
    smallest multiple of 4 that is at least ``H`` (its two ×2 upsamplings start from
    ``side / 4``); the output is then centre-cropped to ``H``, which wastes at most 3
    rows and columns (299 -> 300 for Inception-v3).

    Raises:
        ValueError: the input is not square (the generator makes square images); the
            message says so with the size.
    """
    _, h, w = (int(v) for v in input_size)
    if h != w or h < 1:
        raise ValueError(
            f"teacher input size {tuple(int(v) for v in input_size)}: the generator makes square images "
            "(height = width); set teacher.input_size to a square size"
        )
    return -(-h // 4) * 4


def center_crop(x: torch.Tensor, side: int) -> torch.Tensor:
    """The central ``side × side`` window of NCHW ``x``; an odd surplus leaves the extra
    row/column at the bottom/right (offset ``(S - side) // 2``)."""
    top = (x.shape[-2] - side) // 2
    left = (x.shape[-1] - side) // 2
    return x[..., top: top + side, left: left + side]


@dataclass
class ClassMix:
    """Per-sample class slots: ``labels`` (B, K) int64 and ``lam`` (B, K) float32."""

    labels: torch.Tensor
    lam: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]

    def soft_labels(self, num_classes: int) -> torch.Tensor:
        """``y = Σ_k λ_k onehot(c_k)``, scatter-added so duplicate classes add up."""
        y = torch.zeros(self.labels.shape[0], num_classes, device=self.lam.device, dtype=self.lam.dtype)
        return y.scatter_add_(1, self.labels, self.lam)


def sample_plain(batch_size: int, num_classes: int, *, generator: torch.Generator | None, device) -> ClassMix:
    labels = torch.randint(num_classes, (batch_size, 1), generator=generator, device=device)
    return ClassMix(labels, torch.ones(batch_size, 1, device=device))


def sample_superposed(
    batch_size: int, num_classes: int, k: int, *, generator: torch.Generator | None, device
) -> ClassMix:
    """K labels uniformly with replacement, weights :func:`mix_weights`."""
    labels = torch.randint(num_classes, (batch_size, k), generator=generator, device=device)
    return ClassMix(labels, mix_weights(batch_size, k, generator=generator, device=device))


def mix_weights(batch_size: int, k: int, *, generator: torch.Generator | None, device) -> torch.Tensor:
    """The superposition weights of ``batch_size`` samples: ``λ = softmax(g)``, ``g ~ N(0, I_K)``."""
    return torch.softmax(torch.randn(batch_size, k, generator=generator, device=device), dim=1)


def pair_mix(c1: int, c2: int, lam: torch.Tensor) -> ClassMix:
    """Two-class mixtures ``(1-λ)·c1 + λ·c2`` for a vector of λ (figures 3/5/6)."""
    lam = lam.float().reshape(-1)
    n = lam.numel()
    labels = torch.tensor([c1, c2], device=lam.device).expand(n, 2).clone()
    return ClassMix(labels, torch.stack([1.0 - lam, lam], dim=1))


class ConditionalBatchNorm2d(nn.Module):
    """Non-affine BatchNorm2d followed by per-class ``γ``/``β`` mixed with ``λ``."""

    def __init__(self, num_features: int, num_classes: int, eps: float = 1e-5, mix: Literal["sum", "mean"] = "sum"):
        super().__init__()
        if mix not in ("sum", "mean"):
            raise ValueError(f"generator.cbn_mix={mix!r}: allowed 'sum', 'mean'")
        #: ``sum``: Σλγ (the paper); ``mean``: Σλγ/K (the authors' ImageNet code)
        self.mix = mix
        self.bn = nn.BatchNorm2d(num_features, eps=eps, affine=False)
        self.gamma = nn.Embedding(num_classes, num_features)
        self.beta = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: torch.Tensor, mix: ClassMix) -> torch.Tensor:
        lam = mix.lam.unsqueeze(-1)
        if self.mix == "mean":  # the authors' form: the λ-weighted slots averaged over K
            lam = lam / mix.labels.shape[1]
        gamma = (self.gamma(mix.labels) * lam).sum(1)
        beta = (self.beta(mix.labels) * lam).sum(1)
        return self.bn(x) * gamma[:, :, None, None] + beta[:, :, None, None]


class _Affine(nn.Module):
    """Plain BatchNorm2d with the (unused) class-mix argument of the conditional one."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=eps)

    def forward(self, x: torch.Tensor, mix: ClassMix) -> torch.Tensor:
        return self.bn(x)


class Generator(nn.Module):
    """The CIFAR (``conditional_bn=False``) and ImageNet (``True``) generators of SPEC §2.

    Args:
        num_classes: C.
        embed_dim: D, the width of the class embeddings (the teacher's FC input width).
        img_size: output side ``s``; the network works at :func:`generated_side` (``s``
            rounded up to a multiple of 4) and centre-crops to ``s``.
        channels: output channels (3 for RGB, 1 for the digits demo).
        dm_layers: L, number of disentanglement-mapping layers (width 100); 0 = none.
        noise_scale: σ_z.
        combine: ``"add"`` (Qimera: ``standardize(E[c] + σ_z ε)``) or ``"multiply"``
            (GDFQ: ``E[c] ⊙ σ_z ε``).
        conditional_bn: class-conditional BatchNorm (ImageNet variant).
        cbn_mix: how that BatchNorm mixes a superposed sample's ``γ``/``β``: ``"sum"``
            (Σλγ, the paper) or ``"mean"`` (Σλγ/K, the authors' code).
        input_embedding: whether the class embedding enters at the input; False (only
            with ``conditional_bn``) feeds the noise alone, as GDFQ's ImageNet generator.
    """

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        img_size: int = 32,
        channels: int = 3,
        dm_layers: int = 1,
        noise_scale: float = 1.0,
        combine: Literal["add", "multiply"] = "add",
        conditional_bn: bool = False,
        cbn_mix: Literal["sum", "mean"] = "sum",
        input_embedding: bool = True,
    ):
        super().__init__()
        side = generated_side((channels, img_size, img_size))
        if combine not in ("add", "multiply"):
            raise ValueError(f"generator.combine={combine!r}: allowed 'add', 'multiply'")
        if not input_embedding and not conditional_bn:
            raise ValueError("a generator without its input embedding needs the conditional BatchNorm "
                             "(the ImageNet variant): the class would enter nowhere")
        self.input_embedding = bool(input_embedding)
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.img_size = img_size
        #: the side the network generates before the centre crop to ``img_size``
        self.generated_size = side
        self.channels = channels
        self.noise_scale = float(noise_scale)
        self.combine = combine
        self.conditional_bn = conditional_bn
        self.init_size = side // 4

        self.embedding = nn.Embedding(num_classes, embed_dim)
        nn.init.normal_(self.embedding.weight)  # N(0, 1), the "random" initialisation
        dm: list[nn.Module] = []
        width = embed_dim
        for i in range(dm_layers):
            if i:
                dm.append(nn.LeakyReLU(LEAKY_SLOPE))
            dm.append(nn.Linear(width, DM_WIDTH))
            width = DM_WIDTH
        self.dm = nn.Sequential(*dm)
        self.fc = nn.Linear(width, 128 * self.init_size**2)

        def norm(c: int, eps: float) -> nn.Module:
            return ConditionalBatchNorm2d(c, num_classes, eps, cbn_mix) if conditional_bn else _Affine(c, eps)

        self.bn0 = norm(128, 1e-5)
        self.conv1 = nn.Conv2d(128, 128, 3, stride=1, padding=1)
        self.bn1 = norm(128, GEN_BN_EPS)
        self.conv2 = nn.Conv2d(128, 64, 3, stride=1, padding=1)
        self.bn2 = norm(64, GEN_BN_EPS)
        self.conv3 = nn.Conv2d(64, channels, 3, stride=1, padding=1)
        self.out_bn = nn.BatchNorm2d(channels, affine=False)
        #: memory format of the feature maps (channels_last pays off with oneDNN bf16
        #: kernels and tensor cores); set by :meth:`set_memory_format`
        self.memory_format = torch.contiguous_format
        #: compute upsample + conv as one phase-decomposed convolution (same maths)
        self.fused_upsample = True

    def set_memory_format(self, memory_format: torch.memory_format) -> "Generator":
        self.memory_format = memory_format
        return self.to(memory_format=memory_format)

    # -- embedding path -------------------------------------------------------------
    def sample_noise(self, mix: ClassMix, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """The noise :meth:`latent` combines with the embeddings, (B, K, D): drawn here when
        the caller samples outside a compiled region (a traced graph takes no
        ``torch.Generator``), the same numbers :meth:`latent` would draw itself."""
        w = self.embedding.weight
        return torch.randn((*mix.labels.shape, w.shape[1]), generator=generator, device=w.device, dtype=w.dtype)

    def latent(self, mix: ClassMix, noise: torch.Tensor | None = None, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mixed DM output ``Σ_k λ_k DM(u_k)`` of shape (B, width)."""
        if noise is None:
            noise = self.sample_noise(mix, generator=generator)
        noise = noise * self.noise_scale
        if not self.input_embedding:  # the class enters through the conditional BatchNorm only
            u = F.layer_norm(noise, (self.embed_dim,)) if self.combine == "add" else noise
        elif self.combine == "add":
            u = F.layer_norm(self.embedding(mix.labels) + noise, (self.embed_dim,))
        else:
            u = self.embedding(mix.labels) * noise
        h = self.dm(u)  # (B, K, W)
        if h.shape[1] == 1:
            return h[:, 0]
        return torch.einsum("bk,bkw->bw", mix.lam.to(h.dtype), h)

    def forward(self, mix: ClassMix, noise: torch.Tensor | None = None, *, generator: torch.Generator | None = None) -> torch.Tensor:
        h = self.fc(self.latent(mix, noise, generator=generator))
        x = h.view(h.shape[0], 128, self.init_size, self.init_size).contiguous(memory_format=self.memory_format)
        x = self.bn0(x, mix)
        x = F.leaky_relu(self.bn1(self._up_conv(self.conv1, x), mix), LEAKY_SLOPE)
        x = F.leaky_relu(self.bn2(self._up_conv(self.conv2, x), mix), LEAKY_SLOPE)
        x = torch.tanh(self.conv3(x))
        if self.generated_size != self.img_size:
            # crop before the output BatchNorm, so that the images the teacher sees are the
            # standardised ones
            x = center_crop(x, self.img_size)
        return self.out_bn(x)

    def _up_conv(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """Nearest ×2 upsampling then ``conv``; by default as one exact, 2.25× cheaper
        phase-decomposed convolution (:func:`qimera.ops.upsample2x_conv3x3`)."""
        if self.fused_upsample:
            return upsample2x_conv3x3(x, conv.weight, conv.bias)
        return conv(F.interpolate(x, scale_factor=2, mode="nearest"))

    @torch.no_grad()
    def init_embeddings_from(self, fc_weight: torch.Tensor) -> None:
        """Set the class-embedding table (C × D), e.g. the teacher's classifier weight rows."""
        if tuple(fc_weight.shape) != tuple(self.embedding.weight.shape):
            raise ValueError(
                f"embedding table of shape {tuple(fc_weight.shape)}: the generator needs "
                f"{tuple(self.embedding.weight.shape)} (classes x teacher feature width)"
            )
        self.embedding.weight.copy_(fc_weight)


def initial_embeddings(embedding_init: str, teacher, seed: int) -> torch.Tensor:
    """The generator's initial class-embedding table (classes × teacher feature width).

    ``teacher_fc``: the rows of the teacher's classifier weight (Qimera's extracted
    initialisation). ``random``: N(0, 1) from a generator of its own seeded with ``seed``,
    not from the global RNG, so that ``qimera run`` and the pipeline's ``init_embeddings``
    stage (which runs in another process) start the same config from the same table.
    """
    if embedding_init == "teacher_fc":
        return teacher.fc_weight.detach().float().clone().contiguous()
    return torch.randn((teacher.num_classes, teacher.feature_dim), generator=torch.Generator().manual_seed(int(seed)))


def build_generator(cfg, teacher) -> Generator:
    """The generator of a run: sized for ``teacher`` (a
    :class:`qimera.teachers.LoadedTeacher`: classes, feature width, input size) and set
    up as the method's generator settings say (``cfg.effective_generator()``)."""
    g = cfg.effective_generator()
    c, h, _ = teacher.input_size
    gen = Generator(
        num_classes=teacher.num_classes,
        embed_dim=teacher.feature_dim,
        img_size=h,
        channels=c,
        dm_layers=g.dm_layers,
        noise_scale=g.noise_scale,
        combine=g.combine,
        conditional_bn=g.variant == "imagenet",
        cbn_mix=g.cbn_mix,
        input_embedding=g.input_embedding == "on",
    )
    gen.init_embeddings_from(initial_embeddings(g.embedding_init, teacher, cfg.train.seed))
    if g.freeze_embeddings:
        gen.embedding.weight.requires_grad_(False)
    return gen
