"""The ``onnx`` wheel's light model-zoo models (ResNet-50, SqueezeNet, ...) with seeded weights.

``onnx/backend/test/data/light/light_<name>.onnx`` keeps each model's graph but makes almost
every weight with ``ConstantOfShape(0.02)``, which gives meaningless, exploding activations.
:func:`light_model` replaces every float parameter with a seeded random initializer chosen by
its role:

* Conv / Gemm weights: He normal (variance 2 / fan_in), so ReLU activations keep their scale;
* biases and BatchNorm / scale-layer shifts: small normal values (std 0.05 / 0.1);
* BatchNorm and scale-layer scales: 1 + 0.1 * normal;
* BatchNorm running mean and variance: *measured* on a seeded calibration image (data-dependent
  initialisation), so every BatchNorm output really has zero mean and unit variance; in
  networks without BatchNorm every biased Conv that no BatchNorm follows is rescaled the same
  way (per output channel, where it has at least 16 outputs per channel);
* the layer before the Softmax is scaled so the logits have standard deviation 2 over the
  classes: a softmax that is neither uniform (which int8 quantises to zeros) nor one-hot.

* ResNet-50 only: then the last BatchNorm of each residual branch has its scale and shift
  multiplied by 0.2 (:data:`RESIDUAL_GAMMA`, the usual "small last gamma" initialisation),
  without which the random network is chaotic (int8 quantization alone moves its logits).

The network stays in a sane numeric range end to end.

The graph is otherwise unchanged (Dropout, LRN, Sum stay), the initializers are taken out of
the graph inputs (the only input left is the image), and it is converted to opset 17 unless
``opset=None``. Input ``[1, 3, 224, 224]`` float32 (name as in the original file, see
:func:`light_input_name`); output the model's own (softmax probabilities, [1, 1000]).
"""

from __future__ import annotations

import copy
import zlib
from collections import defaultdict
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, version_converter

from ._onnx import IR_VERSION, OPSET, ModelError

#: The light models in the onnx wheel, by short name.
LIGHT_MODELS: tuple[str, ...] = (
    "bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
    "squeezenet", "vgg19", "zfnet512",
)


def light_model_path(name: str) -> Path:
    """Path of ``light_<name>.onnx`` inside the installed ``onnx`` package."""
    if name not in LIGHT_MODELS:
        raise ModelError(f"unknown light model {name!r}; choose one of {', '.join(LIGHT_MODELS)}")
    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"
    if not path.exists():
        raise ModelError(f"{path} is missing: this onnx wheel has no light models")
    return path


def _rng(seed: int, name: str) -> np.random.Generator:
    # One generator per tensor keyed by its name: the values do not depend on visiting order.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    users: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        for i, name in enumerate(node.input):
            users[name].append((node, i))
    return users


def _role(name: str, users: dict[str, list[tuple[onnx.NodeProto, int]]]) -> tuple[str, int]:
    """(role, fan_in) of a parameter tensor from its first consumer (through reshapes).

    A Gemm weight reached through a Reshape keeps its fan-in in dimension 1 ([out, in, 1, 1]).
    """
    if not users.get(name):
        return "unused", 0
    node, idx = users[name][0]
    if node.op_type in ("Unsqueeze", "Reshape", "Squeeze", "Flatten") and idx == 0:
        role, _ = _role(node.output[0], users)
        return {"mul_input": "scale", "add_input": "shift"}.get(role, role), 0
    op = node.op_type
    if op == "Conv":
        return ("weight", 0) if idx == 1 else ("bias", 0)
    if op == "Gemm":
        if idx == 1:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            return "gemm_weight_t" if trans_b else "gemm_weight", 0
        return "bias", 0
    if op == "BatchNormalization":
        return ("x", "scale", "shift", "mean", "var")[idx], 0
    if op == "Mul":
        return "mul_input", 0
    if op == "Add":
        return "add_input", 0
    raise ModelError(f"light model parameter {name!r} feeds {op} input {idx}: no init rule")


def _init_param(name: str, shape: tuple[int, ...], role: str, seed: int) -> np.ndarray:
    rng = _rng(seed, name)
    normal = rng.standard_normal(shape, dtype=np.float32)
    if role == "weight":
        value = normal * np.sqrt(2.0 / max(1, int(np.prod(shape[1:]))))
    elif role in ("gemm_weight_t", "gemm_weight"):
        dims = [d for d in shape if d != 1] or [1, 1]  # a Reshape may add 1s: [1, 1, out, in]
        fan_in = dims[-1] if role == "gemm_weight_t" else dims[0]
        value = normal * np.sqrt(2.0 / fan_in)
    elif role == "bias":
        value = 0.05 * normal
    elif role == "scale":
        value = 1.0 + 0.1 * normal
    elif role == "shift":
        value = 0.1 * normal
    elif role == "mean":
        value = np.zeros(shape, np.float32)
    elif role == "var":
        value = np.ones(shape, np.float32)
    else:
        raise ModelError(f"no init rule for role {role!r} of {name!r}")
    return np.asarray(value, dtype=np.float32)


def light_input_name(name: str) -> str:
    """Name of the image input of light model ``name``."""
    graph = _original(name).graph
    inits = {t.name for t in graph.initializer}
    return next(i.name for i in graph.input if i.name not in inits)


@cache
def _original(name: str) -> onnx.ModelProto:
    return onnx.load(str(light_model_path(name)))


def light_input(n: int = 1, seed: int = 0) -> np.ndarray:
    """Smooth seeded random images [n, 3, 224, 224], zero mean and unit variance per channel.

    Random noise at 28x28 upsampled 8x: image-like spatial correlation, which a random-weight
    network's BatchNorm statistics should be measured on (pure white noise is not what the
    first 7x7 convolution sees in practice).
    """
    from .data import upsample

    rng = np.random.default_rng([seed, 224])
    small = rng.standard_normal((n, 3, 28, 28)).astype(np.float32)
    img = upsample(small, 224)
    img -= img.mean(axis=(2, 3), keepdims=True)
    img /= img.std(axis=(2, 3), keepdims=True) + 1e-6
    return img.astype(np.float32)


def _seeded_graph(name: str, seed: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray],
                                                 dict[str, str]]:
    """The original graph without ConstantOfShape weights; params and roles by name."""
    model = copy.deepcopy(_original(name))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users = _consumers(graph)
    shapes: dict[str, tuple[int, ...]] = {}
    keep_nodes = []
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shapes[node.output[0]] = tuple(int(d) for d in
                                           numpy_helper.to_array(inits[node.input[0]]))
        else:
            keep_nodes.append(node)
    for t in graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            shapes[t.name] = tuple(t.dims)
    params: dict[str, np.ndarray] = {}
    roles: dict[str, str] = {}
    for pname, shape in shapes.items():
        role, _ = _role(pname, users)
        if role == "unused":
            continue
        roles[pname] = role
        params[pname] = _init_param(pname, shape, role, seed)
    # Non-float initializers that nodes still use (Reshape shapes) stay as they are.
    used = {i for n in keep_nodes for i in n.input}
    others = [t for t in graph.initializer
              if t.data_type != TensorProto.FLOAT and t.name in used and t.name not in shapes]
    del graph.node[:]
    graph.node.extend(keep_nodes)
    del graph.initializer[:]
    graph.initializer.extend(others)
    data_input = [i for i in graph.input if i.name not in inits and i.name not in shapes]
    del graph.input[:]
    graph.input.extend(data_input)
    model.ir_version = 7  # initializers no longer listed as inputs (needs IR >= 4)
    return model, params, roles


def _convert(model: onnx.ModelProto, params: dict[str, np.ndarray], opset: int
             ) -> onnx.ModelProto:
    """Convert the weightless graph to ``opset`` (the parameters as typed inputs meanwhile):
    converting 100 MB of initializers would take seconds and change nothing."""
    model = copy.deepcopy(model)
    n_data = len(model.graph.input)
    model.graph.input.extend(helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape))
                             for k, v in params.items())
    model = version_converter.convert_version(model, opset)
    _fold_static_shapes(model)
    del model.graph.input[n_data:]
    model.ir_version = IR_VERSION if opset == OPSET else max(model.ir_version, 7)
    return model


def _fold_static_shapes(model: onnx.ModelProto) -> None:
    """Turn converter-made constants into initializers.

    ``Constant`` nodes (Unsqueeze axes, Dropout ratios) become initializers, and ``Shape`` nodes
    of statically shaped tensors too: the converter rewrites an old 4-D Softmax as Shape ->
    Flatten -> Softmax -> Reshape, whose Shape is a constant here.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else 0
                       for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.input]}
    keep = []
    for node in model.graph.node:
        dims = shapes.get(node.input[0]) if node.op_type == "Shape" else None
        if dims and all(d > 0 for d in dims) and not node.attribute:
            model.graph.initializer.append(numpy_helper.from_array(np.array(dims, np.int64),
                                                                   node.output[0]))
        elif node.op_type == "Constant" and [a.name for a in node.attribute] == ["value"]:
            value = numpy_helper.to_array(node.attribute[0].t)
            model.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


_EPS = 1e-5  # of the temporary BatchNorms; folded with the same value


def _normalize_statistics(model: onnx.ModelProto, params: dict[str, np.ndarray],
                          image: np.ndarray) -> None:
    """Data-dependent init in one onnxruntime pass over ``image`` (``model`` at opset >= 15).

    Every BatchNormalization runs in training mode with momentum 0, so it normalises with the
    statistics of its actual input and outputs them; those become its running mean/var, which
    makes inference mode give the same activations. A Conv with a bias that no BatchNorm
    follows gets a temporary training-mode BatchNorm; its statistics are then folded into the
    Conv's weight and bias (per output channel: zero mean, unit variance), so networks without
    BatchNorm (SqueezeNet, VGG, Inception v1, ...) stay in range too.
    """
    import onnxruntime as ort

    calib = copy.deepcopy(model)
    graph = calib.graph
    users = _consumers(graph)
    typed = copy.deepcopy(model)  # parameters as typed inputs: shapes without the data
    typed.graph.input.extend(helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape))
                             for k, v in params.items())
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in onnx.shape_inference.infer_shapes(typed).graph.value_info}
    del typed
    nodes: list[onnx.NodeProto] = []
    fold: dict[str, tuple[onnx.NodeProto, str, str]] = {}  # conv name -> (conv, mean, var)
    softmax = [n for n in graph.node if n.op_type == "Softmax"]
    # The classifier keeps its own per-class differences: normalising each class channel
    # would make every logit the same number (the mean of relu(N(0, 1))).
    classifier = _classifier(graph, softmax[0].input[0]) if softmax else None
    set_stats: list[tuple[str, str, str, str]] = []  # (mean out, var out, mean p, var p)
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            out_m, out_v = node.output[0] + "__mean", node.output[0] + "__var"
            _train_mode(node, [node.output[0], out_m, out_v])
            set_stats.append((out_m, out_v, node.input[3], node.input[4]))
            nodes.append(node)
        elif (node.op_type == "Conv" and len(node.input) == 3
              and not any(u.op_type == "BatchNormalization" for u, _ in users[node.output[0]])
              and _samples_per_channel(shapes.get(node.output[0])) >= 16
              and node is not classifier):
            out, raw = node.output[0], node.output[0] + "__raw"
            c = params[node.input[1]].shape[0]
            names = [f"{out}__{k}" for k in ("s", "b", "m", "v")]
            for k, v in zip(names, (np.ones(c), np.zeros(c), np.zeros(c), np.ones(c))):
                graph.initializer.append(numpy_helper.from_array(v.astype(np.float32), k))
            node.output[0] = raw
            bn = helper.make_node("BatchNormalization", [raw, *names], [out], epsilon=_EPS)
            _train_mode(bn, [out, out + "__mean", out + "__var"])
            fold[out] = (node, out + "__mean", out + "__var")
            nodes.extend([node, bn])
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in params.items())
    wanted = [n for t in set_stats for n in t[:2]] + [n for f in fold.values() for n in f[1:]]
    if softmax:
        wanted.append(softmax[0].input[0])
    del graph.output[:]
    graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                        for n in wanted)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(calib.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    outs = dict(zip(wanted, sess.run(None, {model.graph.input[0].name: image})))
    for out_m, out_v, mean, var in set_stats:
        params[mean], params[var] = outs[out_m], outs[out_v]
    for conv, out_m, out_v in fold.values():
        inv = 1.0 / np.sqrt(outs[out_v].astype(np.float64) + _EPS)
        w, b = conv.input[1], conv.input[2]
        params[w] = (params[w] * inv.reshape(-1, *[1] * (params[w].ndim - 1))).astype(np.float32)
        params[b] = ((params[b] - outs[out_m]) * inv).astype(np.float32)
    if softmax:
        _scale_logits(model, params, softmax[0].input[0], outs[softmax[0].input[0]])


#: Standard deviation of the logits (Softmax input) over the classes after initialisation.
LOGIT_STD = 2.0
_PASS_THROUGH = {"Relu", "GlobalAveragePool", "AveragePool", "Reshape", "Flatten", "Dropout",
                 "Identity", "Squeeze"}


def _classifier(graph: onnx.GraphProto, logits_name: str) -> onnx.NodeProto | None:
    """The Conv/Gemm that makes the logits (through Relu, pooling, reshapes), if any."""
    producer = {o: n for n in graph.node for o in n.output}
    node = producer.get(logits_name)
    while node is not None and node.op_type in _PASS_THROUGH:
        node = producer.get(node.input[0])
    return node if node is not None and node.op_type in ("Conv", "Gemm") else None


def _scale_logits(model: onnx.ModelProto, params: dict[str, np.ndarray], logits_name: str,
                  logits: np.ndarray) -> None:
    """Rescale the last Conv/Gemm so the logits have std :data:`LOGIT_STD` over the classes.

    After the per-channel normalisation a network such as SqueezeNet (conv, relu, global
    pool, softmax) ends with nearly equal logits, a uniform softmax that int8 quantises to
    zeros; everything between that layer and the Softmax is positively homogeneous, so scaling
    its weight and bias scales the logits.
    """
    node = _classifier(model.graph, logits_name)
    std = float(np.std(logits))
    if node is None or std == 0.0:
        return
    scale = LOGIT_STD / std
    producer = {o: n for n in model.graph.node for o in n.output}
    for name in node.input[1:3]:
        while name not in params and name in producer and producer[name].op_type in (
                "Reshape", "Unsqueeze", "Squeeze", "Flatten"):
            name = producer[name].input[0]  # a weight reshaped in the graph (Inception v1)
        if name in params:
            params[name] = (params[name] * scale).astype(np.float32)


def _samples_per_channel(shape: list[int] | None) -> int:
    """N * H * W of an NCHW shape (0 when unknown)."""
    if not shape or len(shape) < 3 or 0 in shape:
        return 0
    return int(shape[0] * np.prod(shape[2:]))


def _train_mode(node: onnx.NodeProto, outputs: list[str]) -> None:
    """Make a BatchNormalization compute and output its batch statistics (momentum 0)."""
    keep = [a for a in node.attribute if a.name == "epsilon"]
    del node.attribute[:]
    node.attribute.extend(keep + [helper.make_attribute("training_mode", 1),
                                  helper.make_attribute("momentum", 0.0)])
    del node.output[:]
    node.output.extend(outputs)


#: Scale of the last BatchNorm (gamma and beta) of every residual branch, by model: the usual
#: "small last gamma" initialisation, applied after the statistics are measured (every later
#: layer then sees smaller inputs than its statistics; the logits are scaled again).
#: With gamma ~ 1 a random ResNet-50 is chaotic: its own int8 model (onnxruntime) is only
#: ~0.985 cosine-similar to the float one, and damping before measuring leaves it ~0.999.
RESIDUAL_GAMMA: dict[str, float] = {"resnet50": 0.2}
_CHAIN = ("Conv", "BatchNormalization", "Relu")


def _residual_branch_ends(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The BatchNormalization ending the residual branch of each two-input Sum/Add.

    Both inputs of a residual add lead back (first inputs of Conv/BatchNorm/Relu) to the block
    input; the branch with more convolutions on the way is the residual one (the other is the
    identity or a 1x1 projection)."""
    producer = {o: n for n in graph.node for o in n.output}

    def path(t: str) -> list[tuple[str, onnx.NodeProto | None]]:
        out = []
        while True:
            node = producer.get(t)
            out.append((t, node))
            if node is None or node.op_type not in _CHAIN:
                return out
            t = node.input[0]

    ends = []
    for add in graph.node:
        ins = [i for i in add.input if i]
        if add.op_type not in ("Sum", "Add") or len(ins) != 2:
            continue
        paths = [path(i) for i in ins]
        common = {t for t, _ in paths[1]} & {t for t, _ in paths[0]}
        convs = []
        for p in paths:
            n = 0
            for t, node in p:
                if t in common:
                    break
                n += node is not None and node.op_type == "Conv"
            convs.append(n)
        if not common or convs[0] == convs[1]:
            continue
        end = producer.get(ins[int(convs[1] > convs[0])])
        if end is not None and end.op_type == "BatchNormalization":
            ends.append(end)
    return ends


def _damp_residual_branches(graph: onnx.GraphProto, params: dict[str, np.ndarray],
                            gamma: float) -> None:
    """Scale each residual branch's last BatchNorm scale and shift by ``gamma``."""
    for bn in _residual_branch_ends(graph):
        for name in bn.input[1:3]:
            params[name] = (params[name] * np.float32(gamma)).astype(np.float32)


def _rescale_logits(model: onnx.ModelProto, params: dict[str, np.ndarray],
                    image: np.ndarray) -> None:
    """:func:`_scale_logits` again, measured on ``image`` with the current ``params``."""
    import onnxruntime as ort

    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    if not softmax:
        return
    logits = softmax[0].input[0]
    probe = copy.deepcopy(model)
    probe.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in params.items())
    del probe.graph.output[:]
    probe.graph.output.append(helper.make_tensor_value_info(logits, TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    _scale_logits(model, params, logits, sess.run(None, {model.graph.input[0].name: image})[0])


@lru_cache(maxsize=4)
def _light_model_bytes(name: str, seed: int, opset: int | None) -> bytes:
    original, params, _ = _seeded_graph(name, seed)
    model = _convert(original, params, OPSET)
    _normalize_statistics(model, params, light_input(1, seed))
    if name in RESIDUAL_GAMMA:   # after the statistics: see RESIDUAL_GAMMA
        _damp_residual_branches(model.graph, params, RESIDUAL_GAMMA[name])
        _rescale_logits(model, params, light_input(1, seed))
    if opset is None:
        model = original
    elif opset != OPSET:
        model = _convert(original, params, opset)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in params.items())
    model.doc_string = (f"onnx light model {name} with seeded weights (seed {seed}); "
                        "statistics normalised on npu.models.light.light_input")
    onnx.checker.check_model(model)
    return model.SerializeToString()


def light_model(name: str, seed: int = 0, opset: int | None = OPSET) -> onnx.ModelProto:
    """Light model ``name`` (see :data:`LIGHT_MODELS`) with seeded random weights.

    ``opset=None`` keeps the file's opset 9; the default converts to opset 17. Results are
    cached per (name, seed, opset): ResNet-50 takes a few seconds the first time (BatchNorm
    calibration), a copy after that.
    """
    if name not in LIGHT_MODELS:
        raise ModelError(f"unknown light model {name!r}; choose one of {', '.join(LIGHT_MODELS)}")
    return onnx.load_from_string(_light_model_bytes(name, seed, opset))
