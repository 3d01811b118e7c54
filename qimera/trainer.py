"""The training loop of SPEC §2: generator + quantized student, seeded and resumable.

Per iteration, in this order:

1. sample a batch of class mixtures (superposed with probability ``p``, decided once
   per batch), generate ``x = G(mix)``, run the teacher (logits ``t``, BN statistics);
2. ``L_G = CE_soft(t, y) + bns_weight · L_BNS``; step the generator (Adam);
3. the student on ``x.detach()``: ``L_S = τ²·KL(t ‖ a) + CE_soft(a, y)``; step it
   (SGD) once the warm-up epochs are over. During warm-up the student only runs
   forward while its activation ranges calibrate (and not at all afterwards).

Those are the paper's parts; the ``parts`` config section composes others
(:mod:`qimera.parts`): other loss terms, a filter of the images the student sees (the
teacher's target is then recomputed on them) and an average of the student's weights,
updated after every student step, which is then the student evaluated and exported.

A checkpoint (student, generator, optimisers, schedulers, RNG states, activation
ranges, history) is written atomically at the end of every epoch; constructing a
:class:`Trainer` on an ``out_dir`` that holds one resumes exactly where it stopped.
The hot loop never synchronises with the device except to refresh the progress bar
every ``log_every`` iterations.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from ._files import atomic_write, remove_stale_temps
from ._lock import hold_out_dir
from .config import Config, check_out_files
from .data import EvalData
from .evaluate import evaluate, first_non_finite
from .generators import ClassMix, build_generator, sample_plain, sample_superposed
from .losses import BNStatsHook
from .parts import GeneratorBatch, StudentBatch, compose
from .quant import build_student, set_calibrating
from .quant.recipe import is_integer_exact
from .teachers import LoadedTeacher

CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_NAME = "history.jsonl"
#: config keys that may change between a run and its resume (a change of ``data`` is
#: recorded: every evaluated epoch's record names its evaluation set, :data:`EVAL_SET_KEYS`)
RESUME_MAY_CHANGE = ("train.epochs", "train.progress", "train.log_every", "train.resume",
                     "train.eval_every", "train.out_dir", "data", "naive", "preset")
#: what an evaluated epoch's record says of the evaluation set its top-1/top-5 are on: the
#: number of images and the identity of the ``data`` section (12 hex digits of its sha256,
#: without the keys that do not change the images: batch_size, num_workers)
EVAL_SET_KEYS = ("eval_images", "eval_set")
#: the fingerprint's part for the teacher's weights (:meth:`LoadedTeacher.content_sha256`)
TEACHER_PART = "teacher_weights"

EpochCallback = Callable[[dict], None]
#: the per-epoch diagnostics of the generated samples an epoch record carries (Trainer._diagnostics)
EPOCH_DIAGNOSTICS = ("teacher_agree_plain", "teacher_agree_superposed", "teacher_max_prob", "label_max")
#: what an epoch record adds when ``parts.averaging`` is on: the student steps in the average
#: and the trained (not averaged) student's top-1 beside the average's ``top1``
AVERAGING_KEYS = ("averaged_steps", "top1_trained")
#: an integer-exact student's epoch records hold, beside its ``top1`` (as its int8 form
#: computes), the top-1 of the same weights in the paper's fake-quant arithmetic
FAKE_QUANT_KEY = "top1_fake_quant"


#: the losses of an iteration, what they are, and the settings that most likely make each
#: of them blow up (named in the divergence message with their values)
LOSS_NAMES = {"loss_g_ce": "the generator's cross-entropy", "loss_g_bns": "the generator's BN-statistics loss",
              "loss_g": "the generator's loss", "loss_s": "the student's distillation loss"}
LOSS_SETTINGS: dict[str, tuple[str, ...]] = {
    "loss_g_ce": ("train.lr_generator", "generator.noise_scale"),
    "loss_g_bns": ("train.lr_generator", "generator.noise_scale", "train.bns_weight"),
    "loss_g": ("train.lr_generator", "generator.noise_scale", "train.bns_weight"),
    "loss_s": ("train.lr_student", "train.kd_temperature"),
}


class TrainingDiverged(RuntimeError):
    """A loss or a parameter became non-finite. Training stopped before writing anything
    of that epoch; the message names the epoch, the iteration, the loss and the settings
    that most likely caused it."""


class CheckpointError(ValueError):
    """``train.out_dir`` holds a checkpoint this run cannot continue (unreadable, another
    configuration, more epochs than asked); the message names the choices."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r}: CUDA is not available on this machine; use 'auto' or 'cpu'")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"train.device={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                         "use 'cuda', 'cuda:0', ... or 'auto'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"train.device={name!r}: MPS (Apple GPU) is not available on this machine; "
                         "use 'auto' or 'cpu'")
    return dev


def bf16_is_fast(device: torch.device) -> bool:
    """Whether this device has native bfloat16 arithmetic (CUDA with bf16, or a CPU whose
    oneDNN kernels support it: AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


#: on CUDA, ``auto`` turns bf16 on only for inputs wider than this. Measured on an H100
#: (benchmarks/train_step.py): ResNet-20 at 32x32, batch 200, ran 0.88x as fast in bf16
#: (small kernels, launch-bound; the convolutions already use TF32), while ResNet-18 at
#: 224x224 ran 1.07x (batch 16) to 1.27x (batch 64) and ResNet-50 1.11x (batch 16) as fast.
CUDA_BF16_MIN_SIDE = 64


def resolve_amp(amp: str, device: torch.device, input_size: tuple[int, ...] | None = None) -> str:
    """``auto`` -> ``bf16`` where the device computes it natively and it pays: CPUs with
    AVX512-BF16/AMX (1.7x on ResNet-20), CUDA for ImageNet-sized inputs; else ``none``."""
    if amp != "auto":
        return amp
    if not bf16_is_fast(device):
        return "none"
    if device.type == "cuda" and input_size is not None and max(input_size[-2:]) <= CUDA_BF16_MIN_SIDE:
        return "none"
    return "bf16"


#: the torch.compile backend of ``train.compile`` (the tests swap in "aot_eager", which
#: traces the same graphs and autograd without generating code)
COMPILE_BACKEND = "inductor"


#: ``train.compile: auto`` compiles a CPU run of at least this many iterations (about six
#: times the measured break-even: ~80 s of compilation against 0.23-0.36 s saved per
#: ResNet-20 iteration at batch 200)
AUTO_COMPILE_MIN_ITERATIONS = 2000


def resolve_compile(mode: str, device: torch.device, input_size: tuple[int, ...] | None = None,
                    iterations: int | None = None) -> str:
    """``train.compile: auto`` for this run; other values stay as they are.

    ``auto`` compiles where it was measured to pay (benchmarks/train_step.py, README
    "Speed"): on a 2-core AVX512 CPU the CIFAR ResNet-20 step at batch 200 ran 1.39x as
    fast compiled in fp32 (1279 -> 920 ms) and 1.50x under bf16 (695 -> 464 ms), after
    about 80 s of compilation; the digits demo's step was no faster. So: on CPU, for
    CIFAR-sized inputs (32 to 64 pixels), runs of at least
    :data:`AUTO_COMPILE_MIN_ITERATIONS` iterations, and only with a C++ compiler on the
    machine (inductor builds its CPU kernels with it). Eager everywhere else, GPUs
    included, until a GPU has measured it."""
    if mode != "auto":
        return mode
    import os
    import shutil

    side = min(input_size[-2:]) if input_size is not None and len(input_size) >= 2 else 0
    cxx = os.environ.get("CXX") or "g++"
    if (device.type == "cpu" and 32 <= side <= CUDA_BF16_MIN_SIDE and (iterations or 0) >= AUTO_COMPILE_MIN_ITERATIONS
            and shutil.which(cxx)):
        return "default"
    return "none"


def autocast_context(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    # bf16 only: it needs no loss scaling (fp16 would, and is not offered)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def checkpoint_file(out_dir: str | Path) -> Path:
    """Where a run in ``out_dir`` keeps its checkpoint."""
    return Path(out_dir) / CHECKPOINT_NAME


def discard_checkpoint(out_dir: str | Path) -> None:
    """Remove the checkpoint and history a run left in ``out_dir`` (and temporaries of
    them that a killed write left behind): the next run there starts over."""
    for path in (checkpoint_file(out_dir), Path(out_dir) / HISTORY_NAME):
        remove_stale_temps(path)
        if path.is_dir():
            shutil.rmtree(path)
        path.unlink(missing_ok=True)


def read_checkpoint(out_dir: str | Path, *, mmap: bool = False) -> dict:
    """The checkpoint a run left in ``out_dir``, loaded safely on the CPU (tensors only,
    ``weights_only=True``)."""
    return torch.load(checkpoint_file(out_dir), map_location="cpu", weights_only=True, mmap=mmap)


@dataclass(frozen=True)
class ResumeStatus:
    """What ``train.out_dir`` holds for a run, as :meth:`Trainer.resume_status` sees it.

    ``state`` is one of ``"resumable"`` (a checkpoint of this configuration, at most
    ``train.epochs`` epochs), ``"none"`` (no checkpoint), ``"disabled"``
    (``train.resume`` is false), ``"unreadable"``, ``"mismatch"`` (another
    configuration or fingerprint) or ``"ahead"`` (more epochs than ``train.epochs``).
    """

    state: str
    reason: str
    epoch: int = 0
    history: tuple[dict, ...] = ()

    @property
    def resumable(self) -> bool:
        return self.state == "resumable"

    @property
    def found(self) -> bool:
        """Whether a checkpoint file is there (resumable or not)."""
        return self.state != "none"


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0
    resumed_from_epoch: int = 0

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


class Trainer:
    """Qimera / GDFQ training of a generator and a quantized student."""

    def __init__(
        self,
        cfg: Config,
        teacher: LoadedTeacher,
        eval_data: Optional[EvalData] = None,
        *,
        callbacks: tuple[EpochCallback, ...] = (),
        initial_embeddings: Optional[torch.Tensor] = None,
        extra_fingerprint: Optional[Mapping[str, str]] = None,
    ):
        """``extra_fingerprint``: what else a checkpoint must have been trained from to be
        resumed (e.g. the pipeline's teacher and embedding hashes), beside the config and
        the teacher's weights (:meth:`LoadedTeacher.content_sha256`)."""
        self.cfg = cfg
        self.tc = cfg.train
        self.gc = cfg.effective_generator()
        self.device = resolve_device(self.tc.device)
        #: the autocast mode in use (``train.amp: auto`` resolved for this device)
        self.amp = resolve_amp(self.tc.amp, self.device, tuple(teacher.input_size))
        self.teacher_info = teacher
        self.eval_data = eval_data
        self.callbacks = list(callbacks)
        self.out_dir = Path(self.tc.out_dir)
        self.num_classes = teacher.num_classes

        torch.manual_seed(self.tc.seed)
        self.channels_last = self._use_channels_last()
        mf = torch.channels_last if self.channels_last else torch.contiguous_format
        self.teacher = teacher.model.to(self.device, memory_format=mf).eval()
        self.student = build_student(cfg, teacher).to(self.device, memory_format=mf).eval()
        self.generator = build_generator(cfg, teacher)
        if initial_embeddings is not None:
            # an embedding table prepared elsewhere (the pipeline's init_embeddings stage)
            if tuple(initial_embeddings.shape) != tuple(self.generator.embedding.weight.shape):
                raise ValueError(
                    f"initial embeddings have shape {tuple(initial_embeddings.shape)}, the generator needs "
                    f"{tuple(self.generator.embedding.weight.shape)} (classes x teacher feature width)"
                )
            with torch.no_grad():
                self.generator.embedding.weight.copy_(initial_embeddings)
        self.generator = self.generator.to(self.device).set_memory_format(mf)
        self.bn_hook = BNStatsHook(self.teacher)
        #: the method's parts (loss terms, image filter, averaging rule: qimera.parts)
        self.parts = compose(cfg, tuple(teacher.input_size))
        #: the average of the student's weights (None unless ``parts.averaging`` asks for one)
        self.average = self.parts.averaging(self.student) if self.parts.averaging is not None else None
        #: ``train.compile`` resolved for this device (:func:`resolve_compile`)
        self.compile_mode = resolve_compile(self.tc.compile, self.device, tuple(teacher.input_size),
                                            self.tc.epochs * self.tc.iters_per_epoch)
        # compiled steps on a GPU use the fused optimiser kernels; eager keeps PyTorch's
        # default implementation, so that eager runs give the numbers they always gave
        fused = {"fused": True} if self.compile_mode != "none" and self.device.type == "cuda" else {}

        self.opt_g = torch.optim.Adam(
            [p for p in self.generator.parameters() if p.requires_grad],
            lr=self.tc.lr_generator, betas=tuple(self.tc.generator_betas), **fused,
        )
        self.opt_s = torch.optim.SGD(
            self.student.parameters(), lr=self.tc.lr_student, momentum=self.tc.momentum,
            nesterov=self.tc.nesterov and self.tc.momentum > 0, weight_decay=self.tc.weight_decay, **fused,
        )
        self._generator_step, self._student_step = self._generator_loss, self._student_loss
        if self.compile_mode != "none":
            # static shapes: the plain and the superposed batch are two graph variants each
            opts = {"backend": COMPILE_BACKEND, "dynamic": False}
            if COMPILE_BACKEND == "inductor" and self.compile_mode != "default":
                opts["mode"] = self.compile_mode
            self._generator_step = torch.compile(self._generator_loss, **opts)
            self._student_step = torch.compile(self._student_loss, **opts)
        self.sched_g = torch.optim.lr_scheduler.MultiStepLR(self.opt_g, self.tc.lr_milestones, self.tc.lr_gamma)
        self.sched_s = torch.optim.lr_scheduler.MultiStepLR(self.opt_s, self.tc.lr_milestones, self.tc.lr_gamma)
        # Per-batch decisions (superpose or not) come from a CPU generator: a host-side
        # branch that never waits for the device. Tensors come from a device generator.
        self.rng_host = torch.Generator().manual_seed(self.tc.seed)
        self.rng_dev = torch.Generator(device=self.device).manual_seed(self.tc.seed + 1)
        self.epoch = 0
        self._reset_diagnostics()
        self.history: list[dict] = []
        #: the evaluation of the final epoch's student, when this process trained that epoch
        self.final_eval = None
        self.resumed_from_epoch = 0
        #: what a resumed checkpoint must have been trained from, part by part (a mismatch
        #: names the parts that differ), and their one hash
        self._fingerprint_parts = self.fingerprint_parts(cfg, teacher, extra_fingerprint)
        self._fingerprint = self.fingerprint_of(self._fingerprint_parts)
        #: the evaluated epochs' :data:`EVAL_SET_KEYS` (None without evaluation data)
        self._eval_set = self._make_eval_set()
        #: the line :meth:`maybe_resume` printed when the evaluation set changed since the
        #: checkpoint's last evaluated epoch (None when it did not)
        self.eval_set_change: str | None = None

    # -- helpers ----------------------------------------------------------------------
    @staticmethod
    def fingerprint_parts(cfg: Config, teacher: LoadedTeacher, extra: Optional[Mapping[str, str]]) -> dict[str, str]:
        """What a checkpoint of ``cfg`` trained from ``teacher`` records, part by part: the
        config (without :data:`RESUME_MAY_CHANGE`), the teacher's weights (their content,
        not their path) and ``extra`` (e.g. the pipeline's embedding table and library)."""
        return {"config": cfg.fingerprint(ignore=RESUME_MAY_CHANGE), TEACHER_PART: teacher.content_sha256(),
                **{str(k): str(v) for k, v in (extra or {}).items()}}

    @staticmethod
    def fingerprint_of(parts: Mapping[str, str]) -> str:
        """The one hash a checkpoint carries of its :meth:`fingerprint_parts`."""
        return hashlib.sha256(json.dumps(dict(parts), sort_keys=True).encode()).hexdigest()

    def _mismatch(self, state: dict) -> str:
        """What the checkpoint ``state`` was trained from that this run is not."""
        theirs = state.get("fingerprint_parts")
        if not isinstance(theirs, dict):  # written before checkpoints named their parts
            return "another configuration, teacher, embedding table or library version"
        mine = self._fingerprint_parts
        differ = [k for k in mine if theirs.get(k) != mine[k]] + [k for k in theirs if k not in mine]
        weights = self.cfg.teacher.weights
        named = {"config": "a different configuration",
                 TEACHER_PART: "other teacher weights (the teacher's parameters differ from the ones it was "
                               "trained from" + (f"; teacher.weights={weights!r} changed?)" if weights else ")")}
        return ", ".join(named.get(k, f"a different {k}") for k in differ) or "another fingerprint"

    def _make_eval_set(self) -> dict | None:
        if self.eval_data is None:
            return None
        data = {k: v for k, v in self.cfg.resolved()["data"].items() if k not in ("batch_size", "num_workers")}
        ident = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
        return dict(zip(EVAL_SET_KEYS, (int(self.eval_data.num_samples), ident)))

    def _note_eval_set_change(self) -> None:
        """Say so (stderr, :attr:`eval_set_change`) when the checkpoint's last evaluated
        epoch was evaluated on another set than this run evaluates on."""
        last = next((r for r in reversed(self.history) if "top1" in r), None)
        if last is None or self._eval_set is None:
            return
        images, ident = (last.get(k) for k in EVAL_SET_KEYS)
        if (images, ident) == tuple(self._eval_set.values()):
            return
        now_images, now_ident = self._eval_set.values()
        self.eval_set_change = (
            f"train.out_dir={str(self.out_dir)!r}: resuming with another evaluation set: epoch {last['epoch']} was "
            f"evaluated on {images if images is not None else 'an unrecorded number of'} images (set {ident}), the "
            f"epochs from now on are on {now_images} images (set {now_ident}); each record of {HISTORY_NAME} "
            f"names its set ({', '.join(EVAL_SET_KEYS)})")
        print(f"qimera: {self.eval_set_change}", file=sys.stderr, flush=True)

    def _use_channels_last(self) -> bool:
        if self.tc.channels_last == "on":
            return True
        if self.tc.channels_last == "off":
            return False
        # channels_last pays off with oneDNN bf16 kernels on CPU and tensor cores on CUDA
        return self.amp != "none"

    @property
    def checkpoint_path(self) -> Path:
        return checkpoint_file(self.out_dir)

    @property
    def history_path(self) -> Path:
        return self.out_dir / HISTORY_NAME

    def sample_mix(self) -> ClassMix:
        b, c = self.tc.batch_size, self.num_classes
        p = self.gc.p
        superpose = p > 0 and float(torch.rand((), generator=self.rng_host)) < p
        if superpose:
            return sample_superposed(b, c, self.gc.k, generator=self.rng_dev, device=self.device)
        return sample_plain(b, c, generator=self.rng_dev, device=self.device)

    # -- state --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "host": self.rng_host.get_state(), "dev": self.rng_dev.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": 1,
            "epoch": self.epoch,
            "fingerprint": self._fingerprint,
            "fingerprint_parts": self._fingerprint_parts,
            "student": self.student.state_dict(),
            **({"student_average": self.average.state_dict()} if self.average is not None else {}),
            "generator": self.generator.state_dict(),
            "opt_s": self.opt_s.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "sched_s": self.sched_s.state_dict(),
            "sched_g": self.sched_g.state_dict(),
            "rng": rng,
            "history": self.history,
            "config": self.cfg.resolved(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self._fingerprint:
            raise CheckpointError(
                f"train.out_dir={str(self.out_dir)!r} holds a checkpoint trained from {self._mismatch(state)}; "
                "use another out_dir, or train.resume=false to start over"
            )
        self.student.load_state_dict(state["student"])
        if self.average is not None:
            self.average.load_state_dict(state["student_average"])
        self.generator.load_state_dict(state["generator"])
        self.opt_s.load_state_dict(state["opt_s"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.sched_s.load_state_dict(state["sched_s"])
        self.sched_g.load_state_dict(state["sched_g"])
        # generator states are CPU byte tensors whatever the device (a checkpoint loaded
        # with map_location="cuda" would put them on the GPU, which set_state refuses)
        rng = {k: v.cpu() for k, v in state["rng"].items()}
        torch.set_rng_state(rng["torch"])
        self.rng_host.set_state(rng["host"])
        self.rng_dev.set_state(rng["dev"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.resumed_from_epoch = self.epoch

    def save_checkpoint(self) -> None:
        state = self.state_dict()
        atomic_write(self.checkpoint_path, lambda handle: torch.save(state, handle), "wb")
        atomic_write(self.history_path, lambda handle: handle.write(
            "".join(json.dumps(r) + "\n" for r in self.history)), "w")

    def resume_status(self) -> ResumeStatus:
        """Whether :meth:`fit` would continue the checkpoint in ``out_dir``, and why not."""
        return self._inspect(mmap=True)[0]

    def _inspect(self, *, mmap: bool) -> tuple[ResumeStatus, dict | None]:
        """The resume status and the checkpoint it was read from (None when unreadable)."""
        if not self.checkpoint_path.exists():
            return ResumeStatus("none", "no checkpoint"), None
        if not self.tc.resume:
            return ResumeStatus("disabled", "train.resume is false"), None
        if not self.checkpoint_path.is_file():
            return ResumeStatus("unreadable", f"{CHECKPOINT_NAME} is not a file"), None
        try:
            state = read_checkpoint(self.out_dir, mmap=mmap)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is "unreadable"
            return ResumeStatus("unreadable", f"unreadable checkpoint: {type(exc).__name__}"), None
        if not isinstance(state, dict) or not {"epoch", "student", "generator"} <= set(state):
            return ResumeStatus("unreadable", f"{CHECKPOINT_NAME} is not a qimera checkpoint"), None
        if state.get("fingerprint") != self._fingerprint:
            return ResumeStatus("mismatch", f"the checkpoint was trained from {self._mismatch(state)}"), state
        epoch = int(state.get("epoch", 0))
        history = tuple(state.get("history", ()))
        if epoch > self.tc.epochs:
            return ResumeStatus("ahead", f"the checkpoint has {epoch} epochs, more than "
                                         f"train.epochs={self.tc.epochs}", epoch, history), state
        return ResumeStatus("resumable", f"resuming after epoch {epoch}", epoch, history), state

    def discard_checkpoint(self) -> None:
        """Remove the checkpoint and history of ``out_dir``: the next :meth:`fit` starts over."""
        discard_checkpoint(self.out_dir)

    def maybe_resume(self) -> bool:
        """Continue the checkpoint in ``out_dir`` when there is one and ``train.resume``
        allows it. Never starts over silently: a checkpoint that cannot be continued
        (unreadable, another configuration, more epochs than ``train.epochs``) raises
        :class:`CheckpointError` naming the choices."""
        status, state = self._inspect(mmap=False)  # read once, loaded below
        if status.state in ("none", "disabled"):
            return False
        where = f"train.out_dir={str(self.out_dir)!r}"
        if status.state == "unreadable":
            raise CheckpointError(f"{where} holds a corrupt or truncated {CHECKPOINT_NAME} ({status.reason}); "
                                  f"set train.resume=false to start over, or delete {self.checkpoint_path}")
        if status.state == "ahead":
            raise CheckpointError(f"{where}: {status.reason}; raise train.epochs to at least {status.epoch} to "
                                  "keep training it, or use another out_dir (train.resume=false starts over)")
        # loaded on the CPU: load_state_dict copies parameters and optimiser state to the
        # modules' device, and the RNG states must stay on the CPU (a mismatch raises)
        self.load_state_dict(state)
        self._note_eval_set_change()
        return True

    # -- one iteration --------------------------------------------------------------------
    def _generator_loss(self, labels: torch.Tensor, lam: torch.Tensor, noise: torch.Tensor, y: torch.Tensor,
                        with_student: bool = False):
        """Generator, teacher and the generator's loss (CE + BNS) for one batch of class
        slots, noise and soft labels ``y``; the first part of :meth:`train_step`, compiled
        as one graph when ``train.compile`` is on (the BN-statistics hooks are traced with
        it). The loss is the sum of the ``parts.generator_loss`` terms (the paper's: CE +
        bns_weight · BNS). ``with_student``: a term reads the student's logits on the same
        images (AdaDFQ's margin), so the student runs here too. Returns ``(loss_g, {term:
        value}, images, teacher logits)``."""
        mix = ClassMix(labels, lam)
        self.bn_hook.enabled = True
        with autocast_context(self.device, self.amp):
            x = self.generator(mix, noise)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            t = self.teacher(x)
        self.bn_hook.enabled = False
        a = None
        if with_student:
            with autocast_context(self.device, self.amp):
                a = self.student(x)
        loss, terms = self.parts.generator_loss(GeneratorBatch(t, y, self.bn_hook.loss, a), self.cfg)
        return loss, terms, x, t

    def _student_loss(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The student's loss on generated images, the sum of the ``parts.student_loss``
        terms (the paper's: KD + CE); the second part."""
        with autocast_context(self.device, self.amp):
            a = self.student(x)
        return self.parts.student_loss(StudentBatch(a, t, y), self.cfg)[0]

    def _student_view(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The images the student learns from and the teacher's logits on them: the
        generated ones, or with ``parts.image_filter`` the filtered ones and the teacher's
        logits recomputed on those (the BN-statistics hooks stay off)."""
        if self.parts.image_filter is None:
            return x, t
        with torch.no_grad():
            xf = self.parts.image_filter(x)
            if self.channels_last:
                xf = xf.contiguous(memory_format=torch.channels_last)
            with autocast_context(self.device, self.amp):
                tf = self.teacher(xf)
        return xf, tf

    def train_step(self, *, calibrate: bool, train_student: bool) -> dict[str, torch.Tensor]:
        """One iteration; returns detached loss tensors (no host sync).

        The class slots and the noise are drawn here, from the trainer's generators, in
        the order the eager generator draws them, so a compiled step sees the same
        numbers; the optimiser steps run eagerly (fused kernels on a GPU when compiled)."""
        graphs = self.compile_mode == "reduce-overhead"
        if graphs:  # CUDA graphs: a new step may overwrite the last one's outputs
            torch.compiler.cudagraph_mark_step_begin()
        mix = self.sample_mix()
        noise = self.generator.sample_noise(mix, generator=self.rng_dev)
        y = mix.soft_labels(self.num_classes)
        loss_g, terms, x, t = self._generator_step(mix.labels, mix.lam, noise, y,
                                                   train_student and self.parts.generator_needs_student)
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()

        out = {"loss_g": loss_g.detach(), **{f"loss_g_{k}": v.detach() for k, v in terms.items()}}
        self._diagnose(t.detach(), y, superposed=mix.labels.shape[1] > 1)
        if train_student or calibrate:
            xs, ts = self._student_view(x.detach(), t.detach())
        if train_student:
            loss_s = self._student_step(xs, ts, y)
            self.opt_s.zero_grad(set_to_none=True)
            loss_s.backward()
            self.opt_s.step()
            if self.average is not None:
                self.average.update(self.student, self.epoch)
            out["loss_s"] = loss_s.detach()
        elif calibrate:  # the first epochs: updates the ranges, trains nothing; eager
            with torch.no_grad():
                out["loss_s"] = self._student_loss(xs, ts, y)
        # the epoch keeps these for its deferred checks: copies, not CUDA-graph buffers
        return {k: v.clone() for k, v in out.items()} if graphs else out

    # -- diagnostics ----------------------------------------------------------------------
    def _diagnose(self, t: torch.Tensor, y: torch.Tensor, *, superposed: bool) -> None:
        """Accumulate this batch's diagnostics on the device (no host sync): how often the
        teacher's top class is the intended one (the class with the largest soft label; a
        superposed sample's dominant slot), the teacher's mean largest probability and the
        mean largest soft label. :meth:`_diagnostics` turns them into the epoch's record."""
        with torch.no_grad():
            probs = torch.softmax(t.float(), dim=1)
            target = y.max(dim=1)
            hits = (probs.argmax(dim=1) == target.indices).sum()
            kind = "superposed" if superposed else "plain"
            sums = self._diag
            for key, value in ((f"hits_{kind}", hits), ("teacher_max_prob", probs.max(dim=1).values.sum()),
                               ("label_max", target.values.float().sum())):
                sums[key] = sums[key] + value if key in sums else value.clone()
            self._diag_counts[kind] += int(t.shape[0])

    def _diagnostics(self) -> dict[str, float]:
        """The epoch's diagnostics (one host sync): ``teacher_agree_plain`` and
        ``teacher_agree_superposed`` (%, present when the epoch had such batches),
        ``teacher_max_prob`` and ``label_max`` (means over every generated sample)."""
        counts, sums = self._diag_counts, self._diag
        out: dict[str, float] = {}
        for kind in ("plain", "superposed"):
            if counts[kind]:
                out[f"teacher_agree_{kind}"] = 100.0 * float(sums[f"hits_{kind}"]) / counts[kind]
        total = counts["plain"] + counts["superposed"]
        if total:
            out["teacher_max_prob"] = float(sums["teacher_max_prob"]) / total
            out["label_max"] = float(sums["label_max"]) / total
        return out

    def _reset_diagnostics(self) -> None:
        self._diag: dict[str, torch.Tensor] = {}
        self._diag_counts = {"plain": 0, "superposed": 0}

    # -- epochs ---------------------------------------------------------------------------
    def _progress(self, epoch: int):
        if not self.tc.progress:
            return None
        from tqdm.auto import tqdm

        # disable=None: no bar when stderr is not a terminal (logs keep the epoch lines)
        return tqdm(total=self.tc.iters_per_epoch, desc=f"epoch {epoch + 1}/{self.tc.epochs}",
                    unit="it", leave=False, dynamic_ncols=True, disable=None)

    def run_epoch(self) -> dict:
        epoch = self.epoch
        calibrate = epoch < self.tc.calibration_epochs
        train_student = epoch >= self.tc.warmup_epochs
        set_calibrating(self.student, calibrate)
        self.generator.train()
        sums: dict[str, torch.Tensor] = {}
        self._reset_diagnostics()
        window: list[dict[str, torch.Tensor]] = []  # the losses since the last finiteness check
        bar = self._progress(epoch)
        start = time.perf_counter()
        try:
            for it in range(self.tc.iters_per_epoch):
                try:
                    losses = self.train_step(calibrate=calibrate, train_student=train_student)
                except (OverflowError, RuntimeError) as exc:
                    if not isinstance(exc, OverflowError) and "overflow" not in str(exc):
                        raise
                    raise self._diverged(f"a value overflowed ({type(exc).__name__}: {str(exc)[:120]})", it + 1,
                                         ("train.lr_student", "train.lr_generator", "train.weight_decay",
                                          "train.kd_temperature")) from None
                window.append(losses)
                for k, v in losses.items():
                    sums[k] = sums[k] + v if k in sums else v.clone()
                if (it + 1) % self.tc.log_every == 0 or it + 1 == self.tc.iters_per_epoch:
                    # the one host synchronisation every log_every iterations
                    self._check_losses(window, first_iteration=it + 2 - len(window))
                    window.clear()
                    if bar is not None:
                        n = it + 1
                        bar.set_postfix({k: f"{float(v) / n:.3f}" for k, v in sums.items()}, refresh=False)
                        bar.update(n - bar.n)
            self._check_parameters()
        finally:
            if bar is not None:
                bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        self.sched_g.step()
        with warnings.catch_warnings():
            # during warm-up the student optimiser has not stepped yet; its schedule
            # still counts epochs from 0, as the generator's does
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            self.sched_s.step()
        self.epoch = epoch + 1

        n = self.tc.iters_per_epoch
        record: dict = {"epoch": self.epoch}
        record.update({k: float(v) / n for k, v in sums.items()})
        record.update({"iters_per_second": n / seconds, "seconds": seconds,
                       "calibrating": calibrate, "student_trained": train_student})
        record.update(self._diagnostics())
        if self.average is not None:
            record[AVERAGING_KEYS[0]] = self.average.count
        if self.eval_data is not None and (self.epoch % self.tc.eval_every == 0 or self.epoch == self.tc.epochs):
            # never let test images move the activation ranges
            set_calibrating(self.student, False)
            res = evaluate(self.deployed_student(), self.eval_data.loader, device=self.device,
                           num_classes=self.num_classes, channels_last=self.channels_last)
            record.update({"top1": res.top1, "top5": res.top5, **self._eval_set})
            if self.average is not None and self.average.count:
                # the trained student beside its average (which is the one evaluated above)
                trained = evaluate(self.student, self.eval_data.loader, device=self.device,
                                   num_classes=self.num_classes, channels_last=self.channels_last)
                record[AVERAGING_KEYS[1]] = trained.top1
            if is_integer_exact(self.student):
                # the same weights in the paper's fake-quant arithmetic: what the recipe costs
                record[FAKE_QUANT_KEY] = evaluate(self.deployed_student(), self.eval_data.loader, device=self.device,
                                                  num_classes=self.num_classes, channels_last=self.channels_last,
                                                  fake_quant=True).top1
            if self.epoch == self.tc.epochs:
                self.final_eval = res  # the whole result (per-class too) of the final student
        self.history.append(record)
        return record

    # -- divergence ------------------------------------------------------------------------
    def _diverged(self, what: str, iteration: int | None, keys: tuple[str, ...]) -> TrainingDiverged:
        where = f"epoch {self.epoch + 1}" + (f", iteration {iteration}/{self.tc.iters_per_epoch}" if iteration else "")
        settings = ", ".join(f"{k}={self._setting(k)}" for k in keys)
        done = (f"the checkpoint of epoch {self.epoch} stays in {self.out_dir}" if self.epoch
                else "no checkpoint was written")
        return TrainingDiverged(f"training diverged in {where}: {what}; likely cause: {settings} (too large?). "
                                f"Nothing of this epoch was written; {done}")

    def _setting(self, dotted: str):
        section, _, key = dotted.partition(".")
        return getattr(self.gc if section == "generator" else getattr(self.cfg, section), key)

    def _check_losses(self, window: list[dict[str, torch.Tensor]], first_iteration: int) -> None:
        """Raise :class:`TrainingDiverged` at the first non-finite loss in ``window`` (the
        iterations from ``first_iteration`` on); one host synchronisation."""
        if not window:
            return
        keys = [k for k in LOSS_SETTINGS if k in window[0]]
        values = torch.stack([torch.stack([w[k].float() for k in keys]) for w in window])
        finite = torch.isfinite(values)
        if bool(finite.all()):
            return
        row, col = (~finite).nonzero()[0].tolist()
        key = keys[col]
        raise self._diverged(f"{key} is {float(values[row, col])} ({LOSS_NAMES[key]})", first_iteration + row,
                             LOSS_SETTINGS[key])

    def _check_parameters(self) -> None:
        """Raise :class:`TrainingDiverged` when a student or generator parameter is not finite."""
        for name, model, keys in (("student", self.student, ("train.lr_student", "train.momentum")),
                                  ("generator", self.generator, ("train.lr_generator",))):
            found = first_non_finite(model.named_parameters())
            if found is not None:
                raise self._diverged(f"the {name}'s parameter {found[0]} is not finite", None, keys)

    def deployed_student(self) -> torch.nn.Module:
        """The student this run evaluates and hands on for export: the trained one, or its
        weight average once ``parts.averaging`` has averaged a step."""
        return self.average.deployed(self.student) if self.average is not None else self.student

    def close(self) -> None:
        """Remove the BN-statistics hooks from the teacher."""
        self.bn_hook.remove()

    def fit(self) -> TrainResult:
        """Train until ``train.epochs``, resuming from ``out_dir`` when a checkpoint is there.
        Holds ``out_dir`` for this run alone meanwhile (:func:`qimera._lock.hold_out_dir`:
        another run there is refused, naming its holder)."""
        try:
            with hold_out_dir(self.out_dir):
                return self._fit()
        finally:
            self.close()

    def _fit(self) -> TrainResult:
        check_out_files(self.out_dir, (CHECKPOINT_NAME, HISTORY_NAME))
        for path in (self.checkpoint_path, self.history_path):
            remove_stale_temps(path)  # left by a run that was killed while writing them
        self.maybe_resume()
        start = time.perf_counter()
        iters = 0
        while self.epoch < self.tc.epochs:
            record = self.run_epoch()
            iters += self.tc.iters_per_epoch
            self.save_checkpoint()
            self._log_epoch(record)
            for cb in self.callbacks:
                cb(record)
        # the student is left frozen (ranges fixed) for evaluation and export
        set_calibrating(self.student, False)
        return TrainResult(self.history, iters, time.perf_counter() - start, self.resumed_from_epoch)

    def _log_epoch(self, record: dict) -> None:
        if not self.tc.progress:
            return
        parts = [f"epoch {record['epoch']}/{self.tc.epochs}"]
        for key in ("loss_g", "loss_s", "top1", "top5", "iters_per_second"):
            if key in record and not (isinstance(record[key], float) and math.isnan(record[key])):
                parts.append(f"{key}={record[key]:.3f}" if key != "iters_per_second" else f"it/s={record[key]:.2f}")
        from tqdm.auto import tqdm

        # logs go to stderr: stdout carries only the CLI's final JSON summary
        tqdm.write("  ".join(parts), file=sys.stderr)
