"""A small helper for writing ONNX graphs with plain ``onnx.helper``.

Every builder in :mod:`npu.models` goes through :class:`GraphBuilder`, so names are unique, the
opset and IR version are the same everywhere, and each initializer is stored once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: Opset of every model written here. 17 is the newest with ``ReduceMean(axes=...)`` as an
#: attribute and is supported by every onnxruntime >= 1.13.
OPSET = 17
#: IR version matching opset 17 (onnx >= 1.16 would otherwise write one onnxruntime may reject).
IR_VERSION = 8

Dim = int | str | None


class ModelError(ValueError):
    """A builder or loader got an argument it cannot use; the message names it."""


def tensor_info(name: str, shape: Sequence[Dim], dtype: int = TensorProto.FLOAT
                ) -> onnx.ValueInfoProto:
    """A graph input/output declaration; a string dimension is symbolic, None unknown."""
    return helper.make_tensor_value_info(name, dtype, list(shape))


class GraphBuilder:
    """Accumulates nodes and initializers of one graph; ``build`` returns the checked model."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()
        self._counter = 0

    def fresh(self, hint: str) -> str:
        """A tensor name not used yet, derived from ``hint``."""
        name = hint
        while name in self._names:
            self._counter += 1
            name = f"{hint}_{self._counter}"
        self._names.add(name)
        return name

    def input(self, name: str, shape: Sequence[Dim], dtype: int = TensorProto.FLOAT) -> str:
        """Declare a graph input and return its name."""
        self._names.add(name)
        self.inputs.append(tensor_info(name, shape, dtype))
        return name

    def output(self, name: str, shape: Sequence[Dim], dtype: int = TensorProto.FLOAT) -> None:
        """Declare an existing tensor as a graph output."""
        self.outputs.append(tensor_info(name, shape, dtype))

    def const(self, hint: str, value: np.ndarray) -> str:
        """Store ``value`` as an initializer (float64 becomes float32) and return its name."""
        value = np.asarray(value)
        if value.dtype == np.float64:
            value = value.astype(np.float32)
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def sparse_const(self, hint: str, value: Any) -> str:
        """A constant stored as a ``Constant`` node with a ``sparse_value`` (COO, linear indices).

        ``value`` is a dense array or a scipy sparse matrix. Used for large graph adjacency
        matrices: a dense 10,000-node float matrix would be 400 MB in the file, the sparse one
        a few hundred kB. onnxruntime densifies it at load.
        """
        if hasattr(value, "tocoo"):  # scipy.sparse, without importing scipy here
            coo = value.tocoo()
            shape = coo.shape
            flat = coo.row.astype(np.int64) * shape[1] + coo.col
            order = np.argsort(flat)
            flat, data = flat[order], np.asarray(coo.data, np.float32)[order]
        else:
            dense = np.asarray(value, dtype=np.float32)
            shape = dense.shape
            flat = np.flatnonzero(dense).astype(np.int64)
            data = dense.ravel()[flat]
        name = self.fresh(hint)
        values = numpy_helper.from_array(data, name)
        indices = numpy_helper.from_array(flat, name + "_indices")
        sparse = helper.make_sparse_tensor(values, indices, list(shape))
        self.nodes.append(helper.make_node("Constant", [], [name], name=name + "_const",
                                           sparse_value=sparse))
        return name

    def node(self, op: str, inputs: Sequence[str], hint: str | None = None, n_out: int = 1,
             out: str | None = None, **attrs: Any) -> str | list[str]:
        """Append a node; returns its output name (or names when ``n_out > 1``).

        ``out`` names the (single) output exactly, e.g. a graph output.
        """
        base = hint or op.lower()
        if out is not None:
            self._names.add(out)
            outs = [out]
        else:
            outs = [self.fresh(base if n_out == 1 else f"{base}_{i}") for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.fresh(base + "_node"),
                                           **attrs))
        return outs[0] if n_out == 1 else outs

    def gemm(self, x: str, weight: np.ndarray, bias: np.ndarray | None, hint: str,
             out: str | None = None) -> str:
        """``x @ weight + bias`` as one Gemm; ``weight`` is [in, out] (no transpose)."""
        w = self.const(f"{hint}.weight", weight)
        ins = [x, w] if bias is None else [x, w, self.const(f"{hint}.bias", bias)]
        return self.node("Gemm", ins, hint, out=out)

    def build(self, doc: str = "") -> onnx.ModelProto:
        """The model (opset :data:`OPSET`), after ``onnx.checker`` and shape inference."""
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  ir_version=IR_VERSION, producer_name="npu.models",
                                  doc_string=doc)
        onnx.checker.check_model(model)
        return model


def he_normal(rng: np.random.Generator, fan_in: int, shape: Sequence[int],
              gain: float = 2.0) -> np.ndarray:
    """He (Kaiming) normal init: variance ``gain / fan_in`` keeps ReLU activations in range."""
    return (rng.standard_normal(shape) * np.sqrt(gain / fan_in)).astype(np.float32)


def check_positive(**values: int) -> None:
    """Raise :class:`ModelError` naming the first argument that is not a positive integer."""
    for key, value in values.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ModelError(f"{key} must be a positive integer, got {value!r}")
