"""The integer-exact int8 form's convolutions as channels-last ``QLinearConv``: a pass over
the ONNX graph that torch exported, so that onnxruntime runs the residual chain without a
layout change between its kernels.

onnxruntime fuses each ``DequantizeLinear -> Conv -> QuantizeLinear`` of the int8 form
into ``QLinearConv`` and then runs it channels-last (NHWC), with a ``Transpose`` before
and after it. Its transpose optimiser removes a pair of them only where that removes more
transposes than it adds; at a residual addition whose shortcut comes from the float stem
(NCHW) it adds as many as it removes, so it stops there, and every addition of the
network stays NCHW: two ``Transpose`` nodes per residual block (18 of them, a quarter of
the time of the shared ResNet-20 at batch 64 on a 2-core Xeon).

:func:`channels_last_convs` writes what the fusion would give, but channels-last from the
start: every such convolution becomes onnxruntime's ``com.microsoft.QLinearConv`` with
``channels_last=1`` (the same kernel, the same integers), and the operations around them
that do not depend on the layout (``Clip``, per-tensor ``QuantizeLinear`` and
``DequantizeLinear``, the additions) or whose axes can be renamed (``Slice``, ``Pad``: the
option-A shortcut) run channels-last too. A ``Transpose`` goes where this region meets
the rest of the graph: after the stem's quantizer, before the pooling. onnxruntime leaves
a convolution with ``channels_last=1`` as it is, and still fuses the additions into
``QLinearAdd``. The file then needs onnxruntime (its contrib domain), as the int8 form's
``QLinearAdd`` already does.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

__all__ = ["channels_last_convs", "MS_DOMAIN", "TO_NHWC", "TO_NCHW"]

MS_DOMAIN = "com.microsoft"
TO_NHWC = [0, 2, 3, 1]
TO_NCHW = [0, 3, 1, 2]
#: where an NCHW axis lies in NHWC
_NHWC_AXIS = {0: 0, 1: 3, 2: 1, 3: 2}
#: operations that compute the same thing in either layout (per-tensor Q/DQ only)
_ELEMENTWISE = {"Clip", "Relu", "DequantizeLinear", "QuantizeLinear", "Add"}
_CONV_ATTRS = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")


def _array(inits: dict, name: str):
    from onnx import numpy_helper

    return numpy_helper.to_array(inits[name]) if name in inits else None


class _Graph:
    """Producers, consumers and initializers of one graph, kept current as nodes change."""

    def __init__(self, proto):
        self.proto, self.graph = proto, proto.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.nodes = list(self.graph.node)
        self.fresh = 0

    def producers(self) -> dict[str, Any]:
        return {o: n for n in self.nodes for o in n.output}

    def consumers(self) -> dict[str, list]:
        out = defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                out[i].append(n)
        return out

    def name(self, base: str) -> str:
        self.fresh += 1
        return f"{base}_cl{self.fresh}"

    def constant(self, base: str, array) -> str:
        from onnx import numpy_helper

        name = self.name(base)
        tensor = numpy_helper.from_array(array, name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def scalar(self, name: str) -> bool:
        value = _array(self.inits, name)
        return value is not None and value.size == 1

    def write(self) -> None:
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)


def _attr(node, key: str):
    from onnx import helper

    for a in node.attribute:
        if a.name == key:
            return helper.get_attribute_value(a)
    return None


def _lower_conv(g: _Graph, conv, producers: dict, consumers: dict):
    """The ``com.microsoft.QLinearConv`` (channels-last) that computes ``DequantizeLinear(x)
    -> Conv(DequantizeLinear(w), DequantizeLinear(int32 bias)) -> QuantizeLinear`` exactly,
    and the nodes it replaces; None where the pattern or its scales do not match."""
    import numpy as np
    from onnx import TensorProto, helper

    if conv.domain not in ("", "ai.onnx") or len(conv.input) < 2:
        return None
    dq_x, dq_w = producers.get(conv.input[0]), producers.get(conv.input[1])
    users = consumers.get(conv.output[0], [])
    if dq_x is None or dq_w is None or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
        return None
    if len(users) != 1 or users[0].op_type != "QuantizeLinear" or len(users[0].input) < 3:
        return None
    quant = users[0]
    if len(dq_x.input) < 3 or len(dq_w.input) < 3 or not g.scalar(dq_x.input[1]) or not g.scalar(quant.input[1]):
        return None
    x_zero, y_zero = g.inits.get(dq_x.input[2]), g.inits.get(quant.input[2])
    if x_zero is None or y_zero is None or {x_zero.data_type, y_zero.data_type} != {TensorProto.UINT8}:
        return None
    w_zero = _array(g.inits, dq_w.input[2])
    if w_zero is None or g.inits[dq_w.input[2]].data_type != TensorProto.INT8 or np.any(w_zero != 0):
        return None
    inputs = [dq_x.input[0], dq_x.input[1], dq_x.input[2], dq_w.input[0], dq_w.input[1], dq_w.input[2],
              quant.input[1], quant.input[2]]
    replaced = [conv, quant, dq_w]
    if len(conv.input) > 2 and conv.input[2]:
        dq_b = producers.get(conv.input[2])
        if dq_b is None or dq_b.op_type != "DequantizeLinear" or dq_b.input[0] not in g.inits:
            return None
        if g.inits[dq_b.input[0]].data_type != TensorProto.INT32:
            return None
        # QLinearConv adds the bias on the accumulator grid: its scale must be x_scale * w_scale
        expected = (_array(g.inits, dq_x.input[1]).astype(np.float32)
                    * _array(g.inits, dq_w.input[1]).astype(np.float32)).reshape(-1)
        if not np.array_equal(_array(g.inits, dq_b.input[1]).astype(np.float32).reshape(-1), expected):
            return None
        inputs.append(dq_b.input[0])
        replaced.append(dq_b)
    attrs = {k: _attr(conv, k) for k in _CONV_ATTRS if _attr(conv, k) is not None}
    node = helper.make_node("QLinearConv", inputs, [quant.output[0]], domain=MS_DOMAIN, channels_last=1, **attrs)
    return node, replaced


def _activation_edges(node) -> tuple[list[int], list[int]]:
    """Which inputs and outputs of a region node are activations (the rest are constants)."""
    if node.op_type == "Add":
        return [0, 1], [0]
    return [0], [0]


def _joinable(g: _Graph, node) -> bool:
    """Whether ``node`` can run channels-last: elementwise on activations, or with axes the
    pass can rename."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in ("DequantizeLinear", "QuantizeLinear"):
        return len(node.input) > 1 and g.scalar(node.input[1])
    if node.op_type == "Add":
        return all(i not in g.inits for i in node.input)  # no broadcast constant
    if node.op_type in ("Clip", "Relu"):
        return True
    if node.op_type == "Slice":
        return len(node.input) > 3 and node.input[3] in g.inits
    if node.op_type == "Pad":
        mode = _attr(node, "mode")
        return (mode in (None, b"constant", "constant") and len(node.input) > 1 and node.input[1] in g.inits
                and (len(node.input) < 4 or not node.input[3]) and _array(g.inits, node.input[1]).size == 8)
    return False


def _rename_axes(g: _Graph, node) -> None:
    """A region's ``Slice``/``Pad`` with its constant axes (or pads) renamed to NHWC."""
    import numpy as np

    if node.op_type == "Slice":
        axes = _array(g.inits, node.input[3]).astype(np.int64).reshape(-1)
        node.input[3] = g.constant("axes", np.array([_NHWC_AXIS[int(a) % 4] for a in axes], np.int64))
    elif node.op_type == "Pad":
        pads = _array(g.inits, node.input[1]).astype(np.int64).reshape(2, 4)
        order = [0, 2, 3, 1]  # the NCHW axis at each NHWC position
        node.input[1] = g.constant("pads", pads[:, order].reshape(-1))


def _integer_shortcuts(g: _Graph) -> None:
    """``DequantizeLinear -> (Slice | Pad)* -> QuantizeLinear`` back onto the same grid
    (the option-A shortcut of the int8 form) as the same slicing and padding of the 8-bit
    tensor: exact (a slice keeps the integers, a zero pad is the zero point), and no float
    pass."""
    import numpy as np

    producers, consumers = g.producers(), g.consumers()
    gone = set()
    for quant in [n for n in g.nodes if n.op_type == "QuantizeLinear" and len(n.input) == 3]:
        chain = []
        node = producers.get(quant.input[0])
        while (node is not None and node.op_type in ("Slice", "Pad") and len(consumers[node.output[0]]) == 1
               and _joinable(g, node)):
            chain.append(node)
            node = producers.get(node.input[0])
        if not chain or node is None or node.op_type != "DequantizeLinear" or len(node.input) != 3:
            continue
        dq = node
        same = [_array(g.inits, a) for a in (dq.input[1], quant.input[1], dq.input[2], quant.input[2])]
        if any(v is None for v in same):
            continue
        if (g.inits[dq.input[2]].data_type != g.inits[quant.input[2]].data_type
                or not np.array_equal(same[0].astype(np.float32), same[1].astype(np.float32))
                or not np.array_equal(same[2], same[3])):
            continue
        pads = [n for n in chain if n.op_type == "Pad"]
        if any(len(p.input) > 2 and p.input[2] and (_array(g.inits, p.input[2]) is None
                                                     or float(_array(g.inits, p.input[2])) != 0.0) for p in pads):
            continue
        for p in pads:  # the float pad value 0 is the zero point on the integer grid
            zero = g.constant("pad_zero", same[3].reshape(()).copy())
            p.input[:] = [p.input[0], p.input[1], zero]
        chain[-1].input[0] = dq.input[0]
        chain[0].output[0] = quant.output[0]
        gone.add(id(quant))
    g.nodes = [n for n in g.nodes if id(n) not in gone]


def channels_last_convs(proto) -> int:
    """Rewrite the int8 form's fusable convolutions as channels-last ``QLinearConv`` and
    the region around them channels-last (module docstring); returns how many
    convolutions. Nothing changes where no convolution matches."""
    from onnx import helper

    g = _Graph(proto)
    producers, consumers = g.producers(), g.consumers()
    lowered, dropped = {}, set()
    for conv in [n for n in g.nodes if n.op_type == "Conv"]:
        found = _lower_conv(g, conv, producers, consumers)
        if found is not None:
            node, replaced = found
            lowered[id(conv)] = node
            dropped.update(id(n) for n in replaced[1:])
    if not lowered:
        return 0
    g.nodes = [lowered.get(id(n), n) for n in g.nodes if id(n) not in dropped]
    _integer_shortcuts(g)
    used = {i for n in g.nodes for i in n.input}
    g.nodes = [n for n in g.nodes  # the DequantizeLinear nodes that the two rewrites left unread
               if not (n.op_type == "DequantizeLinear" and not any(o in used for o in n.output))]
    producers, consumers = g.producers(), g.consumers()

    # the channels-last region: from the convolutions through the nodes that can join it
    region = {id(n) for n in lowered.values()}
    nhwc: set[str] = set()
    for n in lowered.values():
        nhwc.update([n.input[0], n.output[0]])
    changed = True
    while changed:
        changed = False
        for n in g.nodes:
            if id(n) in region or not _joinable(g, n):
                continue
            ins, outs = _activation_edges(n)
            forward = any(n.input[i] in nhwc for i in ins)
            # backward only into nodes whose input is already 8-bit: never past a QuantizeLinear
            backward = any(n.output[o] in nhwc for o in outs) and n.op_type != "QuantizeLinear"
            if forward or backward:
                region.add(id(n))
                nhwc.update(n.input[i] for i in ins)
                nhwc.update(n.output[o] for o in outs)
                changed = True
    if any(v.name in nhwc for v in g.graph.output):  # not met in a classifier; left to onnxruntime
        return 0
    entries: dict[str, str] = {}
    exits: dict[str, str] = {}
    new_nodes = []
    for n in g.nodes:
        if id(n) in region:
            if n.op_type in ("Slice", "Pad"):
                _rename_axes(g, n)
            ins, _ = _activation_edges(n)
            for i in ins:
                t = n.input[i]
                if id(producers.get(t)) not in region:  # produced outside (or a graph input)
                    if t not in entries:
                        entries[t] = g.name(t)
                        new_nodes.append(helper.make_node("Transpose", [t], [entries[t]], perm=TO_NHWC))
                    n.input[i] = entries[t]
        else:
            for i, t in enumerate(n.input):
                if t in nhwc and id(producers.get(t)) in region:
                    if t not in exits:
                        exits[t] = g.name(t)
                        new_nodes.append(helper.make_node("Transpose", [t], [exits[t]], perm=TO_NCHW))
                    n.input[i] = exits[t]
        new_nodes.append(n)
    # a Transpose must come after its input's producer: order the nodes topologically
    g.nodes = _topological(new_nodes, {i.name for i in g.graph.input} | set(g.inits))
    g.write()
    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(lowered)


def _topological(nodes: list, available: set[str]) -> list:
    ready = set(available) | {""}
    pending, ordered = list(nodes), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError(f"channels_last_convs: the graph has a cycle or a missing input at {rest[0].op_type}")
        pending = rest
    return ordered
