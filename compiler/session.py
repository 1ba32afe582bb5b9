"""``npu.InferenceSession``: onnxruntime's interface over the compiler and the simulator.

::

    sess = npu.InferenceSession("model.onnx", config="npu16", calibration={"x": data})
    [y] = sess.run(None, {"x": x})        # float in, float out, like onnxruntime
    print(sess.profile.table())            # cycles, utilization, stalls of the last run
    print(sess.report_text())              # where every ONNX node ran

A run alternates host work and NPU segments: host nodes run in numpy (``onnx.reference``) on
ONNX-layout tensors, each segment's program runs on the cycle-exact simulator
(:func:`npu.runtime.run`) with its int8 inputs converted to the program's DRAM layout (NHWC,
physical padding for packed convolutions) and its outputs converted back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from npu.compiler.errors import CompileError
from npu.compiler.frontend import ModelSource
from npu.compiler.ir import CHANNEL_LAST, Graph, Node, Tensor, geometry
from npu.compiler.pipeline import CompiledModel, compile_model
from npu.compiler.quantize import Calibration
from npu.isa import NPUConfig
from npu.program import Binding, Program

__all__ = ["InferenceSession", "NodeArg", "to_dram", "from_dram"]

_ORT_TYPES = {"float32": "tensor(float)", "int8": "tensor(int8)", "uint8": "tensor(uint8)",
              "int32": "tensor(int32)", "int64": "tensor(int64)", "float16": "tensor(float16)",
              "float64": "tensor(double)", "bool": "tensor(bool)"}
_ONNX_TYPES = {"float32": onnx.TensorProto.FLOAT, "int8": onnx.TensorProto.INT8,
               "uint8": onnx.TensorProto.UINT8, "int32": onnx.TensorProto.INT32,
               "int64": onnx.TensorProto.INT64, "float16": onnx.TensorProto.FLOAT16,
               "float64": onnx.TensorProto.DOUBLE, "bool": onnx.TensorProto.BOOL}


@dataclass(frozen=True)
class NodeArg:
    """A graph input or output as onnxruntime describes it."""

    name: str
    shape: list[int]
    type: str


def _run_program(program: Program, inputs: dict[str, np.ndarray], engine: str,
                 validate: bool) -> Any:
    try:
        from npu.runtime import run
    except ImportError:
        from npu.runtime.engine import run
    return run(program, inputs, engine=engine, validate=validate)


def _pad(t: Tensor) -> tuple[int, int, int, int]:
    return t.place.pad if t.place is not None else (0, 0, 0, 0)


def to_dram(value: np.ndarray, t: Tensor, b: Binding) -> np.ndarray:
    """An ONNX-layout tensor as the program's binding stores it (NHWC, padding, int32)."""
    arr = np.asarray(value)
    if b.dtype == "int32":
        return arr.astype(np.int64).astype(np.int32).reshape(b.shape)
    arr = arr.astype(np.int8)
    if t.layout != CHANNEL_LAST:
        return np.ascontiguousarray(arr.reshape(b.shape))
    if arr.ndim >= 3:
        arr = np.moveaxis(arr, 1, -1)
    arr = arr.reshape(geometry(t))
    pad = _pad(t)
    if any(pad):
        arr = np.pad(arr, ((0, 0), (pad[0], pad[2]), (pad[1], pad[3]), (0, 0)),
                     constant_values=np.int8(t.place.pad_value))
    return np.ascontiguousarray(arr.reshape(b.shape))


def from_dram(value: np.ndarray, t: Tensor, b: Binding) -> np.ndarray:
    """The inverse of :func:`to_dram`: back to the ONNX shape and layout."""
    arr = np.asarray(value)
    if t.layout != CHANNEL_LAST:
        return np.ascontiguousarray(arr.reshape(t.shape))
    n, h, w, c = geometry(t)
    pad = _pad(t)
    arr = arr.reshape(n, h + pad[0] + pad[2], w + pad[1] + pad[3], c)
    arr = arr[:, pad[0]:pad[0] + h, pad[1]:pad[1] + w, :]
    if len(t.shape) == 3:
        arr = arr.reshape(n, w, c)
    return np.ascontiguousarray(np.moveaxis(arr, -1, 1).reshape(t.shape))


class _HostOp:
    """One host node: an ONNX node run by ``onnx.reference``, or an IR op in numpy."""

    def __init__(self, node: Node, graph: Graph) -> None:
        self.node = node
        self.inputs = [i for i in node.inputs if i]
        self.evaluator = None
        proto = node.attrs.get("onnx_node")
        self.qdq = proto is not None and proto.op_type in ("QuantizeLinear", "DequantizeLinear")
        if self.qdq:
            self.axis = next((helper.get_attribute_value(a) for a in proto.attribute
                              if a.name == "axis"), 1)
            self.out_dtype = graph.tensors[node.outputs[0]].dtype
            return
        if proto is None:
            # An IR node moved to the host: the reference semantics in numpy.
            self.graph = graph
            return
        from onnx.reference import ReferenceEvaluator

        feeds, inits = [], []
        for name in self.inputs:
            t = graph.tensors[name]
            if t.is_const:
                inits.append(numpy_helper.from_array(np.asarray(t.data), name))
            else:
                feeds.append(helper.make_tensor_value_info(name, _ONNX_TYPES.get(
                    t.dtype, onnx.TensorProto.FLOAT), list(t.shape)))
        outs = [helper.make_tensor_value_info(o, _ONNX_TYPES.get(
            graph.tensors[o].dtype, onnx.TensorProto.FLOAT), list(graph.tensors[o].shape))
            for o in node.outputs]
        g = helper.make_graph([proto], "host", feeds, outs, initializer=inits)
        opsets = [helper.make_opsetid(d, v) for d, v in graph.opset]
        model = helper.make_model(g, opset_imports=opsets)
        model.ir_version = max(model.ir_version, 7)
        self.evaluator = ReferenceEvaluator(model)
        self.feed_names = [f.name for f in feeds]

    def __call__(self, env: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        node = self.node
        if self.qdq:
            return {node.outputs[0]: self._qdq(env)}
        if self.evaluator is None:
            from npu.compiler.reference import eval_onnx_layout

            return eval_onnx_layout(self.graph, node, env)
        try:
            outs = self.evaluator.run(None, {k: env[k] for k in self.feed_names})
        except Exception as exc:
            raise CompileError(f"host execution failed: {exc}", node.name, node.onnx_op) from None
        return dict(zip(node.outputs, outs))


    def _qdq(self, env: dict[str, np.ndarray]) -> np.ndarray:
        """QuantizeLinear (round half to even, saturate) / DequantizeLinear, per tensor or per
        axis, in numpy (what onnxruntime computes, in float32)."""
        x = np.asarray(env[self.inputs[0]])
        scale = np.asarray(env[self.inputs[1]], dtype=np.float32)
        zp = np.asarray(env[self.inputs[2]]) if len(self.inputs) > 2 else \
            np.zeros((), dtype=np.int8 if self.node.onnx_op == "DequantizeLinear" else
                     np.uint8)
        if scale.ndim == 1 and x.ndim > 1:
            shape = [1] * x.ndim
            shape[self.axis % x.ndim] = -1
            scale = scale.reshape(shape)
            zp = zp.reshape(shape)
        if self.node.onnx_op == "DequantizeLinear":
            return ((x.astype(np.int64) - zp.astype(np.int64)).astype(np.float32) * scale)
        info = np.iinfo(zp.dtype)
        q = np.round(x.astype(np.float32) / scale) + zp.astype(np.float32)
        return np.clip(q, info.min, info.max).astype(zp.dtype)


class InferenceSession:
    """Compile ``model`` for ``config`` and run it like ``onnxruntime.InferenceSession``.

    ``model`` is an ONNX path, bytes or ModelProto (float: give ``calibration``; QDQ: taken as
    it is), or a :class:`CompiledModel`. ``engine`` picks the simulator ("numba" or
    "reference"); ``validate`` checks every program (encodings, addresses) before it runs.
    """

    def __init__(self, model: ModelSource | CompiledModel, config: str | NPUConfig = "npu16",
                 calibration: Calibration | None = None, *, strict: bool = False,
                 batch: int | None = None, engine: str = "numba", validate: bool = True,
                 progress: bool = False, observe: Any = (), quantize_all: bool = False,
                 providers: Sequence[str] | None = None) -> None:
        if isinstance(model, CompiledModel):
            self.compiled = model
        elif isinstance(model, (str, PathLike)) and str(model).endswith(".npub"):
            from npu.compiler.bundle import load_bundle
            self.compiled = load_bundle(model)
        else:
            self.compiled = compile_model(model, config, calibration, strict=strict,
                                          batch=batch, progress=progress, observe=observe,
                                          quantize_all=quantize_all)
        self.engine = engine
        self.validate = validate
        self.graph = self.compiled.graph
        self._host = {n.name: _HostOp(n, self.graph) for n in self.graph.nodes
                      if n.device == "host"}
        self.results: list[Any] = []
        self.tensors: dict[str, np.ndarray] = {}
        self._profiles: list[Any] | None = None

    # onnxruntime interface ---------------------------------------------------------------
    def _args(self, names: list[str]) -> list[NodeArg]:
        out = []
        for n in names:
            t = self.graph.tensors[n]
            out.append(NodeArg(n, list(t.shape), _ORT_TYPES.get(t.dtype, f"tensor({t.dtype})")))
        return out

    def get_inputs(self) -> list[NodeArg]:
        """The model's inputs (name, shape, type)."""
        return self._args(self.graph.inputs)

    def get_outputs(self) -> list[NodeArg]:
        """The model's outputs (name, shape, type)."""
        return self._args(self.graph.outputs)

    def get_providers(self) -> list[str]:
        return ["NPUExecutionProvider"]

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any],
            run_options: Any = None) -> list[np.ndarray]:
        """Run the model; returns the requested outputs (all when ``output_names`` is None)."""
        g = self.graph
        names = list(output_names) if output_names else list(g.outputs)
        for n in names:
            if n not in g.tensors:
                raise CompileError(f"unknown output {n!r}; outputs are {g.outputs}")
        env: dict[str, np.ndarray] = {}
        for n in g.inputs:
            if n not in input_feed:
                raise CompileError(f"missing input {n!r}; inputs are {g.inputs}")
            t = g.tensors[n]
            arr = np.asarray(input_feed[n])
            if tuple(arr.shape) != tuple(t.shape):
                raise CompileError(f"input {n!r} has shape {arr.shape}, the model wants "
                                   f"{t.shape}")
            env[n] = arr.astype(t.dtype) if t.dtype in _ONNX_TYPES else arr
        extra = sorted(set(input_feed) - set(g.inputs))
        if extra:
            raise CompileError(f"unknown input(s) {extra}; inputs are {g.inputs}")
        for t in g.tensors.values():
            if t.is_const:
                env[t.name] = np.asarray(t.data)
        self.results = []
        self._profiles = None
        n_seg = len(g.segments)
        for phase in range(n_seg + 1):
            for node in g.nodes:
                if node.device == "host" and node.attrs.get("phase", 0) == phase:
                    env.update(self._host[node.name](env))
            if phase < n_seg:
                self._run_segment(phase, env)
        self.tensors = env
        return [env[n] for n in names]

    def _run_segment(self, k: int, env: dict[str, np.ndarray]) -> None:
        seg = self.graph.segments[k]
        prog: Program = seg.program
        feeds = {}
        for b in prog.inputs:
            t = self.graph.tensors[b.name]
            if b.dtype == "int32":
                idx = np.asarray(env[b.name]).astype(np.int64)
                feeds[b.name] = self._check_indices(idx, t, b)
            else:
                feeds[b.name] = to_dram(env[b.name], t, b)
        result = _run_program(prog, feeds, self.engine, self.validate)
        self.results.append(result)
        for b in prog.outputs:
            env[b.name] = from_dram(result.read(b), self.graph.tensors[b.name], b)

    def _check_indices(self, idx: np.ndarray, t: Tensor, b: Binding) -> np.ndarray:
        for node in self.graph.nodes:
            if node.op == "gather" and node.inputs[1] == t.name:
                rows = self.graph.tensors[node.inputs[0]].shape[0]
                idx = np.where(idx < 0, idx + rows, idx)
                if idx.size and (idx.min() < 0 or idx.max() >= rows):
                    raise CompileError(f"Gather index out of range [0, {rows}) in input "
                                       f"{t.name!r}", node.name, node.onnx_op)
        return idx.astype(np.int32).reshape(b.shape)

    # Results -----------------------------------------------------------------------------
    @property
    def profiles(self) -> list[Any]:
        """:class:`npu.runtime.profile.Profile` of every segment of the last run."""
        if self._profiles is None:
            from npu.runtime.profile import Profile

            self._profiles = [Profile.from_result(r, name=f"{self.graph.name}/segment{i}")
                              for i, r in enumerate(self.results)]
        return self._profiles

    @property
    def profile(self) -> Any:
        """Profile of the last run's NPU work (segment 0; see :attr:`profiles` for all)."""
        if not self.results:
            raise CompileError("no run yet: call run() before reading the profile")
        return self.profiles[0]

    @property
    def cycles(self) -> int:
        """Total NPU cycles of the last run (all segments)."""
        return int(sum(r.cycles for r in self.results))

    def report(self) -> dict[str, Any]:
        """The compile report (see :meth:`CompiledModel.report`)."""
        return self.compiled.report()

    def report_text(self) -> str:
        return self.compiled.report_text()

    @property
    def programs(self) -> list[Program]:
        return self.compiled.programs

    @property
    def qdq_model(self) -> onnx.ModelProto:
        """The QDQ model compiled (onnxruntime's quantization of the input model)."""
        return self.compiled.qdq_model
