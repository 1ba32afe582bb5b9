"""npu.models: the models the stack is judged on, with small real data, and ``npu demo``.

Modules (import what you need; nothing heavy is imported here):

* :mod:`npu.models.zoo` -- ``MODELS`` (every builder by name) and ``calibration_data``;
* :mod:`npu.models.cnn` -- digits CNN (trained), 784-128-10 MLP, Gaussian blur, moving average;
* :mod:`npu.models.light` -- the onnx wheel's light model-zoo networks with seeded weights;
* :mod:`npu.models.nerf` -- NeRF MLPs, Instant-NGP tiny MLP, procedural scene, volume renderer;
* :mod:`npu.models.gnn` -- GCN, GraphSAGE, GIN on karate club and a 10,000-node graph;
* :mod:`npu.models.data` -- the digits data set and accuracy helpers;
* :mod:`npu.models.checks` -- accuracy checks through the NPU (compiler + simulator);
* :mod:`npu.models.demo` -- ``npu demo``; :mod:`npu.models.train` re-creates ``data/*.npz``.
"""
