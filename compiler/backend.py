"""An ``onnx.backend`` adapter: run ONNX models (e.g. onnx's own node tests) on the NPU.

``NpuBackend.prepare(model, calibration=...)`` compiles a model (float models are quantized on
the calibration data by onnxruntime) and returns a rep whose ``run(inputs)`` executes it on the
simulator, like any onnx backend. :func:`constant_inputs` turns graph inputs that hold weights
(a Conv's ``W``, a Gemm's ``B``, a Reshape's shape...) into initializers: onnx's node tests feed
them as inputs, and this NPU takes weights as constants.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.backend.base import Backend, BackendRep

from npu.compiler.session import InferenceSession

__all__ = ["NpuBackend", "NpuBackendRep", "constant_inputs", "WEIGHT_INPUTS"]

#: For each op type, the input positions that are weights, shapes or axes (not activations).
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "Gemm": (1, 2), "MatMul": (1,), "Reshape": (1,), "Squeeze": (1,),
    "Unsqueeze": (1,), "Clip": (1, 2), "Gather": (0,),
}


def constant_inputs(model: onnx.ModelProto, values: Mapping[str, np.ndarray]
                    ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Make weight-like graph inputs (see :data:`WEIGHT_INPUTS`) initializers with ``values``;
    returns the new model and the remaining (activation) inputs' values."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names: set[str] = set()
    for node in m.graph.node:
        for pos in WEIGHT_INPUTS.get(node.op_type, ()):
            if pos < len(node.input) and node.input[pos]:
                names.add(node.input[pos])
    names &= {i.name for i in m.graph.input} & set(values)
    keep = [i for i in m.graph.input if i.name not in names]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    m.graph.initializer.extend(numpy_helper.from_array(np.asarray(values[n]), n)
                               for n in sorted(names))
    # Inputs declared with dynamic dimensions take the shape of the given data.
    for inp in m.graph.input:
        if inp.name in values:
            dims = inp.type.tensor_type.shape.dim
            for d, size in zip(dims, np.asarray(values[inp.name]).shape):
                if not d.HasField("dim_value") or d.dim_value <= 0:
                    d.Clear()
                    d.dim_value = int(size)
    return m, {k: np.asarray(v) for k, v in values.items() if k not in names}


class NpuBackendRep(BackendRep):
    """A compiled model; ``run`` takes inputs in graph-input order (or a dict)."""

    def __init__(self, session: InferenceSession) -> None:
        self.session = session

    def run(self, inputs: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
        names = [i.name for i in self.session.get_inputs()]
        if isinstance(inputs, Mapping):
            feeds = dict(inputs)
        else:
            seq = [inputs] if isinstance(inputs, np.ndarray) else list(inputs)
            feeds = dict(zip(names, seq))
        return tuple(self.session.run(None, feeds))


class NpuBackend(Backend):
    """onnx backend API over :class:`npu.compiler.session.InferenceSession`."""

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "NPU", **kwargs: Any
                ) -> NpuBackendRep:
        config = kwargs.pop("config", "npu16")
        calibration = kwargs.pop("calibration", None)
        kwargs.setdefault("quantize_all", True)   # single ops: quantize whatever is there
        return NpuBackendRep(InferenceSession(model, config, calibration, **kwargs))

    @classmethod
    def run_model(cls, model: onnx.ModelProto, inputs: Any, device: str = "NPU",
                  **kwargs: Any) -> tuple[np.ndarray, ...]:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device in ("NPU", "CPU")

    @classmethod
    def run_node(cls, node: onnx.NodeProto, inputs: Sequence[Any], device: str = "NPU",
                 outputs_info: Any = None, **kwargs: Any) -> tuple[np.ndarray, ...]:
        raise NotImplementedError("run_node: wrap the node in a model and use run_model")
