"""Integer export of a fake-quantized student, and the loader that rebuilds it.

An export directory holds two files:

``student.safetensors``
    For every weight-quantized layer ``<name>``: ``<name>.qweight`` (uint8: the integer
    weight ``q - qmin`` in ``[0, 2**b - 1]``, packed two per byte, low nibble first, when
    ``b <= 4``), ``<name>.scale`` (fp32 per output channel, the step ``1/s``),
    ``<name>.zero_point`` (int32 per output channel, PyTorch's convention, so that
    ``w = (q - zero_point) * scale`` with ``q`` on the signed grid ``[-2**(b-1), 2**(b-1)-1]``)
    and ``<name>.inv_scale`` (fp32, ``s`` itself, so the loader reproduces the fake-quant
    forward bit for bit). For every activation quantizer ``<name>``: ``<name>.lo`` and
    ``<name>.hi`` (the frozen, bias-corrected range). Everything else the model needs
    (biases, BatchNorm parameters and statistics) under ``float.<key>``.
``quant_map.json``
    Format version, the architecture (``module:callable`` and its keyword arguments), the
    student's :class:`~qimera.quant.QuantRecipe` (bit widths, first/last bits, exclusions,
    activation sites), and per layer its kind, bits, weight shape and whether it is
    packed; per activation site its bits.

:func:`load_integer` rebuilds the network from the architecture, inserts the same
activation quantizers (``torch.fx`` finds the same sites in the same order), loads the
float tensors, and replaces each weight-quantized layer by a plain float layer holding the
dequantized weight ``(q + z) / s``: exactly the weight the fake-quant student computes at
every forward, so the logits agree to float rounding.

:func:`export_deployables` is the whole export of a trained student in one call: its state
dict, the integer artifact, the Q/DQ ONNX model (:mod:`qimera.onnx_export`) and
``verification.json`` (all three scored on evaluation data in one pass), failing when an
export does not reproduce the student within :data:`INTEGER_MAX_DELTA` and
:data:`ONNX_MAX_TOP1_GAP`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from ._files import atomic_dir, atomic_write, check_replaceable
from .quant import (ActQuantizer, QuantRecipe, quantize_model, recipe_of, set_calibrating, set_module,
                    weight_quant_types)
from .quant.functional import affine_params, per_channel_minmax, qrange

#: 2: the recipe under "recipe" (1 had its bit options at the top level; still read)
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
TENSORS_FILE = "student.safetensors"
MAP_FILE = "quant_map.json"
#: the files :func:`export_deployables` writes into its directory
STUDENT_FILE = "student.pt"
INTEGER_DIR = "integer"
ONNX_FILE = "student.onnx"
#: the deployable ONNX form (integer kernels in onnxruntime, :mod:`qimera.onnx_int8`)
ONNX_INT8_FILE = "student.int8.onnx"
VERIFICATION_FILE = "verification.json"
#: the reloaded integer model's logits may differ from the student's by float rounding only
INTEGER_MAX_DELTA = 1e-5
#: onnxruntime's top-1 may differ from the student's by at most this many points
#: (ONNX rounds x / scale where the student rounds x * s; see qimera.onnx_export)
ONNX_MAX_TOP1_GAP = 0.1


class ExportError(ValueError):
    """The student or the export directory cannot be exported / loaded."""


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit values (uint8 in [0, 15]) two per byte, low nibble first."""
    flat = values.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: the first ``numel`` 4-bit values as uint8."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=1).reshape(-1)[:numel]


def integer_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, s, z)`` of a per-output-channel quantized weight: ``q`` the integers on the
    signed grid (float tensor), ``s``/``z`` of SPEC §2 shaped to broadcast against the
    weight, so that the fake-quant weight is ``(q + z) / s``."""
    w = weight.detach().float()
    qmin, qmax = qrange(bits)
    lo, hi = per_channel_minmax(w)
    s, z = affine_params(lo, hi, bits)
    return torch.clamp(torch.round(w * s - z), qmin, qmax), s, z


def _weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, weight_quant_types())}


def _act_sites(model: nn.Module) -> dict[str, ActQuantizer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ActQuantizer)}


def exportable_parts(student: nn.Module) -> tuple[dict[str, nn.Module], dict[str, ActQuantizer]]:
    """The weight-quantized layers and activation quantizers of a trained student, by name;
    raises :class:`ExportError` when there is nothing to export or a range is not frozen."""
    layers = _weight_layers(student)
    sites = _act_sites(student)
    if not layers:
        raise ExportError("the model has no weight-quantized layer (QuantConv2d/QuantLinear) to export")
    for name, site in sites.items():
        if site.calibrating or float(site.steps) == 0.0:
            raise ExportError(f"activation quantizer {name} is not frozen after calibration; export a trained student")
    return layers, sites


def _write_atomically(out_dir: Path, tensors: dict[str, torch.Tensor], qmap: dict) -> None:
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE))
        (tmp / MAP_FILE).write_text(json.dumps(qmap, indent=2) + "\n")


@torch.no_grad()
def export_integer(
    student: nn.Module,
    out_dir: str | os.PathLike,
    *,
    arch: str,
    arch_kwargs: dict[str, Any] | None = None,
) -> dict:
    """Write the integer artifact of ``student`` (built by :func:`qimera.quantize_model`
    from ``arch(**arch_kwargs)``; its recipe is read from the student) into ``out_dir``;
    returns the quantization map. The directory appears complete or not at all, and
    replaces only a directory qimera wrote: an existing ``out_dir`` holding anything else
    is refused (:class:`qimera._files.OutputDirError`) before anything is computed."""
    check_replaceable(out_dir)
    try:
        recipe = recipe_of(student)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    layers, sites = exportable_parts(student)
    tensors: dict[str, torch.Tensor] = {}
    qmap: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs or {}),
        "recipe": recipe.to_dict(),
        "weight_convention": "w = (q - zero_point) * scale, q signed in [-2^(b-1), 2^(b-1)-1]; "
                             "qweight stores q - qmin (unsigned), packed two per byte low nibble first when bits <= 4",
        "layers": {},
        "activations": {},
    }
    skip: set[str] = set()
    for name, mod in layers.items():
        w = mod.weight.detach().float().cpu()
        bits = mod.w_bits
        qmin, qmax = qrange(bits)
        q, s, z = integer_weight(w, bits)
        unsigned = (q - qmin).to(torch.uint8)
        packed = bits <= 4
        tensors[f"{name}.qweight"] = pack_int4(unsigned) if packed else unsigned.reshape(-1)
        tensors[f"{name}.scale"] = (1.0 / s).reshape(-1).contiguous()
        tensors[f"{name}.inv_scale"] = s.reshape(-1).contiguous()
        tensors[f"{name}.zero_point"] = (-z).reshape(-1).to(torch.int32).contiguous()
        qmap["layers"][name] = {
            "kind": "conv2d" if isinstance(mod, nn.Conv2d) else "linear",
            "bits": bits, "shape": list(w.shape), "packed": packed, "qmin": qmin, "qmax": qmax,
        }
        skip.add(f"{name}.weight")
    for name, site in sites.items():
        lo, hi = site.range
        tensors[f"{name}.lo"] = lo.detach().float().cpu().reshape(1)
        tensors[f"{name}.hi"] = hi.detach().float().cpu().reshape(1)
        qmap["activations"][name] = {"bits": site.bits}
        skip.update({f"{name}.min_avg", f"{name}.max_avg", f"{name}.steps"})
    for key, value in student.state_dict().items():
        if key not in skip:
            tensors[f"float.{key}"] = value.detach().cpu().contiguous()
    _write_atomically(Path(out_dir), tensors, qmap)
    return qmap


def _build_arch(arch: str, kwargs: dict) -> nn.Module:
    from ._registry import import_callable

    return import_callable(arch, "quant map arch", ExportError)(**kwargs)


def _dequantized_weight(tensors: dict[str, torch.Tensor], name: str, info: dict) -> torch.Tensor:
    numel = 1
    for d in info["shape"]:
        numel *= d
    raw = tensors[f"{name}.qweight"]
    unsigned = unpack_int4(raw, numel) if info["packed"] else raw
    q = unsigned.float() + info["qmin"]
    shape = [info["shape"][0]] + [1] * (len(info["shape"]) - 1)
    s = tensors[f"{name}.inv_scale"].reshape(shape)
    z = -tensors[f"{name}.zero_point"].float().reshape(shape)
    return ((q.reshape(info["shape"]) + z) / s).contiguous()


def _float_twin(mod: nn.Module, weight: torch.Tensor) -> nn.Module:
    if isinstance(mod, nn.Conv2d):
        new = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                        mod.dilation, mod.groups, mod.bias is not None, mod.padding_mode)
    else:
        new = nn.Linear(mod.in_features, mod.out_features, mod.bias is not None)
    new.weight = nn.Parameter(weight, requires_grad=False)
    if mod.bias is not None:
        new.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
    return new


@torch.no_grad()
def load_integer(path: str | os.PathLike) -> nn.Module:
    """Rebuild the quantized network of an export directory (eval mode, CPU)."""
    from safetensors.torch import load_file

    path = Path(path)
    map_file, tensor_file = path / MAP_FILE, path / TENSORS_FILE
    if not (map_file.is_file() and tensor_file.is_file()):
        raise ExportError(f"{path}: not an integer export (needs {MAP_FILE} and {TENSORS_FILE})")
    qmap = json.loads(map_file.read_text())
    if qmap.get("format_version") not in READABLE_VERSIONS:
        raise ExportError(f"{map_file}: format_version {qmap.get('format_version')!r}, this loader reads "
                          f"{', '.join(map(str, READABLE_VERSIONS))}")
    tensors = load_file(str(tensor_file))
    model = _build_arch(qmap["arch"], qmap["arch_kwargs"])
    if qmap["format_version"] == 1:
        recipe = QuantRecipe(qmap["w_bits"], qmap["a_bits"], qmap["first_last_bits"], tuple(qmap["exclude"]))
    else:
        recipe = QuantRecipe.from_dict(qmap["recipe"])
    student, _ = quantize_model(model, recipe)
    layers = _weight_layers(student)
    sites = _act_sites(student)
    if set(layers) != set(qmap["layers"]) or set(sites) != set(qmap["activations"]):
        raise ExportError(f"{map_file}: the rebuilt {qmap['arch']} has other quantized layers or activation "
                          "sites than the export (different architecture or library version)")
    floats = {k[len("float."):]: v for k, v in tensors.items() if k.startswith("float.")}
    missing, unexpected = student.load_state_dict(floats, strict=False)
    expected_missing = {f"{n}.weight" for n in layers} | {
        f"{n}.{b}" for n in sites for b in ("min_avg", "max_avg", "steps")}
    if set(missing) - expected_missing or unexpected:
        raise ExportError(f"{tensor_file}: float tensors do not fit {qmap['arch']} "
                          f"(missing {sorted(set(missing) - expected_missing)[:10]}, unexpected {sorted(unexpected)[:10]})")
    for name, site in sites.items():
        # a frozen quantizer whose bias-corrected range is exactly the exported one
        site.min_avg.copy_(tensors[f"{name}.lo"].reshape(()))
        site.max_avg.copy_(tensors[f"{name}.hi"].reshape(()))
        site.steps.fill_(float("inf"))  # 1 - m**inf = 1: no bias correction left
    set_calibrating(student, False)
    for name, mod in layers.items():
        set_module(student, name, _float_twin(mod, _dequantized_weight(tensors, name, qmap["layers"][name])))
    for p in student.parameters():
        p.requires_grad_(False)
    return student.eval()


# --------------------------------------------------------------------------- the whole export


def check_verification(v: dict) -> None:
    """Raise :class:`ExportError` when an exported model does not reproduce the student
    within :data:`INTEGER_MAX_DELTA` (logits) and :data:`ONNX_MAX_TOP1_GAP` (top-1)."""
    # written as "not (x <= bound)" so that NaN fails too
    if "integer_max_abs_logit_delta" in v and not v["integer_max_abs_logit_delta"] <= INTEGER_MAX_DELTA:
        raise ExportError(
            f"export: the reloaded integer model's logits differ from the student's by "
            f"{v['integer_max_abs_logit_delta']:.3g} (> {INTEGER_MAX_DELTA}); see outputs of qimera.export")
    if "onnx_top1" in v:
        gap = abs(v["onnx_top1"] - v["student_top1"])
        if not gap <= ONNX_MAX_TOP1_GAP:
            raise ExportError(
                f"export: onnxruntime top-1 {v['onnx_top1']:.2f}% differs from the student's "
                f"{v['student_top1']:.2f}% by {gap:.2f} points (> {ONNX_MAX_TOP1_GAP})")


def int8_rejection(v: dict) -> str | None:
    """Why the int8 form of verification ``v`` is not shipped (its top-1 differs from the
    student's by more than :data:`ONNX_MAX_TOP1_GAP`, or is NaN), or None when it passes
    or was not made."""
    if "onnx_int8_top1" not in v:
        return None
    gap = abs(v["onnx_int8_top1"] - v["student_top1"])
    if gap <= ONNX_MAX_TOP1_GAP:
        return None
    return (f"its top-1 {v['onnx_int8_top1']:.2f}% differs from the student's {v['student_top1']:.2f}% by "
            f"{gap:.2f} points (> {ONNX_MAX_TOP1_GAP}; same prediction on "
            f"{100 * v['onnx_int8_prediction_agreement']:.2f}% of the images): its integer kernels round each bias "
            "to the int32 accumulator grid, and a sensitive 4-bit network amplifies the one-level flips that causes "
            "(qimera.onnx_int8)")


def export_deployables(
    student: nn.Module,
    out_dir: str | os.PathLike,
    loader,
    *,
    arch: str,
    arch_kwargs: dict[str, Any] | None = None,
    input_size: Sequence[int],
    opset: int | None = None,
    metadata: dict[str, Any] | None = None,
    verify_samples: int | None = None,
    latency_runs: int = 0,
    reference: nn.Module | None = None,
    int8: bool = True,
) -> dict[str, Any]:
    """Export a trained student into ``out_dir`` and verify the exports.

    Writes :data:`STUDENT_FILE` (the fake-quant state dict), :data:`INTEGER_DIR`
    (:func:`export_integer`), :data:`ONNX_FILE` (the Q/DQ reference form,
    :func:`qimera.onnx_export.export_onnx` at ``opset``), :data:`ONNX_INT8_FILE` (the
    deployable int8 form at ``opset`` or 21, whichever is newer, so that its weights are
    packed int4; skipped, with the reason under ``"onnx_int8"``, when ``int8`` is false or
    for a student torch.fx could not trace) and :data:`VERIFICATION_FILE`: the student, the reloaded integer
    model and both ONNX forms under onnxruntime scored on ``loader`` (its first
    ``verify_samples`` images, or all) in one pass. An int8 form whose top-1 misses the
    student's by more than :data:`ONNX_MAX_TOP1_GAP` is removed again, with the reason
    under ``"onnx_int8"."rejected"`` (:func:`int8_rejection`): measured, not shipped. With ``latency_runs`` > 0 it also
    holds each form's file size, the operators onnxruntime's optimised graph runs and its
    median latency at :data:`qimera.onnx_export.LATENCY_BATCHES` (``reference``, the
    float teacher, is timed too, as plain ONNX in a temporary file), under
    ``"deployment"``, with the machine they were measured on. Returns that verification
    after :func:`check_verification` passed. Needs the ``onnx`` extra.

    ``out_dir`` appears complete or not at all (:func:`qimera._files.atomic_dir`): it may
    be absent, empty or an earlier export of qimera's; anything else is refused before the
    work starts, and left as it is.
    """
    import torch.fx as fx

    from .evaluate import check_finite_parameters
    from .onnx_export import DEFAULT_OPSET, export_onnx, verify_exports
    from .onnx_int8 import INT8_DEFAULT_OPSET, check_onnxruntime

    check_finite_parameters(student, "student")
    if int8:
        check_onnxruntime()  # before any file is written: the int8 form needs a recent onnxruntime
    with atomic_dir(out_dir) as out:
        state = {k: v.detach().cpu() for k, v in student.state_dict().items()}
        atomic_write(out / STUDENT_FILE, lambda handle: torch.save(state, handle), "wb")
        export_integer(student, out / INTEGER_DIR, arch=arch, arch_kwargs=arch_kwargs)
        opset = DEFAULT_OPSET if opset is None else int(opset)
        report = export_onnx(student, out / ONNX_FILE, input_size=input_size, opset=opset, metadata=metadata)
        int8_report: dict[str, Any]
        if not int8:
            int8_report = {"skipped": "switched off (export.int8_form: false)"}
        elif isinstance(student, fx.GraphModule):
            int8_report = export_onnx(student, out / ONNX_INT8_FILE, input_size=input_size, form="int8",
                                      opset=max(opset, INT8_DEFAULT_OPSET), metadata=metadata).to_dict()
        else:
            int8_report = {"skipped": "the student is not a torch.fx graph (its teacher could not be traced), "
                                      "which the int8 form's rewrite needs"}
        verification = verify_exports(student, loader, integer_dir=out / INTEGER_DIR, onnx_path=out / ONNX_FILE,
                                      onnx_models={} if "skipped" in int8_report else {"onnx_int8": out / ONNX_INT8_FILE},
                                      max_samples=verify_samples)
        verification["onnx"] = report.to_dict()
        verification["onnx_int8"] = int8_report
        if latency_runs > 0:
            from .onnx_deploy import deployment_figures

            forms = {"qdq": out / ONNX_FILE}
            if "skipped" not in int8_report:
                forms["int8"] = out / ONNX_INT8_FILE
            verification["deployment"] = deployment_figures(forms, input_size, runs=latency_runs, reference=reference)
        check_verification(verification)
        rejected = int8_rejection(verification)
        if rejected:  # measured and reported, not shipped
            verification["onnx_int8"]["rejected"] = rejected
            (out / ONNX_INT8_FILE).unlink()
        atomic_write(out / VERIFICATION_FILE, lambda handle: handle.write(json.dumps(verification, indent=2) + "\n"), "w")
    return verification
