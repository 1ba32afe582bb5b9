"""The onnx wheel's light models with seeded weights: valid, deterministic, sane activations."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from npu.models import light
from npu.models._onnx import ModelError

FAST = ("squeezenet", "shufflenet")
SLOW = ("resnet50", "inception_v1", "densenet121", "inception_v2", "bvlc_alexnet", "vgg19",
        "zfnet512")


def _check(name: str, ort_session) -> None:
    model = light.light_model(name)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    assert not any(n.op_type == "ConstantOfShape" for n in model.graph.node)
    inits = {t.name for t in model.graph.initializer}
    assert [i.name for i in model.graph.input] == [light.light_input_name(name)]
    assert not inits & {i.name for i in model.graph.input}
    # Every node input is produced by a node, an initializer or the graph input.
    produced = {o for n in model.graph.node for o in n.output} | inits | {
        model.graph.input[0].name}
    assert all(i in produced for n in model.graph.node for i in n.input if i)
    # The logits (the Softmax input if there is one) must be in a sane range: not exploding,
    # not collapsed to a constant.
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    if softmax:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(softmax[0].input[0], 1,
                                                                     None))
    outs = ort_session(probe).run(None, {model.graph.input[0].name: light.light_input(1, 7)})
    assert all(np.isfinite(o).all() for o in outs)
    if softmax:
        np.testing.assert_allclose(outs[0].sum(), 1.0, atol=1e-4)
        # Scaled to std 2 on the calibration image; another image lands near that.
        assert 1.0 < outs[-1].std() < 6.0
        assert outs[0].max() < 0.9  # not one-hot
    else:
        assert 0.05 < outs[-1].std() < 20


@pytest.mark.parametrize("name", FAST)
def test_light_model_valid_and_in_range(name: str, ort_session) -> None:
    _check(name, ort_session)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_large_light_model_valid_and_in_range(name: str, ort_session) -> None:
    _check(name, ort_session)


def test_all_light_models_listed() -> None:
    assert set(FAST) | set(SLOW) == set(light.LIGHT_MODELS)
    for name in light.LIGHT_MODELS:
        assert light.light_model_path(name).exists()


def test_seeded_weights_are_deterministic_and_seed_dependent() -> None:
    a = light.light_model("squeezenet", seed=0)
    b = light.light_model("squeezenet", seed=0)
    c = light.light_model("squeezenet", seed=1)
    assert a.SerializeToString() == b.SerializeToString()
    wa = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    wc = {t.name: numpy_helper.to_array(t) for t in c.graph.initializer}
    assert wa.keys() == wc.keys()
    assert not np.allclose(wa["conv1_w_0"], wc["conv1_w_0"])


def test_opset9_and_opset17_agree(ort_session) -> None:
    x = {light.light_input_name("squeezenet"): light.light_input(1, 3)}
    m9 = light.light_model("squeezenet", opset=None)
    assert m9.opset_import[0].version == 9
    out9 = ort_session(m9).run(None, x)[0]
    out17 = ort_session(light.light_model("squeezenet")).run(None, x)[0]
    np.testing.assert_allclose(out9, out17, rtol=1e-5, atol=1e-7)


def test_batchnorm_statistics_are_measured(ort_session) -> None:
    """On the calibration image every BatchNorm output is (beta + gamma * N(0, 1))."""
    model = light.light_model("shufflenet")
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert bns
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n.output[0], 1, None)
                              for n in bns)
    outs = ort_session(probe).run([n.output[0] for n in bns],
                                  {model.graph.input[0].name: light.light_input(1, 0)})
    for n, y in zip(bns, outs):
        gamma, beta = w[n.input[1]], w[n.input[2]]
        z = (y - beta[:, None, None]) / gamma[:, None, None]
        live = w[n.input[4]] > 1e-6  # channels that are not constant
        np.testing.assert_allclose(z.mean(axis=(0, 2, 3))[live], 0.0, atol=2e-3)
        np.testing.assert_allclose(z.var(axis=(0, 2, 3))[live], 1.0, atol=2e-2)


def test_unknown_light_model_names_the_choices() -> None:
    with pytest.raises(ModelError, match="squeezenet"):
        light.light_model("lenet")
