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
every forward, so the logits agree to float rounding (within :data:`INTEGER_MAX_DELTA`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .._files import atomic_dir, check_replaceable
from ..quant import (ActQuantizer, QuantRecipe, quantize_model, recipe_of, set_calibrating, set_module,
                     weight_quant_types)
from ..quant.functional import affine_params, per_channel_minmax, qrange

#: 2: the recipe under "recipe" (1 had its bit options at the top level; still read)
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
TENSORS_FILE = "student.safetensors"
MAP_FILE = "quant_map.json"
#: the reloaded integer model's logits may differ from the student's by float rounding only
INTEGER_MAX_DELTA = 1e-5


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
    from .._registry import import_callable

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


def float_twin(mod: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A plain ``nn.Conv2d``/``nn.Linear`` with the shape and bias of the quantized layer
    ``mod`` and the (frozen) float ``weight``."""
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
        set_module(student, name, float_twin(mod, _dequantized_weight(tensors, name, qmap["layers"][name])))
    for p in student.parameters():
        p.requires_grad_(False)
    return student.eval()
