"""Frontend: load an ONNX model and make it static and simple before quantization.

Steps (each a small function, all run by :func:`prepare_model`):

1. :func:`load_model` from a path, bytes or ``ModelProto``; ``onnx.checker``;
   :func:`check_opsets` (default domain 9 .. :data:`MAX_OPSET`);
2. :func:`bind_static_shapes`: every graph input gets a static shape (a dynamic batch is bound
   by ``batch=``, anything else dynamic is a :class:`CompileError` naming the input);
3. :func:`remove_identities`: Identity and inference-mode Dropout disappear;
   :func:`densify_sparse`: ``Constant`` nodes with a ``sparse_value`` and the graph's
   ``sparse_initializer`` become dense initializers (large GNN adjacencies are stored sparse);
4. :func:`fold_constants`: initializer-only subgraphs (``ConstantOfShape`` weights, ``Shape`` of
   a static tensor, ...) are evaluated with ``onnx.reference.ReferenceEvaluator`` and become
   initializers; Quantize/DequantizeLinear are never folded (the compiler reads them);
5. :func:`fold_batchnorm`: a BatchNormalization after a Conv is folded into its weights;
   :func:`batchnorm_to_depthwise`: any other one (and the per-channel Mul/Add after it)
   becomes a 1x1 depthwise Conv;
6. :func:`infer_shapes`: ONNX shape inference (strict), then every node output must have a
   static shape;
7. :func:`normalize_gemm_bias`: row-broadcast Gemm biases become plain vectors.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable
from os import PathLike
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from npu.compiler.errors import CompileError

__all__ = ["MIN_OPSET", "MAX_OPSET", "ModelSource", "load_model", "check_opsets",
           "bind_static_shapes", "remove_identities", "fold_constants", "fold_batchnorm",
           "infer_shapes", "normalize_gemm_bias", "prepare_model", "constants", "value_shapes",
           "node_label", "graph_inputs", "densify_sparse", "sparse_to_dense",
           "batchnorm_to_depthwise"]

#: Oldest default-domain opset accepted (the model-zoo light models are opset 9).
MIN_OPSET = 9
#: Newest default-domain opset accepted: what onnxruntime 1.31 (the pinned reference) loads.
MAX_OPSET = 26

ModelSource = str | PathLike | bytes | onnx.ModelProto

#: Ops never folded even when all their inputs are constant: the quantizer's own nodes
#: (weights are read from DequantizeLinear) and ops whose value is not a function of inputs.
_NO_FOLD = {"QuantizeLinear", "DequantizeLinear", "RandomNormal", "RandomUniform",
            "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def node_label(node: onnx.NodeProto, index: int | None = None) -> str:
    """A node's name, or ``<op>#<index>`` / its first output when it has none."""
    if node.name:
        return node.name
    if index is not None:
        return f"{node.op_type}#{index}"
    return node.output[0] if node.output else node.op_type


def load_model(source: ModelSource) -> onnx.ModelProto:
    """Load a model from a path, serialized bytes or a ``ModelProto`` (copied) and check it."""
    if isinstance(source, onnx.ModelProto):
        model = copy.deepcopy(source)
    elif isinstance(source, (bytes, bytearray)):
        try:
            model = onnx.load_from_string(bytes(source))
        except Exception as exc:  # protobuf DecodeError and friends
            raise CompileError(f"cannot parse the model bytes: {exc}") from None
    elif isinstance(source, (str, PathLike)):
        path = Path(source)
        if not path.is_file():
            raise CompileError(f"model file {str(path)!r} does not exist")
        try:
            model = onnx.load(str(path))
        except Exception as exc:
            raise CompileError(f"cannot read ONNX model {str(path)!r}: {exc}") from None
    else:
        raise CompileError(f"a model must be a path, bytes or onnx.ModelProto, "
                           f"got {type(source).__name__}")
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise CompileError(f"onnx.checker rejects the model: {exc}") from None
    check_opsets(model)
    return model


def check_opsets(model: onnx.ModelProto) -> int:
    """The default-domain opset, which must lie in [MIN_OPSET, MAX_OPSET]."""
    version = None
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            version = imp.version
    if version is None:
        raise CompileError("the model imports no default-domain (ai.onnx) opset")
    if not MIN_OPSET <= version <= MAX_OPSET:
        raise CompileError(f"opset {version} is not supported (supported: {MIN_OPSET} to "
                           f"{MAX_OPSET})")
    return version


def constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers of ``graph`` as numpy arrays, by name."""
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are real inputs (not initializers listed as inputs, old IR style)."""
    inits = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in inits]


def bind_static_shapes(model: onnx.ModelProto, batch: int | None = None) -> onnx.ModelProto:
    """Give every graph input a static shape, in place.

    A dynamic first dimension is set to ``batch`` when given; any other dynamic or missing
    dimension is a :class:`CompileError` naming the input and the dimension.
    """
    if batch is not None and (not isinstance(batch, int) or batch < 1):
        raise CompileError(f"batch must be a positive integer, got {batch!r}")
    inits = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        if not inp.type.HasField("tensor_type"):
            raise CompileError(f"graph input {inp.name!r} is not a tensor")
        tt = inp.type.tensor_type
        if not tt.HasField("shape"):
            raise CompileError(f"graph input {inp.name!r} has no shape; give the model a "
                               f"static input shape")
        for i, dim in enumerate(tt.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            if dim.HasField("dim_value") and dim.dim_value == 0:
                raise CompileError(f"graph input {inp.name!r} is empty (dimension {i} is 0)")
            label = dim.dim_param or "?"
            if i == 0 and batch is not None:
                dim.Clear()
                dim.dim_value = batch
                continue
            hint = " (bind the batch with batch=N / --batch N)" if i == 0 else ""
            raise CompileError(f"graph input {inp.name!r} has a dynamic dimension {i} "
                               f"({label!r}); shapes must be static{hint}")
    return model


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for out in graph.output:
        if out.name == old:
            out.name = new


def remove_identities(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop Identity nodes and Dropout nodes whose mask output is unused (inference), in place."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    used = Counter(i for n in graph.node for i in n.input)
    producers = {o: n for n in graph.node for o in n.output}
    keep = []
    for node in graph.node:
        removable = node.op_type == "Identity" or (
            node.op_type == "Dropout" and (len(node.output) < 2 or not node.output[1]
                                           or used[node.output[1]] == 0))
        if not removable:
            keep.append(node)
            continue
        x, y = node.input[0], node.output[0]
        if y in outputs:
            # Keep the graph output's name: rename the producer's output instead, if it can.
            prod = producers.get(x)
            if prod is None or x in outputs or used[x] > 1:
                keep.append(helper.make_node("Identity", [x], [y], name=node.name))
                continue
            for i, o in enumerate(prod.output):
                if o == x:
                    prod.output[i] = y
            _rename_uses(graph, x, y)
        else:
            _rename_uses(graph, y, x)
    del graph.node[:]
    graph.node.extend(keep)
    return model


def sparse_to_dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """The dense array of a COO ``SparseTensorProto``.

    ``indices`` are either ``[NNZ]`` linear indices into the row-major dense tensor or
    ``[NNZ, rank]`` coordinates (the two forms the ONNX spec allows); duplicates are an error.
    """
    shape = tuple(int(d) for d in sparse.dims)
    values = numpy_helper.to_array(sparse.values).reshape(-1)
    dense = np.zeros(shape, dtype=values.dtype)
    if not sparse.HasField("indices") or values.size == 0:
        if values.size:
            raise CompileError(f"sparse tensor {sparse.values.name!r} has values but no indices")
        return dense
    idx = numpy_helper.to_array(sparse.indices).astype(np.int64)
    size = int(np.prod(shape, dtype=np.int64))
    if idx.ndim == 1:
        flat = idx
    elif idx.ndim == 2 and idx.shape[1] == len(shape):
        bad = (idx < 0) | (idx >= np.array(shape, dtype=np.int64))
        if bad.any():
            raise CompileError(f"sparse tensor {sparse.values.name!r}: index out of range "
                               f"for shape {shape}")
        flat = np.ravel_multi_index(tuple(idx.T), shape) if idx.size else idx.reshape(-1)
    else:
        raise CompileError(f"sparse tensor {sparse.values.name!r}: indices of shape "
                           f"{idx.shape} (expected [{values.size}] or [{values.size}, "
                           f"{len(shape)}])")
    if len(flat) != values.size:
        raise CompileError(f"sparse tensor {sparse.values.name!r}: {len(flat)} indices for "
                           f"{values.size} values")
    if flat.size and (flat.min() < 0 or flat.max() >= size):
        raise CompileError(f"sparse tensor {sparse.values.name!r}: index out of range for "
                           f"shape {shape}")
    if np.unique(flat).size != flat.size:
        raise CompileError(f"sparse tensor {sparse.values.name!r} repeats an index")
    dense.reshape(-1)[flat] = values
    return dense


def densify_sparse(model: onnx.ModelProto) -> onnx.ModelProto:
    """Sparse constants become dense initializers, in place.

    ``Constant`` nodes with a ``sparse_value`` attribute (onnx.reference cannot fold them) and
    the graph's ``sparse_initializer`` entries: the NPU holds weights dense (all-zero weight
    tiles are skipped at tiling, see :mod:`npu.compiler.passes.families`).
    """
    g = model.graph
    keep = []
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            sv = [a for a in node.attribute if a.name == "sparse_value"]
            if sv:
                g.initializer.append(numpy_helper.from_array(
                    sparse_to_dense(sv[0].sparse_tensor), node.output[0]))
                continue
        keep.append(node)
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)
    if len(g.sparse_initializer):
        for sparse in g.sparse_initializer:
            g.initializer.append(numpy_helper.from_array(sparse_to_dense(sparse),
                                                         sparse.values.name))
        del g.sparse_initializer[:]
    return model


def _static_shape(vi: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    dims = vi.type.tensor_type.shape.dim
    if not all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
        return None
    return tuple(d.dim_value for d in dims)


def value_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Static shapes known for every value (inputs, value_info, outputs, initializers)."""
    g = model.graph
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        s = _static_shape(vi)
        if s is not None:
            shapes[vi.name] = s
    for t in g.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Evaluate initializer-only subgraphs (and ``Shape`` of static tensors), in place.

    The folded nodes' outputs become initializers; nodes nothing uses any more are dropped.
    """
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    for _ in range(8):  # Shape folding can expose more constants; a few rounds suffice
        inits = constants(graph)
        known = set(inits)
        shapes = value_shapes(model)
        fold: list[onnx.NodeProto] = []
        drop: set[int] = set()  # node indices (protobuf wrappers have no stable identity)
        shape_consts: dict[str, np.ndarray] = {}
        for idx, node in enumerate(graph.node):
            if node.op_type in _NO_FOLD or node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Shape" and node.input[0] in shapes:
                shape = np.array(shapes[node.input[0]], dtype=np.int64)
                start = _attr(node, "start", 0)
                end = _attr(node, "end", None)
                shape_consts[node.output[0]] = shape[start:end]
                known.add(node.output[0])
                drop.add(idx)
                continue
            if any(_has_subgraph(a) for a in node.attribute):
                continue
            if all(i in known for i in node.input if i):  # Constant: no inputs, always
                fold.append(node)
                drop.add(idx)
                known.update(o for o in node.output if o)
        if not drop:
            break
        values = dict(shape_consts)
        if fold:
            folded_outs = [o for n in fold for o in n.output if o]
            needed = {i for n in fold for i in n.input if i and i in inits}
            sub = helper.make_graph(
                fold, "fold", [],
                [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
                 for o in folded_outs],
                initializer=[t for t in graph.initializer if t.name in needed])
            sub_model = helper.make_model(sub, opset_imports=list(model.opset_import),
                                          ir_version=model.ir_version)
            # shape_consts may feed folded nodes: provide them as initializers too.
            sub.initializer.extend(numpy_helper.from_array(v, k) for k, v in
                                   shape_consts.items() if any(k in n.input for n in fold))
            try:
                results = ReferenceEvaluator(sub_model).run(None, {})
            except Exception as exc:
                culprit = fold[0]
                raise CompileError(f"constant folding failed: {exc}", node_label(culprit),
                                   culprit.op_type) from None
            values.update(zip(folded_outs, results))
        keep = [n for i, n in enumerate(graph.node) if i not in drop]
        del graph.node[:]
        graph.node.extend(keep)
        for name, value in values.items():
            graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        _drop_unused_initializers(model)
    return model


def _has_subgraph(attr: onnx.AttributeProto) -> bool:
    return attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    graph = model.graph
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    before = {t.name for t in graph.initializer}
    keep = [t for t in graph.initializer if t.name in used]
    kept = {t.name for t in keep}
    del graph.initializer[:]
    graph.initializer.extend(keep)
    # Old-IR models list initializers among the inputs: drop the entries of removed ones.
    inputs = [i for i in graph.input if i.name not in before or i.name in kept]
    del graph.input[:]
    graph.input.extend(inputs)


def fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold inference BatchNormalization into the Conv that feeds it, in place.

    Applies when the Conv's weights (and bias) are initializers and its output is used only by
    the BatchNormalization; other BatchNormalizations are left (they run on the host).
    """
    graph = model.graph
    inits = constants(graph)
    producers = {o: n for n in graph.node for o in n.output}
    uses = Counter(i for n in graph.node for i in n.input)
    outputs = {o.name for o in graph.output}
    drop: set[int] = set()
    new_inits: dict[str, np.ndarray] = {}
    for idx, node in enumerate(graph.node):
        if node.op_type != "BatchNormalization" or len([o for o in node.output if o]) != 1:
            continue
        x = node.input[0]
        conv = producers.get(x)
        if conv is None or conv.op_type != "Conv" or uses[x] != 1 or x in outputs:
            continue
        if conv.input[1] not in inits or (len(conv.input) > 2 and conv.input[2]
                                          and conv.input[2] not in inits):
            continue
        if not all(i in inits for i in node.input[1:5]):
            continue
        scale, bias, mean, var = (inits[i].astype(np.float64) for i in node.input[1:5])
        eps = float(_attr(node, "epsilon", 1e-5))
        w = inits[conv.input[1]].astype(np.float64)
        b = inits[conv.input[2]].astype(np.float64) if len(conv.input) > 2 and conv.input[2] \
            else np.zeros(w.shape[0])
        factor = scale / np.sqrt(var + eps)
        w_name = f"{conv.input[1]}__bnfold_{node_label(node)}"
        b_name = f"{w_name}__bias"
        new_inits[w_name] = (w * factor.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        new_inits[b_name] = ((b - mean) * factor + bias).astype(np.float32)
        conv_inputs = [conv.input[0], w_name, b_name]
        del conv.input[:]
        conv.input.extend(conv_inputs)
        conv.output[0] = node.output[0]
        drop.add(idx)
    if drop:
        keep = [n for i, n in enumerate(graph.node) if i not in drop]
        del graph.node[:]
        graph.node.extend(keep)
        graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in new_inits.items())
        _drop_unused_initializers(model)
    return model


def _per_channel(value: np.ndarray, c: int, rank: int) -> np.ndarray | None:
    """``value`` as C per-channel factors of an N C ... tensor of ``rank``, or None when it
    broadcasts differently."""
    a = np.asarray(value, dtype=np.float64)
    if a.size == 1:
        return np.full(c, float(a.reshape(())))
    shape = a.shape
    while len(shape) > rank - 1 and shape[0] == 1:
        shape = shape[1:]
    if shape == (c,) + (1,) * (rank - 2):
        return a.reshape(c)
    return None


def batchnorm_to_depthwise(model: onnx.ModelProto) -> onnx.ModelProto:
    """An inference BatchNormalization that :func:`fold_batchnorm` could not fold (DenseNet's
    pre-activation BN after a Concat), with the per-channel Mul/Add constants that follow it,
    becomes one 1x1 depthwise Conv, in place.

    onnxruntime then quantizes it like any depthwise convolution and the NPU runs it (instead
    of a float BatchNormalization, Mul and Add on the host with Q/DQ borders around each).
    """
    graph = model.graph
    inits = constants(graph)
    shapes = value_shapes(model)
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    drop: set[str] = set()         # first outputs of absorbed Mul/Add nodes
    replace: dict[str, onnx.NodeProto] = {}
    new_inits: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type != "BatchNormalization" or len([o for o in node.output if o]) != 1 \
                or node.output[0] in drop:
            continue
        shape = shapes.get(node.input[0])
        if shape is None or len(shape) not in (3, 4) or \
                not all(i in inits for i in node.input[1:5]):
            continue
        c = shape[1]
        scale, bias, mean, var = (inits[i].astype(np.float64).reshape(-1)
                                  for i in node.input[1:5])
        mul = scale / np.sqrt(var + float(_attr(node, "epsilon", 1e-5)))
        add = bias - mean * mul
        out = node.output[0]
        while out not in outputs and len(users.get(out, [])) == 1:
            nxt = users[out][0]
            if nxt.op_type not in ("Mul", "Add") or len(nxt.input) != 2:
                break
            other = nxt.input[1] if nxt.input[0] == out else nxt.input[0]
            k = _per_channel(inits[other], c, len(shape)) if other in inits else None
            if k is None or other == out:
                break
            if nxt.op_type == "Mul":
                mul, add = mul * k, add * k
            else:
                add = add + k
            drop.add(nxt.output[0])
            out = nxt.output[0]
        w_name, b_name = f"{node.input[1]}__depthwise", f"{node.input[1]}__depthwise_bias"
        new_inits[w_name] = mul.reshape(c, 1, *([1] * (len(shape) - 2))).astype(np.float32)
        new_inits[b_name] = add.astype(np.float32)
        replace[node.output[0]] = helper.make_node(
            "Conv", [node.input[0], w_name, b_name], [out], name=node.name or out,
            group=c, kernel_shape=[1] * (len(shape) - 2))
    if replace:
        keep = [replace.get(n.output[0], n) for n in graph.node
                if not (n.output and n.output[0] in drop)]
        del graph.node[:]
        graph.node.extend(keep)
        graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in new_inits.items())
        _drop_unused_initializers(model)
    return model


def normalize_gemm_bias(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every Gemm with a constant bias that broadcasts along the rows (shape [], [1],
    [N] or [1, N]) a plain [N] bias, in place: the same values, the shape onnxruntime's
    quantizer handles (it fails on [1, N] and scalar biases with per-channel weights)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    shapes = value_shapes(model)
    extra: list[tuple[int, onnx.NodeProto]] = []
    for idx, node in enumerate(graph.node):
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in inits:
            continue
        out = shapes.get(node.output[0])
        if out is None or len(out) != 2:
            continue
        c = numpy_helper.to_array(inits[node.input[2]])
        n = out[1]
        if c.ndim == 2 and c.shape[0] > 1:
            # A per-row bias matrix: Gemm without bias, then Add (what it means).
            beta = float(_attr(node, "beta", 1.0))
            name = f"{node.input[2]}__scaled_{node_label(node, idx)}"
            graph.initializer.append(numpy_helper.from_array(
                (c * np.array(beta, c.dtype)).astype(c.dtype), name))
            mid = f"{node.output[0]}__no_bias"
            add = helper.make_node("Add", [mid, name], [node.output[0]],
                                   name=f"{node_label(node, idx)}__bias")
            node.output[0] = mid
            del node.input[2:]
            extra.append((idx, add))
            continue
        if c.shape == (n,) or c.size not in (1, n):
            continue
        beta = float(_attr(node, "beta", 1.0))
        name = f"{node.input[2]}__vector_{node_label(node, idx)}"
        vec = np.broadcast_to(c.reshape(-1), (n,)).astype(c.dtype) * np.array(beta, c.dtype)
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(vec), name))
        node.input[2] = name
        for a in node.attribute:
            if a.name == "beta":
                a.f = 1.0
    for k, (idx, add) in enumerate(extra):
        graph.node.insert(idx + 1 + k, add)
    _drop_unused_initializers(model)
    return model


def infer_shapes(model: onnx.ModelProto, require_static: bool = True) -> onnx.ModelProto:
    """ONNX shape inference (strict); with ``require_static`` every node output must be static.

    Errors name the first node whose output shape is unknown or dynamic.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True,
                                                     data_prop=True)
    except Exception as exc:  # InferenceError, ValidationError
        raise CompileError(f"shape inference failed: {exc}") from None
    if require_static:
        shapes = value_shapes(inferred)
        for idx, node in enumerate(inferred.graph.node):
            for out in node.output:
                if out and out not in shapes:
                    raise CompileError(f"output {out!r} has no static shape after shape "
                                       f"inference; the compiler needs static shapes",
                                       node_label(node, idx), node.op_type)
    return inferred


def prepare_model(source: ModelSource, batch: int | None = None) -> onnx.ModelProto:
    """Load and simplify a model: checked, static shapes, no Identity/Dropout, constants and
    BatchNorm folded, shapes inferred. The input is not modified."""
    model = load_model(source)
    if model.ir_version < 4:
        # IR 3 lists every initializer as a graph input (an overridable input for
        # onnxruntime); from IR 4 on they are constants, which is what the weights are.
        inits = {t.name for t in model.graph.initializer}
        real = [i for i in model.graph.input if i.name not in inits]
        del model.graph.input[:]
        model.graph.input.extend(real)
        model.ir_version = 4
    bind_static_shapes(model, batch)
    remove_identities(model)
    densify_sparse(model)
    model = infer_shapes(model, require_static=False)
    fold_constants(model)
    fold_batchnorm(model)
    batchnorm_to_depthwise(model)
    model = infer_shapes(model)
    normalize_gemm_bias(model)
    return model


def op_histogram(nodes: Iterable[onnx.NodeProto]) -> dict[str, int]:
    """How many nodes of each op type (for reports)."""
    return dict(Counter(n.op_type for n in nodes))
