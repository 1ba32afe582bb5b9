"""Quantization: a float model plus calibration data -> a QDQ model, by onnxruntime's own tool.

:func:`quantize_model` runs ``onnxruntime.quantization.quantize_static`` in QDQ format with
per-channel symmetric int8 weights and asymmetric int8 activations (MinMax calibration), after
ORT's recommended pre-processing (``quant_pre_process``: shape inference and its basic graph
optimizations). A model that already holds QuantizeLinear/DequantizeLinear nodes is taken as
it is (:func:`is_qdq`). The compiler then reads scales and zero points from the Q/DQ nodes
(``npu.compiler.passes.legalize``).

Calibration data (:func:`calibration_feeds`) may be

* a mapping ``input name -> array`` whose first axis runs over samples (split into batches of
  the model's batch size),
* a sequence of such mappings (one feed dict per calibration batch),
* a path to an ``.npz`` file holding the mapping,
* an ``int`` ``n``: ``n`` seeded standard-normal batches (for smoke tests only: real data gives
  real ranges).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from npu.compiler.errors import CompileError
from npu.compiler.frontend import graph_inputs

__all__ = ["Calibration", "is_qdq", "calibration_feeds", "quantize_model"]

Calibration = Mapping[str, Any] | Sequence[Mapping[str, Any]] | str | PathLike | int

_ONNX_TO_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
               onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.INT64: np.int64,
               onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8,
               onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_}


#: How :func:`onnxruntime_session` runs a QDQ model.
ORT_KERNELS = ("int8", "float")


def onnxruntime_session(model: onnx.ModelProto, kernels: str = "int8",
                        extra_int8_outputs: Sequence[str] = ()) -> Any:
    """onnxruntime (CPU) on ``model``: the oracle the NPU is compared with.

    ``kernels="int8"`` (a QDQ model's reference): default graph optimizations with
    ``session.qdqisint8allowed=1``, so every DQ-op-Q group runs as onnxruntime's integer
    kernel (QLinearConv, QGemm, QLinearAdd, QLinearConcat, QLinearGlobalAveragePool, ...), as
    it does by default on ARM and VNNI machines. The NPU reproduces these bit for bit. Without
    the option, x86 AVX2 leaves S8S8 convolutions in float, summed in an order no integer
    machine reproduces. ``kernels="float"``: optimizations off, so Q/DQ run as written (also
    the right choice for float models). ``extra_int8_outputs`` names int8 tensors to expose as
    extra outputs (e.g. QuantizeLinear outputs, for layer-by-layer checks)."""
    import onnxruntime as ort

    if kernels not in ORT_KERNELS:
        raise ValueError(f"kernels must be one of {ORT_KERNELS}, not {kernels!r}")
    if extra_int8_outputs:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        have = {o.name for o in m.graph.output}
        m.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.INT8, None)
                              for n in extra_int8_outputs if n not in have)
        model = m
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if kernels == "int8":
        so.add_session_config_entry("session.qdqisint8allowed", "1")
    else:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def is_qdq(model: onnx.ModelProto) -> bool:
    """True when the model already holds QuantizeLinear or DequantizeLinear nodes."""
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def _input_specs(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], type]]:
    specs = {}
    for inp in graph_inputs(model.graph):
        tt = inp.type.tensor_type
        shape = tuple(d.dim_value for d in tt.shape.dim)
        specs[inp.name] = (shape, _ONNX_TO_NP.get(tt.elem_type, np.float32))
    return specs


def calibration_feeds(model: onnx.ModelProto, data: Calibration) -> list[dict[str, np.ndarray]]:
    """Normalize calibration data into a list of feed dicts matching the model's inputs."""
    specs = _input_specs(model)
    if isinstance(data, bool):
        raise CompileError("calibration must be data, a .npz path or a sample count, not a bool")
    if isinstance(data, int):
        if data < 1:
            raise CompileError(f"calibration sample count must be positive, got {data}")
        rng = np.random.default_rng(0)
        return [{k: rng.standard_normal(shape).astype(dt) if np.dtype(dt).kind == "f"
                 else np.zeros(shape, dt) for k, (shape, dt) in specs.items()}
                for _ in range(data)]
    if isinstance(data, (str, PathLike)):
        path = Path(data)
        if not path.is_file():
            raise CompileError(f"calibration file {str(path)!r} does not exist")
        try:
            with np.load(path, allow_pickle=False) as npz:
                data = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise CompileError(f"cannot read calibration file {str(path)!r}: {exc}") from None
    if isinstance(data, Mapping):
        feeds: list[dict[str, np.ndarray]] = []
        arrays = {k: np.asarray(v) for k, v in data.items()}
        _check_names(arrays, specs)
        counts = set()
        for name, (shape, _) in specs.items():
            arr = arrays[name]
            if arr.shape[1:] != shape[1:] or arr.shape[0] % shape[0]:
                raise CompileError(f"calibration data for {name!r} has shape {arr.shape}; "
                                   f"expected (k*{shape[0]}, {', '.join(map(str, shape[1:]))})")
            counts.add(arr.shape[0] // shape[0])
        if len(counts) != 1:
            raise CompileError(f"calibration inputs hold different sample counts {counts}")
        n = counts.pop()
        for i in range(n):
            feeds.append({k: arrays[k][i * s[0]:(i + 1) * s[0]].astype(dt)
                          for k, (s, dt) in specs.items()})
        return feeds
    if isinstance(data, Sequence) and data and all(isinstance(d, Mapping) for d in data):
        out = []
        for d in data:
            arrays = {k: np.asarray(v) for k, v in d.items()}
            _check_names(arrays, specs)
            for name, (shape, _) in specs.items():
                if arrays[name].shape != shape:
                    raise CompileError(f"calibration feed for {name!r} has shape "
                                       f"{arrays[name].shape}, the model wants {shape}")
            out.append({k: arrays[k].astype(dt) for k, (_, dt) in specs.items()})
        return out
    raise CompileError(f"unsupported calibration data {type(data).__name__}: give a mapping "
                       f"name -> array, a list of feed dicts, a .npz path or a sample count")


def _check_names(arrays: Mapping[str, np.ndarray], specs: Mapping[str, Any]) -> None:
    missing = sorted(set(specs) - set(arrays))
    if missing:
        raise CompileError(f"calibration data lacks input(s) {missing}; the model's inputs "
                           f"are {sorted(specs)}")


class _Reader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over a list of feed dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = feeds
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def quantize_model(model: onnx.ModelProto, calibration: Calibration | None,
                   *, per_channel: bool = True, preprocess: bool = True,
                   all_ops: bool = False) -> onnx.ModelProto:
    """The QDQ model onnxruntime's ``quantize_static`` makes of ``model``.

    Already-QDQ models are returned unchanged. A float model needs ``calibration``.
    ``all_ops`` asks onnxruntime to quantize every op type of the model, not only its default
    list (single-operator models such as onnx's node tests need it).
    """
    if is_qdq(model):
        return model
    if calibration is None:
        raise CompileError("the model is float: quantizing it needs calibration data "
                           "(calibration=..., or --calibration data.npz)")
    from onnxruntime.quantization import CalibrationDataReader

    feeds = calibration_feeds(model, calibration)
    reader = type("NpuCalibrationReader", (_Reader, CalibrationDataReader), {})(feeds)
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # ORT's advice to pre-process: we do
    try:
        op_types = sorted({n.op_type for n in model.graph.node}) if all_ops else None
        return _quantize(model, reader, per_channel, preprocess, op_types)
    finally:
        root.setLevel(level)


def _const_left_overrides(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    """Symmetric quantization for the constant *left* operand of a Gemm (``A @ X + b`` with
    ``A`` constant, e.g. GCN's normalized adjacency after ORT fuses MatMul+Add).

    onnxruntime quantizes a Gemm's input A as an activation: asymmetric, and a non-negative
    adjacency gets zero point -128, whose correction ``128 * sum_k x[k, f]`` depends on the
    data per output row of the NPU's transposed product. Symmetric (zero point 0) it folds
    like any weight (:mod:`npu.compiler.passes.families`); onnxruntime then runs the same
    QDQ model, so the int8 results still match it.
    """
    inits = {t.name for t in model.graph.initializer}
    out: dict[str, list[dict[str, Any]]] = {}
    for node in model.graph.node:
        if node.op_type == "Gemm" and len(node.input) > 1 and node.input[0] in inits \
                and node.input[1] not in inits:
            out[node.input[0]] = [{"symmetric": True}]
    return out


def _quantize(model: onnx.ModelProto, reader: Any, per_channel: bool,
              preprocess: bool, op_types: list[str] | None = None) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="npu-quant-") as tmp:
        src = Path(tmp) / "float.onnx"
        pre = Path(tmp) / "pre.onnx"
        dst = Path(tmp) / "qdq.onnx"
        onnx.save(model, str(src))
        if preprocess:
            try:
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            except Exception as exc:  # ORT's optimizer can refuse exotic graphs
                logging.getLogger(__name__).info("quant_pre_process skipped: %s", exc)
                pre = src
        else:
            pre = src
        overrides = _const_left_overrides(onnx.load(str(pre)) if pre != src else model)
        try:
            quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QInt8,
                            op_types_to_quantize=op_types,
                            weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"ActivationSymmetric": False,
                                           "WeightSymmetric": True,
                                           # Pools and reshapes after a float-only chain
                                           # (e.g. Sum -> Relu) are quantized too, so the
                                           # whole chain stays int8 on the NPU.
                                           "ForceQuantizeNoInputCheck": True,
                                           "TensorQuantOverrides": overrides})
        except CompileError:
            raise
        except Exception as exc:
            raise CompileError(f"onnxruntime quantize_static failed: {exc}") from None
        return onnx.load(str(dst))
