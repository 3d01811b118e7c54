"""The parts a method is made of, beside its generator: the terms of the generator's and
the student's losses, a filter of the generated images and a rule that averages the
student's weights. The ``parts`` config section chooses them by name from the registries
below; :func:`compose` turns the section into the :class:`Parts` the trainer runs.

The paper's methods are compositions of the default parts: GDFQ and Qimera both train the
generator with ``[ce, bns]`` (``L_G = CE_soft(t, y) + bns_weight · L_BNS``) and the student
with ``[kd, ce]`` (``L_S = τ²·KL(t ‖ a) + CE_soft(a, y)``), no filter, no averaging; they
differ in their generator only (:meth:`qimera.config.Config.effective_generator`). The
additions of later work are parts too, each behind its own key:

* ``student_loss: [kd, ce_easy]``: SynQ's rule for hard samples (ICLR 2025): the
  cross-entropy to the label only for the samples the teacher finds easy (difficulty
  below ``parts.easy_tau``); the hard ones learn from the soft teacher target alone.
* ``image_filter: lowpass``: SynQ's Gaussian low-pass filter of the generated images in
  the Fourier domain, ``H = exp(-D²/(2·D0²))``, applied to what the student sees (the
  teacher's target is recomputed on the filtered images).
* ``averaging: ema`` or ``swa``: the evaluated and exported student is an average of the
  trained one's weights (:class:`torch.optim.swa_utils.AveragedModel`).
* ``generator_loss: [ce, bns, margin]``: AdaDFQ's margin (CVPR 2023), which keeps the
  teacher-student disagreement on the generated samples between ``parts.margin_low`` and
  ``parts.margin_high``; it runs the student in the generator's step.

The registries (:data:`GENERATOR_TERMS`, :data:`STUDENT_TERMS`, :data:`IMAGE_FILTERS`,
:data:`AVERAGING`) live in :mod:`qimera._registry`, so that validating a config imports
no torch. Adding a part::

    from qimera.parts import STUDENT_TERMS

    @STUDENT_TERMS.register("my_term")
    def my_term(batch, cfg):      # a StudentBatch and the Config; returns a scalar tensor
        ...

and name it in ``parts.student_loss`` (register it before the config is loaded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._registry import AVERAGING, GENERATOR_TERMS, IMAGE_FILTERS, STUDENT_TERMS
from .losses import kd_loss, soft_cross_entropy

if TYPE_CHECKING:
    from .config import Config


@dataclass(frozen=True)
class GeneratorBatch:
    """What a generator-loss term sees: the teacher's logits on the generated images, the
    intended soft labels and the BN-statistics loss of that teacher forward pass; and, for
    a term marked :func:`needs_student`, the student's logits on the same images (with the
    gradient to the generator), once the student is trained (None before)."""

    teacher_logits: torch.Tensor
    target: torch.Tensor
    bns: Callable[[], torch.Tensor]
    student_logits: Optional[torch.Tensor] = None


def needs_student(term: Callable) -> Callable:
    """Mark a generator-loss term that reads ``batch.student_logits``: the trainer then runs
    the student on the generated images in the generator's step (one more forward and
    backward pass through the student)."""
    term.needs_student = True
    return term


@dataclass(frozen=True)
class StudentBatch:
    """What a student-loss term sees: the student's and the teacher's logits on the
    (filtered) generated images and the intended soft labels."""

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    target: torch.Tensor


Term = Callable[..., torch.Tensor]

#: the weight of each term in its loss (a term not named here has weight 1)
TERM_WEIGHTS: dict[str, Callable[["Config"], float]] = {"bns": lambda cfg: cfg.train.bns_weight}


def generator_ce(batch: GeneratorBatch, cfg: "Config") -> torch.Tensor:
    """The teacher's soft cross-entropy to the intended label (SPEC §2)."""
    return soft_cross_entropy(batch.teacher_logits, batch.target)


def generator_bns(batch: GeneratorBatch, cfg: "Config") -> torch.Tensor:
    """The BatchNorm-statistics loss, weighted by ``train.bns_weight`` (SPEC §2)."""
    return batch.bns()


@needs_student
def generator_margin(batch: GeneratorBatch, cfg: "Config") -> torch.Tensor:
    """AdaDFQ's margin (CVPR 2023): keep the generated samples' adaptability to the student
    between two bounds. A sample's disagreement is the entropy of ``softmax(t − a)``
    (teacher minus student logits), normalised over the batch to ``(h − min h) / (log C −
    min h)``; the loss is ``mean(relu(parts.margin_low − h')) + mean(relu(h' −
    parts.margin_high))``. Zero while the student is not trained yet (the calibration
    epochs; AdaDFQ's student is not calibrated there)."""
    if batch.student_logits is None:
        return batch.teacher_logits.new_zeros((), dtype=torch.float32)
    gap = batch.teacher_logits.float() - batch.student_logits.float()
    entropy = -(torch.softmax(gap, dim=1) * F.log_softmax(gap, dim=1)).sum(1)
    low = entropy.min()
    scaled = (entropy - low) / (math.log(gap.shape[1]) - low).clamp_min(1e-6)
    p = cfg.parts
    return F.relu(p.margin_low - scaled).mean() + F.relu(scaled - p.margin_high).mean()


def student_kd(batch: StudentBatch, cfg: "Config") -> torch.Tensor:
    """Distillation from the teacher: ``τ²·KL`` (``train.kd_temperature``, ``train.kd_reduction``)."""
    return kd_loss(batch.student_logits, batch.teacher_logits, cfg.train.kd_temperature, cfg.train.kd_reduction)


def student_ce(batch: StudentBatch, cfg: "Config") -> torch.Tensor:
    """The student's soft cross-entropy to the intended label, on every sample (SPEC §2)."""
    return soft_cross_entropy(batch.student_logits, batch.target)


def teacher_difficulty(teacher_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """How hard the teacher finds each sample: the total-variation distance between its
    softmax and the intended soft label, ``½·Σ_c |p_T(c) − y_c|``, in [0, 1]. For a one-hot
    label this is SynQ's ``1 − p_T(y)``; for a superposed label it is 0 when the teacher
    gives exactly the mixture."""
    probs = torch.softmax(teacher_logits.float(), dim=1)
    return 0.5 * (probs - target.float()).abs().sum(1)


def student_ce_easy(batch: StudentBatch, cfg: "Config") -> torch.Tensor:
    """SynQ's hard-sample rule: the cross-entropy to the label only where the teacher's
    :func:`teacher_difficulty` is below ``parts.easy_tau``; averaged over the whole batch
    (a hard sample contributes nothing), as SynQ's masked cross-entropy is."""
    easy = (teacher_difficulty(batch.teacher_logits, batch.target) < cfg.parts.easy_tau).float()
    per_sample = -(batch.target * F.log_softmax(batch.student_logits.float(), dim=1)).sum(1)
    return (per_sample * easy).mean()


def gaussian_lowpass(images: torch.Tensor, d0: float) -> torch.Tensor:
    """``images`` (N, C, H, W) with every channel's spectrum multiplied by
    ``exp(-D²/(2·d0²))``, ``D`` the distance (in frequency steps) from the zero frequency:
    the mean of each channel passes unchanged, fine detail is damped. Computed in float32
    with a real FFT; returns the input's dtype."""
    h, w = images.shape[-2:]
    ky = torch.fft.fftfreq(h, d=1.0 / h, device=images.device)
    kx = torch.fft.rfftfreq(w, d=1.0 / w, device=images.device)
    gain = torch.exp(-(ky[:, None] ** 2 + kx[None, :] ** 2) / (2.0 * d0 * d0))
    spectrum = torch.fft.rfft2(images.float(), dim=(-2, -1))
    return torch.fft.irfft2(spectrum * gain, s=(h, w), dim=(-2, -1)).to(images.dtype)


#: SynQ's cutoff, chosen for 224 x 224 ImageNet inputs: ``parts.lowpass_d0: null`` scales it
#: to the input's side (about 11.4 at 32 x 32), since on a 32 x 32 image D0 = 80 damps no
#: frequency by more than 4%
LOWPASS_D0_AT_224 = 80.0


def lowpass_d0(cfg: "Config", input_size) -> float:
    """The cutoff in frequency steps: ``parts.lowpass_d0``, or SynQ's 80 scaled from 224
    pixels to the teacher's input side."""
    if cfg.parts.lowpass_d0 is not None:
        return float(cfg.parts.lowpass_d0)
    return LOWPASS_D0_AT_224 * float(input_size[-1]) / 224.0


def lowpass_filter(cfg: "Config", input_size) -> Callable[[torch.Tensor], torch.Tensor]:
    d0 = lowpass_d0(cfg, input_size)
    return lambda images: gaussian_lowpass(images, d0)


def no_filter(cfg: "Config", input_size) -> None:
    """The paper's methods: the student sees the generated images as they are."""
    return None


class AveragingRule:
    """An average of the student's parameters, kept beside the trained student and used
    in its place for evaluation and export.

    Built on :class:`torch.optim.swa_utils.AveragedModel` over the parameters only
    (``use_buffers=False``); the buffers (activation ranges, BatchNorm statistics) are the
    trained student's, copied in by :meth:`deployed`. The student runs in eval mode
    throughout training, so its BatchNorm layers normalise with the teacher's running
    statistics and never update them: averaging γ and β needs no ``update_bn`` pass.
    """

    def __init__(self, student: nn.Module, *, start_epoch: int, multi_avg_fn=None):
        from torch.optim.swa_utils import AveragedModel

        #: 0-based index of the first epoch whose steps are averaged
        self.start_epoch = int(start_epoch)
        self.model = AveragedModel(student, multi_avg_fn=multi_avg_fn, use_buffers=False)

    @property
    def count(self) -> int:
        """How many student steps are in the average (0: none yet; the trained student is used)."""
        return int(self.model.n_averaged)

    def update(self, student: nn.Module, epoch: int) -> None:
        """After a student step in (0-based) ``epoch``."""
        if epoch >= self.start_epoch:
            self.model.update_parameters(student)

    def deployed(self, student: nn.Module) -> nn.Module:
        """The student to evaluate and export: the average (with the trained student's
        buffers and calibration state) once it holds a step, else ``student`` itself."""
        if self.count == 0:
            return student
        module = self.model.module
        with torch.no_grad():
            for mine, theirs in zip(module.buffers(), student.buffers()):
                mine.copy_(theirs)
        for mine, theirs in zip(module.modules(), student.modules()):
            if hasattr(theirs, "calibrating") and hasattr(mine, "set_calibrating"):
                mine.set_calibrating(theirs.calibrating)
        return module.train(student.training)

    def state_dict(self) -> dict:
        """The averaged parameters and the count (what a checkpoint keeps to resume exactly)."""
        return {"n_averaged": self.model.n_averaged.detach().clone(),
                "parameters": {k: v.detach().clone() for k, v in self.model.module.named_parameters()}}

    def load_state_dict(self, state: dict) -> None:
        params = dict(self.model.module.named_parameters())
        if set(state["parameters"]) != set(params):
            raise KeyError("the checkpoint's averaged student has other parameters than this student")
        with torch.no_grad():
            for name, value in state["parameters"].items():
                params[name].copy_(value)
            self.model.n_averaged.copy_(state["n_averaged"])


def deployed_student_state(state: dict) -> dict:
    """The state_dict of the student a checkpoint ``state`` evaluates and exports: its
    ``student`` with the averaged parameters put in when averaging had started
    (``student_average``), else its ``student`` as it is. The one reader of that choice
    for the stages after training."""
    average = state.get("student_average")
    if not average or int(average["n_averaged"]) == 0:
        return state["student"]
    return {**state["student"], **average["parameters"]}


def swa_start_epoch(cfg: "Config") -> int:
    """The 1-based epoch from which SWA averages: ``parts.swa_start_epoch``, or the epoch
    after the last learning-rate step (``train.lr_milestones``), or the first epoch that
    trains the student when there is no step."""
    if cfg.parts.swa_start_epoch is not None:
        return cfg.parts.swa_start_epoch
    first_trained = cfg.train.warmup_epochs + 1
    return max([first_trained, *(m + 1 for m in cfg.train.lr_milestones)])


def ema_rule(cfg: "Config"):
    """An exponential moving average of every student step, decay ``parts.ema_decay``,
    from the first trained epoch on."""
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    return lambda student: AveragingRule(student, start_epoch=cfg.train.warmup_epochs,
                                         multi_avg_fn=get_ema_multi_avg_fn(cfg.parts.ema_decay))


def swa_rule(cfg: "Config"):
    """The equal-weight average of every student step from :func:`swa_start_epoch` on."""
    return lambda student: AveragingRule(student, start_epoch=swa_start_epoch(cfg) - 1)


def no_averaging(cfg: "Config") -> None:
    """The paper's methods: the trained student is the one evaluated and exported."""
    return None


@dataclass(frozen=True)
class Parts:
    """A method's parts, resolved from a config (:func:`compose`)."""

    generator_terms: tuple[tuple[str, Term, float], ...]
    student_terms: tuple[tuple[str, Term, float], ...]
    image_filter: Optional[Callable[[torch.Tensor], torch.Tensor]]
    averaging: Optional[Callable[[nn.Module], AveragingRule]]

    @staticmethod
    def _total(terms, batch, cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        values: dict[str, torch.Tensor] = {}
        total = None
        for name, term, weight in terms:
            value = term(batch, cfg)
            values[name] = value
            part = value if weight == 1.0 else weight * value
            total = part if total is None else total + part
        return total, values

    @property
    def generator_needs_student(self) -> bool:
        """Whether a generator term reads the student's logits (:func:`needs_student`)."""
        return any(getattr(term, "needs_student", False) for _, term, _ in self.generator_terms)

    def generator_loss(self, batch: GeneratorBatch, cfg: "Config"):
        """``(L_G, {term: value})``: the weighted sum of the generator's terms, in order."""
        return self._total(self.generator_terms, batch, cfg)

    def student_loss(self, batch: StudentBatch, cfg: "Config"):
        """``(L_S, {term: value})``: the weighted sum of the student's terms, in order."""
        return self._total(self.student_terms, batch, cfg)


def compose(cfg: "Config", input_size) -> Parts:
    """The :class:`Parts` that ``cfg.parts`` names (validated by the config)."""
    p = cfg.parts

    def terms(names, registry):
        return tuple((n, registry[n], float(TERM_WEIGHTS[n](cfg)) if n in TERM_WEIGHTS else 1.0) for n in names)

    return Parts(terms(p.generator_loss, GENERATOR_TERMS), terms(p.student_loss, STUDENT_TERMS),
                 IMAGE_FILTERS[p.image_filter](cfg, tuple(input_size)), AVERAGING[p.averaging](cfg))
