"""Typed, validated run configuration (pydantic), read from YAML with ``--set`` overrides.

Every key is documented in ``configs/README.md``. Unknown keys, wrong types and values
out of range fail early with one :class:`ConfigError` that names the key, the value and
what is allowed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration value is invalid. The message names key, value and what is allowed."""


#: no integer key needs more (a batch of 2**40 images would not fit any machine), and
#: larger ones overflow inside torch and Python's slicing
MAX_INT = 2**40
#: error messages quote at most this many characters of a value from the input
EXCERPT_CHARS = 80


def shorten(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis where it was cut: what an
    error message quotes of the input (a 5 MB file echoed whole is no message)."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def quoted(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """``repr(value)``, shortened as :func:`shorten` does (the one way a config or
    experiment error quotes a value of the input)."""
    return shorten(repr(value), limit)


class _Section(BaseModel):
    # allow_inf_nan=False: every float key refuses NaN and ±inf (a run with lr .inf
    # trains a student of NaNs)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info):
        """pydantic reads true as 1 for an int key: ``train.epochs=true`` is a mistake."""
        items = v if isinstance(v, list) else [v]
        if any(isinstance(x, int) and not isinstance(x, bool) and abs(x) > MAX_INT for x in items):
            raise ValueError(f"too large: at most {MAX_INT}")
        if any(isinstance(x, bool) for x in items):
            annotation = str(cls.model_fields[info.field_name].annotation)
            if "bool" not in annotation and ("int" in annotation or "float" in annotation):
                raise ValueError("expected numbers, not booleans" if isinstance(v, list)
                                 else "expected a number, not a boolean")
        return v


Bits = Field(ge=2, le=8)

#: the ``teacher`` keys each built-in source reads besides ``source`` (qimera/teachers/*.py;
#: ``finish_teacher`` reads num_classes, mean, std, input_size and the eval_* keys for all);
#: a key that another source reads is refused when set. Sources added with
#: ``register_source`` are not checked: the library cannot know what they read.
_EVERY_TEACHER = ("name", "num_classes", "mean", "std", "input_size", "eval_resize", "eval_interpolation")
TEACHER_READS: dict[str, tuple[str, ...]] = {
    "pytorchcv": (*_EVERY_TEACHER, "pretrained", "cache_dir"),
    "torchvision": (*_EVERY_TEACHER, "pretrained", "cache_dir"),
    "timm": (*_EVERY_TEACHER, "pretrained", "cache_dir", "weights"),
    "checkpoint": (*_EVERY_TEACHER, "arch", "weights"),
    "demo": (*_EVERY_TEACHER, "cache_dir"),
}
#: accepted by every source although not every one reads them: ``cache_dir`` is a place on
#: the machine, set once for whichever source a run uses (params.yaml, an experiment's
#: ``set``); ``pretrained`` is a switch whose default every written-out config carries,
#: and ``false`` ("download nothing") is true of a source that downloads nothing
TEACHER_ANY_SOURCE = ("cache_dir", "pretrained")
#: the ``data`` keys each built-in dataset reads besides ``name`` (qimera/data.py)
_EVERY_DATASET = ("mean", "std", "batch_size", "num_workers", "limit")
DATA_READS: dict[str, tuple[str, ...]] = {
    "cifar10": (*_EVERY_DATASET, "root", "download"),
    "cifar100": (*_EVERY_DATASET, "root", "download"),
    "imagenet": (*_EVERY_DATASET, "path"),
    "npz": (*_EVERY_DATASET, "path"),
    "digits": _EVERY_DATASET,
}


def unread_keys(section: str, choice: str, values: dict[str, Any]) -> list[str]:
    """The keys of ``values`` (a ``teacher`` or ``data`` section) that are set (not their
    default) although ``choice`` (its source or dataset name) does not read them; [] for
    a source or dataset added by the user."""
    model, reads = (TeacherConfig, TEACHER_READS) if section == "teacher" else (DataConfig, DATA_READS)
    if choice not in reads:
        return []
    tolerated = TEACHER_ANY_SOURCE if section == "teacher" else ()
    keep = {"source", "name", *reads[choice], *tolerated}
    return [k for k, v in values.items()
            if k not in keep and k in model.model_fields and v != model.model_fields[k].default]


def _refuse_unread(section: str, choice_key: str, cfg: BaseModel) -> None:
    choice = getattr(cfg, choice_key)
    values = {k: getattr(cfg, k) for k in type(cfg).model_fields}
    unread = unread_keys(section, choice, values)
    if unread:
        reads = TEACHER_READS if section == "teacher" else DATA_READS
        key = unread[0]
        raise ValueError(
            f"{section}.{key}={quoted(values[key])}: not used by {section}.{choice_key}={choice!r} (it reads: "
            f"{', '.join(reads[choice])}); remove it or set it to null")


class TeacherConfig(_Section):
    """The ``teacher`` section; :func:`qimera.teachers.load_teacher` takes it as it is."""

    source: str = "demo"
    name: Optional[str] = None
    arch: Optional[str] = None
    weights: Optional[str] = None
    num_classes: Optional[int] = Field(default=None, ge=2)
    pretrained: bool = True
    cache_dir: Optional[str] = None
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    input_size: Optional[list[int]] = None
    #: evaluation images: the shorter side is resized to this before the centre crop to the
    #: input size (``None``: the source's own transform)
    eval_resize: Optional[int] = Field(default=None, ge=1)
    #: evaluation images are resized with this (``None``: the source's own transform)
    eval_interpolation: Optional[Literal["nearest", "bilinear", "bicubic"]] = None

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        from ._registry import TEACHER_SOURCES  # every registered source, built in or added

        return TEACHER_SOURCES.check(v)

    @field_validator("mean", "std")
    @classmethod
    def _stats(cls, v: Optional[list[float]], info) -> Optional[list[float]]:
        if v is None:
            return v
        if not v:  # (NaN and infinities are refused for every float key: allow_inf_nan=False)
            raise ValueError("must not be empty: give one number per input channel")
        if info.field_name == "std" and any(x <= 0 for x in v):
            raise ValueError("every value must be > 0")
        return v

    @field_validator("input_size")
    @classmethod
    def _input_size(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is not None and (len(v) != 3 or min(v) < 1):
            raise ValueError("expected three positive ints [channels, height, width]")
        return v

    @model_validator(mode="after")
    def _needs(self):
        if self.source in ("pytorchcv", "torchvision", "timm") and not self.name:
            raise ValueError(f"teacher.name is required when teacher.source={self.source!r}")
        if self.source == "checkpoint":
            missing = [k for k in ("arch", "weights") if not getattr(self, k)]
            if missing:
                raise ValueError(
                    " and ".join(f"teacher.{k}" for k in missing) + (" is" if len(missing) == 1 else " are")
                    + " required when teacher.source='checkpoint' (arch as 'package.module:callable', "
                    "weights as a file path)"
                )
        _refuse_unread("teacher", "source", self)
        return self


class DataConfig(_Section):
    """The ``data`` section; :func:`qimera.data.load_eval_data` takes it as it is."""

    name: str = "digits"
    path: Optional[str] = None
    root: Optional[str] = None
    download: bool = False
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    batch_size: int = Field(default=500, ge=1)
    num_workers: int = Field(default=0, ge=0)
    limit: Optional[int] = Field(default=None, ge=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        from ._registry import DATA_LOADERS  # every registered dataset, built in or added

        return DATA_LOADERS.check(v)

    @model_validator(mode="after")
    def _needs(self):
        if self.name in ("npz", "imagenet") and not self.path:
            raise ValueError(f"data.path is required when data.name={self.name!r}")
        _refuse_unread("data", "name", self)
        return self


class QuantConfig(_Section):
    w_bits: int = Bits
    a_bits: int = Bits
    first_last_8bit: bool = False
    exclude: list[str] = Field(default_factory=list)
    ema_momentum: float = Field(default=0.9, gt=0.0, lt=1.0)
    #: evaluate the student as its int8 ONNX form computes (QuantRecipe.integer_exact):
    #: the top-1 a run reports is then the deployed file's; the paper's recipe is false
    integer_exact: bool = False

    # w_bits/a_bits have no default: a run must say which bit width it wants.

    def recipe(self):
        """This section as the library's :class:`qimera.quant.QuantRecipe` (the one place
        where ``first_last_8bit`` becomes 8-bit first and last layers)."""
        from .quant.recipe import QuantRecipe

        return QuantRecipe(w_bits=self.w_bits, a_bits=self.a_bits,
                           first_last_bits=8 if self.first_last_8bit else None,
                           exclude=tuple(self.exclude), act_momentum=self.ema_momentum,
                           integer_exact=self.integer_exact)


class GeneratorConfig(_Section):
    variant: Literal["cifar", "imagenet"] = "cifar"
    p: float = Field(default=0.4, ge=0.0, le=1.0)
    k: int = Field(default=2, ge=1)
    dm_layers: int = Field(default=1, ge=0, le=64)
    embedding_init: Literal["random", "teacher_fc"] = "random"
    freeze_embeddings: bool = False
    noise_scale: float = Field(default=1.0, gt=0.0)
    combine: Literal["add", "multiply"] = "add"
    #: how the ImageNet generator's conditional BatchNorm mixes the γ and β of a superposed
    #: sample: ``sum`` is Σλγ, the coefficients of the embeddings (the paper, SPEC §2);
    #: ``mean`` is Σλγ/K, the authors' released ImageNet code (SPEC §5.8)
    cbn_mix: Literal["sum", "mean"] = "sum"
    #: whether the class embedding enters at the generator's input: ``auto`` is on, except
    #: for GDFQ's ImageNet generator, whose own code has none (the class enters through the
    #: conditional BatchNorm only); ``off`` needs the ImageNet variant
    input_embedding: Literal["auto", "on", "off"] = "auto"

    @model_validator(mode="after")
    def _class_enters(self):
        if self.k == 1 and self.p > 0:
            raise ValueError(f"generator.k=1 with generator.p={self.p}: a superposition of one class is a plain "
                             "sample; give generator.k >= 2 for superposed batches, or generator.p=0 for none")
        if self.input_embedding == "off" and self.variant != "imagenet":
            raise ValueError("generator.input_embedding='off' needs generator.variant='imagenet': the CIFAR generator "
                             "has no conditional BatchNorm, so the class would enter nowhere")
        return self


class TrainConfig(_Section):
    epochs: int = Field(default=400, ge=1)
    iters_per_epoch: int = Field(default=200, ge=1)
    batch_size: int = Field(default=200, ge=2)
    lr_student: float = Field(default=1e-4, gt=0.0)
    lr_generator: float = Field(default=1e-3, gt=0.0)
    lr_milestones: list[int] = Field(default_factory=lambda: [100, 200, 300])
    lr_gamma: float = Field(default=0.1, gt=0.0, le=1.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(default=1e-4, ge=0.0)
    generator_betas: list[float] = Field(default_factory=lambda: [0.5, 0.999])
    warmup_epochs: int = Field(default=4, ge=0)
    calibration_epochs: int = Field(default=4, ge=1)
    bns_weight: float = Field(default=0.1, ge=0.0)
    kd_temperature: float = Field(default=20.0, gt=0.0)
    kd_reduction: Literal["mean", "batchmean"] = "mean"
    seed: int = Field(default=1, ge=0, le=2**63 - 2)  # torch generators take 64-bit seeds (seed + 1 is used too)
    device: str = "auto"
    amp: Literal["none", "bf16", "auto"] = "none"
    #: torch.compile of the training step's two parts (generator + teacher + BNS loss, and
    #: the student's loss): none (eager), default, reduce-overhead (CUDA graphs on a GPU),
    #: or auto (on where it was measured to pay: qimera.trainer.resolve_compile)
    compile: Literal["none", "default", "reduce-overhead", "auto"] = "none"
    channels_last: Literal["auto", "on", "off"] = "auto"
    out_dir: str = Field(default="runs/default", min_length=1, pattern=r"\S")
    resume: bool = True
    eval_every: int = Field(default=1, ge=1)
    log_every: int = Field(default=20, ge=1)
    progress: bool = True

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", v):
            return v
        raise ValueError("allowed: 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")

    @field_validator("generator_betas")
    @classmethod
    def _betas(cls, v: list[float]) -> list[float]:
        if len(v) != 2 or not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("must be two numbers in [0, 1)")
        return v

    @field_validator("lr_milestones")
    @classmethod
    def _milestones(cls, v: list[int]) -> list[int]:
        if any(m < 1 for m in v) or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("must be strictly increasing positive epoch numbers")
        return v

    @model_validator(mode="after")
    def _schedule(self):
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"train.warmup_epochs={self.warmup_epochs} must be below train.epochs={self.epochs}: the student "
                "is trained only after the warm-up, so it would never be trained")
        late = [m for m in self.lr_milestones if m > self.epochs]
        if late:
            raise ValueError(
                f"train.lr_milestones={shorten(self.lr_milestones)} has {shorten(late)} beyond the last epoch "
                "(train.epochs="
                f"{self.epochs}), where it would never take effect; use milestones up to {self.epochs} "
                "(e.g. scaled with the epochs) or []")
        return self


class PartsConfig(_Section):
    """The method's parts beside its generator (:mod:`qimera.parts`), by name from their
    registries. The defaults are the paper's GDFQ and Qimera; the additions of later work
    (SynQ's hard-sample rule and low-pass filter, weight averaging of the student) are off."""

    #: the generator's loss, a sum of terms in this order (``bns`` weighted by train.bns_weight)
    generator_loss: list[str] = Field(default_factory=lambda: ["ce", "bns"], min_length=1)
    #: the student's loss: ``kd`` and ``ce`` (the paper), or ``ce_easy`` for SynQ's rule
    student_loss: list[str] = Field(default_factory=lambda: ["kd", "ce"], min_length=1)
    #: ``none`` or ``lowpass`` (SynQ's Gaussian low-pass filter of what the student sees)
    image_filter: str = "none"
    #: ``none``, ``ema`` or ``swa``: the student that is evaluated and exported
    averaging: str = "none"
    #: ``ce_easy``: a sample is easy when the teacher's difficulty is below this (SynQ: 0.5)
    easy_tau: float = Field(default=0.5, gt=0.0, le=1.0)
    #: ``lowpass``: the cutoff D0 in frequency steps; null: SynQ's 80 at 224 pixels, scaled
    #: to the teacher's input side
    lowpass_d0: Optional[float] = Field(default=None, gt=0.0)
    #: ``ema``: the decay per student step
    ema_decay: float = Field(default=0.99, gt=0.0, lt=1.0)
    #: ``swa``: the 1-based epoch from which the steps are averaged; null: the epoch after
    #: the last train.lr_milestones step (or the first trained epoch without one)
    swa_start_epoch: Optional[int] = Field(default=None, ge=1)
    #: ``margin`` (AdaDFQ): the bounds of the normalised teacher-student disagreement
    #: (AdaDFQ's CIFAR settings: 0.1 and 0.8)
    margin_low: float = Field(default=0.1, ge=0.0, lt=1.0)
    margin_high: float = Field(default=0.8, gt=0.0, le=1.0)

    @field_validator("generator_loss", "student_loss")
    @classmethod
    def _terms(cls, v: list[str], info) -> list[str]:
        from . import _registry

        registry = _registry.GENERATOR_TERMS if info.field_name == "generator_loss" else _registry.STUDENT_TERMS
        for name in v:
            registry.check(name)
        repeated = sorted({n for n in v if v.count(n) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} listed more than once: each term is added once")
        if {"ce", "ce_easy"} <= set(v):
            raise ValueError("ce and ce_easy are two forms of the label's cross-entropy: list one of them")
        return v

    @field_validator("image_filter")
    @classmethod
    def _filter(cls, v: str) -> str:
        from ._registry import IMAGE_FILTERS

        return IMAGE_FILTERS.check(v)

    @field_validator("averaging")
    @classmethod
    def _averaging(cls, v: str) -> str:
        from ._registry import AVERAGING

        return AVERAGING.check(v)

    @model_validator(mode="after")
    def _options_in_use(self):
        """An option of a part that is not chosen would change nothing: refused."""
        if self.margin_low >= self.margin_high:
            raise ValueError(f"parts.margin_low={quoted(self.margin_low)} must be below parts.margin_high="
                             f"{quoted(self.margin_high)}")
        for key, (choice, needs) in PARTS_OPTIONS.items():
            chosen = getattr(self, choice)
            if getattr(self, key) != PartsConfig.model_fields[key].default and needs not in (
                    chosen if isinstance(chosen, list) else [chosen]):
                raise ValueError(f"parts.{key}={quoted(getattr(self, key))} is read only with {needs!r} in "
                                 f"parts.{choice} (now {quoted(chosen)}): add it there, or remove parts.{key}")
        return self


#: each option of the ``parts`` section: the key that chooses its part, and that part
PARTS_OPTIONS = {"easy_tau": ("student_loss", "ce_easy"), "lowpass_d0": ("image_filter", "lowpass"),
                 "ema_decay": ("averaging", "ema"), "swa_start_epoch": ("averaging", "swa"),
                 "margin_low": ("generator_loss", "margin"), "margin_high": ("generator_loss", "margin")}


class NaiveConfig(_Section):
    """The naive baseline: activation ranges calibrated on Gaussian noise."""

    enabled: bool = True
    batches: int = Field(default=8, ge=1)
    batch_size: int = Field(default=200, ge=1)


class ZeroQConfig(_Section):
    """ZeroQ: images optimised so their BN statistics match the teacher's."""

    batch_size: int = Field(default=64, ge=2)
    steps: int = Field(default=500, ge=1)
    lr: float = Field(default=0.5, gt=0.0)


class Config(_Section):
    method: Literal["qimera", "gdfq", "zeroq", "naive"] = "qimera"
    preset: Optional[str] = None
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    quant: QuantConfig
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parts: PartsConfig = Field(default_factory=PartsConfig)
    naive: NaiveConfig = Field(default_factory=NaiveConfig)
    zeroq: ZeroQConfig = Field(default_factory=ZeroQConfig)

    @model_validator(mode="after")
    def _swa_start(self):
        start = self.parts.swa_start_epoch
        if self.parts.averaging == "swa" and start is not None and not (
                self.train.warmup_epochs < start <= self.train.epochs):
            raise ValueError(
                f"parts.swa_start_epoch={start}: SWA averages trained epochs, {self.train.warmup_epochs + 1} to "
                f"{self.train.epochs} here (after train.warmup_epochs={self.train.warmup_epochs}, up to "
                f"train.epochs={self.train.epochs}); or null for the epoch after the last lr step")
        return self

    def effective_generator(self) -> GeneratorConfig:
        """The generator the method really uses: GDFQ fixes p=0, no DM and the
        multiplicative noise (SPEC §4), and on ImageNet its class enters through the
        conditional BatchNorm only (``input_embedding: auto``). The embedding initialisation
        is the config's for every method that has embeddings (GDFQ's own is ``random``), so
        that a comparison of methods need not change it too."""
        g = self.generator
        if self.method == "gdfq":
            g = g.model_copy(update=dict(p=0.0, k=1, dm_layers=0, combine="multiply", freeze_embeddings=False))
        if g.input_embedding == "auto":
            off = self.method == "gdfq" and g.variant == "imagenet"
            g = g.model_copy(update=dict(input_embedding="off" if off else "on"))
        return g

    def resolved(self) -> dict[str, Any]:
        """The configuration as it runs (GDFQ's fixed generator settings applied)."""
        d = self.model_dump(mode="json")
        d["generator"] = self.effective_generator().model_dump(mode="json")
        return d

    def fingerprint(self, ignore: tuple[str, ...] = ()) -> str:
        """sha256 of the resolved config without the ``section.key`` names in ``ignore``
        (and without the keys of :data:`FINGERPRINT_WHEN_SET` while they have the value it
        gives them)."""
        d = self.resolved()
        for dotted, before in FINGERPRINT_WHEN_SET.items():
            sec, _, key = dotted.partition(".")
            if key in d.get(sec, {}) and d[sec][key] == before:
                d[sec].pop(key)
        for sec in FINGERPRINT_NEW_SECTIONS:
            if d.get(sec) == {}:
                d.pop(sec)
        for dotted in ignore:
            sec, _, key = dotted.partition(".")
            if key:
                d.get(sec, {}).pop(key, None)
            else:
                d.pop(sec, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


#: keys added after fingerprints were first recorded, with the value that means the
#: behaviour from before they existed: left out of the fingerprint while they have it, so
#: that a configuration that does not set them keeps its fingerprint (its checkpoint still
#: resumes and its finished experiment cells are not run again)
FINGERPRINT_WHEN_SET = {"teacher.eval_resize": None, "teacher.eval_interpolation": None, "train.compile": "none",
                        "generator.cbn_mix": "sum", "generator.input_embedding": "on",
                        "quant.integer_exact": False,
                        **{f"parts.{k}": f.default_factory() if f.default_factory else f.default
                           for k, f in PartsConfig.model_fields.items()}}
#: sections added after fingerprints were first recorded: left out of the fingerprint
#: while all their keys have the values of :data:`FINGERPRINT_WHEN_SET`
FINGERPRINT_NEW_SECTIONS = ("parts",)


def _format_errors(err: ValidationError, data: dict) -> str:
    """One line: ``invalid configuration: key=value: what is allowed; ...``."""
    return "invalid configuration: " + "; ".join(_error_lines(err, data))


def _error_lines(err: ValidationError, data: dict) -> list[str]:
    lines = []
    for e in err.errors():
        loc = shorten(".".join(str(p) for p in e["loc"] if p is not None))
        msg = shorten(e["msg"], 6 * EXCERPT_CHARS)  # pydantic's and the validators' own text
        if e["type"] == "extra_forbidden":
            section = e["loc"][0] if len(e["loc"]) > 1 else None
            model = Config.model_fields[section].annotation if section in Config.model_fields else Config
            allowed = sorted(getattr(model, "model_fields", Config.model_fields))
            lines.append(f"{loc}: unknown key; allowed keys{' in ' + str(section) if section else ''}: {', '.join(allowed)}")
            continue
        if e["type"] == "value_error" and msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        value = e.get("input")
        if isinstance(value, dict):
            # a section's own check names its keys already ("train.warmup_epochs=…")
            lines.append(f"{loc}: {msg}" if loc and not msg.startswith(f"{loc}.") else msg)
        else:
            lines.append(f"{loc}={quoted(value)}: {msg}")
    return lines


def parse_override(item: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], parsed YAML value)."""
    if "=" not in item:
        raise ConfigError(f"--set {quoted(item)}: expected section.key=value")
    key, _, raw = item.partition("=")
    path = key.strip().split(".")
    if not key.strip():
        raise ConfigError(f"--set {quoted(item)}: empty key")
    if not all(path):
        raise ConfigError(f"--set {quoted(item)}: key {quoted(key.strip())} has an empty part between dots; "
                          "write section.key=value")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {quoted(item)}: value is not valid YAML ({yaml_problem(exc)})") from None
    return path, value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (line and column)."""
    problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(exc, "context", None)
    return shorten(f"{context + ': ' if context else ''}{problem}", 4 * EXCERPT_CHARS) + where


#: YAML input nests at most this deep (a config needs 3 levels; ``[[[[…`` thousands deep
#: would exhaust Python's recursion limit in the composer)
MAX_YAML_DEPTH = 64


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: ``*name`` (and the ``<<: *name`` merge) is
    refused where it is met, so that a few hundred bytes of nested aliases cannot expand
    to gigabytes in memory and in error messages (a config never needs one); and nesting
    deeper than :data:`MAX_YAML_DEPTH` is refused likewise."""

    _depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, f"alias *{shorten(event.anchor, 40)} refused (anchors and aliases are not allowed in "
                "qimera's YAML input: write the value out)", event.start_mark)
        if self._depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels",
                                              event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


    def construct_yaml_int(self, node):
        # Python refuses to convert an integer string of more than sys.get_int_max_str_digits()
        # digits with a ValueError that PyYAML does not turn into a YAML error
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {len(node.value)} characters is too long (at most "
                f"{sys.get_int_max_str_digits()} digits)", node.start_mark) from None


_NoAliasLoader.add_constructor("tag:yaml.org,2002:int", _NoAliasLoader.construct_yaml_int)


def yaml_load(text: str) -> Any:
    """Parse YAML text safely and without aliases (:class:`_NoAliasLoader`); raises
    ``yaml.YAMLError`` (:func:`yaml_problem` says it in one line)."""
    loader = _NoAliasLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def safe_yaml_load(text: str, what: str, error: type[Exception] = ConfigError) -> Any:
    """The one reader of YAML the user wrote (configs, experiment files, params.yaml, the
    pipeline's run configs): :func:`yaml_load`, its failure as ``error("<what> is not valid
    YAML: <problem> at line L, column C")``."""
    try:
        return yaml_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{what} is not valid YAML: {yaml_problem(exc)}") from None


def read_yaml_mapping(path: str | os.PathLike, what: str, error: type[Exception] = ConfigError,
                      missing_hint: str = "does not exist") -> dict:
    """Read a YAML file whose top level must be a mapping; ``error(what + …)`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {missing_hint}")
    try:
        data = safe_yaml_load(path.read_text(encoding="utf-8"), what, error) or {}
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not UTF-8 text (byte {exc.start}: {exc.reason}); a config is a YAML text file") from None
    except OSError as exc:
        raise error(f"{what} cannot be read: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise error(f"{what}: top level must be a mapping of sections")
    return data


def load_config(source: str | os.PathLike | dict | Config, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated :class:`Config` from a YAML path, a dict or a Config."""
    if isinstance(source, Config):
        data = source.model_dump(mode="json")
    elif isinstance(source, dict):
        data = source
    else:
        data = read_yaml_mapping(source, f"config file {str(source)!r}")
    data = apply_overrides(data, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, data)) from None


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """Create ``train.out_dir`` and prove it is writable, or raise ConfigError."""
    return make_out_dir(out_dir)[0]


def make_out_dir(out_dir: str | os.PathLike) -> tuple[Path, bool]:
    """:func:`check_out_dir`, also saying whether this call created the directory (a
    failed run removes an empty one it made)."""
    created = create_out_dir(out_dir)
    return Path(out_dir), bool(created)


def create_out_dir(out_dir: str | os.PathLike, key: str = "train.out_dir") -> list[Path]:
    """Create ``train.out_dir`` (with its missing parents) and prove it is writable, or
    raise ConfigError naming it (as ``key``); returns the directories this call created,
    outermost first (:func:`remove_created_dirs` takes them away again)."""
    path = Path(out_dir)
    missing = [p for p in (path, *path.parents) if not p.exists() and not p.is_symlink()][::-1]
    created: list[Path] = []
    try:
        for p in missing:
            p.mkdir(exist_ok=True)
            created.append(p)
        path.mkdir(exist_ok=True)  # an existing file there is refused here
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        remove_created_dirs(created)
        raise ConfigError(
            f"{key}={str(out_dir)!r}: cannot create or write there ({exc.strerror or exc}); "
            "choose a writable directory"
        ) from None
    return created


def remove_created_dirs(created: list[Path]) -> None:
    """Remove the directories :func:`create_out_dir` made, innermost first, while they
    are empty: nothing a failed run or a check made is left behind."""
    for p in reversed(created):
        try:
            p.rmdir()
        except OSError:  # not empty (or gone): it and its parents stay
            return


def probe_out_dir(out_dir: str | os.PathLike, key: str = "train.out_dir") -> Path:
    """Prove that ``train.out_dir`` can be created and written, and leave nothing behind
    (``qimera check`` and :func:`qimera.api.prepare`; the run creates it when it starts)."""
    remove_created_dirs(create_out_dir(out_dir, key))
    return Path(out_dir)


def check_out_files(out_dir: str | os.PathLike, names: tuple[str, ...]) -> None:
    """Refuse a ``train.out_dir`` where a file a run writes (``names``) is something else,
    e.g. a directory: the run could not publish it at the end of its first epoch."""
    for name in names:
        path = Path(out_dir) / name
        if path.exists() and not path.is_file():
            kind = "a directory" if path.is_dir() else "not a regular file"
            raise ConfigError(f"train.out_dir={str(out_dir)!r}: {name} there is not a file ({kind}); "
                              "remove it, or choose another out_dir")
