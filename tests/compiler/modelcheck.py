"""Whole-model checks shared by the model tests and ``bench/schedule_quality.py``.

* :func:`ort_tensors`: every int8 tensor of onnxruntime's run of the QDQ model, on its integer
  kernels (QLinearConv, QGemm, ...: what the compiler reproduces) or on the float QDQ graph.
* :func:`teacher_forced`: every NPU node evaluated (IR semantics, :mod:`npu.compiler.reference`)
  on onnxruntime's own int8 inputs and compared with onnxruntime's int8 output: the per-layer
  arithmetic check, independent of error propagation.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper
from opmodels import agreement, ort_session

from npu.compiler.ir import Graph
from npu.compiler.reference import eval_node, to_nhwc


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def ort_tensors(qdq: onnx.ModelProto, feeds: dict[str, np.ndarray], kernels: str = "int8"
                ) -> dict[str, np.ndarray]:
    """Every QuantizeLinear output of onnxruntime's run of the QDQ model (``kernels``:
    ``"int8"`` its fused integer kernels, ``"float"`` the unoptimized QDQ graph)."""
    names = [n.output[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear"]
    outs = {o.name for o in qdq.graph.output}
    sess = ort_session(qdq, [n for n in names if n not in outs], kernels)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def teacher_forced(graph: Graph, ort: dict[str, np.ndarray]) -> dict[str, tuple[float, int]]:
    """(fraction identical, max difference) per NPU node, fed onnxruntime's inputs."""
    out: dict[str, tuple[float, int]] = {}
    # Split-K parts (npu.compiler.passes.mlp) are channel slices of onnxruntime's concat.
    for node in graph.nodes:
        for part, (cat, off) in zip(node.inputs, node.attrs.get("k_sources", [])):
            if part not in ort and cat in ort:
                c = graph.tensors[part].shape[1]
                ort = {**ort, part: ort[cat][:, off:off + c]}
    for node in graph.nodes:
        if node.device != "npu" or node.op in ("concat", "reshape", "reorder"):
            continue
        names = node.inputs + [s.other for s in node.attrs.get("epilogue", []) if s.other]
        env = {}
        for name in names:
            t = graph.tensors[name]
            if t.is_const:
                continue
            if name not in ort or t.view_of is not None:
                break
            env[name] = to_nhwc(ort[name], t).astype(np.int64)
        else:
            y = eval_node(graph, node, env)[node.outputs[0]]
            t = graph.tensors[node.outputs[0]]
            if t.view_of is not None:
                base = graph.tensors[t.view_of[0]]
                off = t.view_of[1]
                want = to_nhwc(ort[base.name], base)[..., off:off + y.shape[-1]]
            elif t.name in ort:
                want = to_nhwc(ort[t.name], t)
            else:
                continue
            out[node.name] = agreement(y, want)
    return out


def float_tensor(model: onnx.ModelProto, name: str, feeds: dict[str, np.ndarray]
                 ) -> np.ndarray:
    """A tensor of the float model, by name (onnxruntime)."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run([name], feeds)[0]
