"""Whole-model checks shared by the model tests and ``bench/schedule_quality.py``.

* :func:`teacher_forced`: every NPU node evaluated (IR semantics, :mod:`npu.compiler.reference`)
  on onnxruntime's own int8 inputs and compared with onnxruntime's int8 output: the per-layer
  arithmetic check, independent of error propagation.
* :func:`stable_resnet50`: the light ResNet-50 with each residual branch's last BatchNorm scaled
  by 0.2 (the usual "small last gamma" initialisation). With all gammas at 1 the random network
  is chaotic: onnxruntime's own int8 model is only ~0.985 cosine-similar to its float model, and
  a single int8 value changed by one step early on changes most of the logits.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from opmodels import agreement, ort_session

from npu.compiler.ir import Graph
from npu.compiler.reference import eval_node, to_nhwc


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def stable_resnet50(seed: int = 0, gamma: float = 0.2) -> onnx.ModelProto:
    """``npu.models.light_model("resnet50")`` with residual branches damped (see above)."""
    from npu.models.light import light_model

    model = light_model("resnet50", seed)
    for t in model.graph.initializer:
        if "branch2c_bn_s" in t.name or "branch2c_bn_b" in t.name:
            arr = numpy_helper.to_array(t) * np.float32(gamma)
            t.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), t.name))
    return model


def ort_tensors(qdq: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every QuantizeLinear output of onnxruntime's (unoptimized) run of the QDQ model."""
    names = [n.output[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear"]
    outs = {o.name for o in qdq.graph.output}
    sess = ort_session(qdq, [n for n in names if n not in outs])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def teacher_forced(graph: Graph, ort: dict[str, np.ndarray]) -> dict[str, tuple[float, int]]:
    """(fraction identical, max difference) per NPU node, fed onnxruntime's inputs."""
    out: dict[str, tuple[float, int]] = {}
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
