"""Shared fixtures of the model tests: onnxruntime sessions, the float reference."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.fixture
def ort_session() -> Callable:
    """``ort_session(model)`` -> an onnxruntime CPU session (warnings silenced)."""
    return _session


@pytest.fixture
def ort_run() -> Callable[[onnx.ModelProto, dict[str, np.ndarray]], list[np.ndarray]]:
    """``ort_run(model, feeds)`` -> all outputs of the model in onnxruntime."""
    return lambda model, feeds: _session(model).run(None, feeds)
