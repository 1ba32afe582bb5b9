"""GNN builders on karate club and the synthetic graph, against edge-list numpy references."""

from __future__ import annotations

import networkx as nx
import numpy as np
import onnx
import pytest

from npu.models import gnn
from npu.models._onnx import ModelError


def _edges(data: gnn.GraphData) -> tuple[np.ndarray, np.ndarray]:
    coo = data.adjacency.tocoo()
    return coo.row, coo.col  # both directions


def _gcn_ref(p: dict, data: gnn.GraphData) -> np.ndarray:
    """GCN by scatter-add over the edge list (no matrices): sum_u h_u / sqrt(d_u d_v)."""
    src, dst = _edges(data)
    n = data.n_nodes
    deg = np.bincount(src, minlength=n) + 1.0  # + self loop

    def propagate(h: np.ndarray) -> np.ndarray:
        out = h / deg[:, None]  # the self loop: 1 / sqrt(d_v d_v)
        np.add.at(out, dst, h[src] / np.sqrt(deg[src] * deg[dst])[:, None])
        return out

    h = np.maximum(propagate(data.features @ p["gc1.weight"]) + p["gc1.bias"], 0)
    return propagate(h @ p["gc2.weight"]) + p["gc2.bias"]


def _sage_ref(p: dict, x: np.ndarray, nbrs: list[np.ndarray]) -> np.ndarray:
    h = x
    for layer, nbr in enumerate(nbrs, start=1):
        mean = np.stack([h[nbr[v]].mean(axis=0) for v in range(len(h))])
        z = np.concatenate([h, mean], axis=1) @ p[f"sage{layer}.weight"] + p[f"sage{layer}.bias"]
        h = np.maximum(z, 0) if layer < len(nbrs) else z
    return h


def _gin_ref(p: dict, data: gnn.GraphData) -> np.ndarray:
    src, dst = _edges(data)
    h = data.features.astype(np.float64)
    for layer in (1, 2):
        agg = h.copy()
        np.add.at(agg, dst, h[src])
        for k in (0, 1):
            h = np.maximum(agg @ p[f"gin{layer}.mlp{k}.weight"] + p[f"gin{layer}.mlp{k}.bias"], 0)
            agg = h
    return h @ p["head.weight"] + p["head.bias"]


def test_karate_graph() -> None:
    data = gnn.karate_graph()
    assert (data.n_nodes, data.n_edges, data.n_classes) == (34, 78, 2)
    assert np.bincount(data.labels).tolist() == [17, 17]
    g = nx.karate_club_graph()
    assert data.labels[0] == 0 and g.nodes[33]["club"] == "Officer" and data.labels[33] == 1
    assert data.train_mask.sum() == 16  # 8 of each club
    assert (data.adjacency != data.adjacency.T).nnz == 0 and data.adjacency.diagonal().sum() == 0


def test_gcn_karate_matches_edge_list_reference(ort_run) -> None:
    model = gnn.gcn("karate")
    onnx.checker.check_model(model, full_check=True)
    p = gnn.train_gnn("gcn", "karate")
    data = gnn.karate_graph()
    out = ort_run(model, {"x": data.features})[0]
    np.testing.assert_allclose(out, _gcn_ref(p, data), rtol=1e-4, atol=1e-4)
    acc = gnn.gnn_accuracy("gcn", p)
    print(f"GCN karate float accuracy: {acc}")
    assert acc["train"] == 1.0 and acc["all"] >= 0.9


def test_graphsage_karate_matches_gather_reference(ort_run) -> None:
    model = gnn.graphsage("karate")
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["x", "nbr1", "nbr2"]
    assert sum(n.op_type == "Gather" for n in model.graph.node) == 2
    feeds = gnn.gnn_feeds("sage", "karate")
    assert feeds["nbr1"].shape == (34, 10) and feeds["nbr2"].shape == (34, 5)
    data = gnn.karate_graph()
    # Every sampled index is a neighbour.
    for nbr in (feeds["nbr1"], feeds["nbr2"]):
        assert all(data.adjacency[v, u] for v in range(34) for u in nbr[v])
    p = gnn.train_gnn("sage", "karate")
    out = ort_run(model, feeds)[0]
    ref = _sage_ref(p, data.features, [feeds["nbr1"], feeds["nbr2"]])
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    const = gnn.graphsage("karate", neighbors="constant")
    assert [i.name for i in const.graph.input] == ["x"]
    np.testing.assert_allclose(ort_run(const, {"x": data.features})[0], out, atol=1e-5)
    acc = gnn.gnn_accuracy("sage", p)
    print(f"GraphSAGE karate float accuracy: {acc}")
    assert acc["train"] == 1.0 and acc["all"] >= 0.75


def test_gin_karate_matches_edge_list_reference(ort_run) -> None:
    model = gnn.gin("karate")
    onnx.checker.check_model(model, full_check=True)
    p = gnn.train_gnn("gin", "karate")
    data = gnn.karate_graph()
    out = ort_run(model, {"x": data.features})[0]
    np.testing.assert_allclose(out, _gin_ref(p, data), rtol=1e-4, atol=1e-3)
    acc = gnn.gnn_accuracy("gin", p)
    print(f"GIN karate float accuracy: {acc}")
    assert acc["train"] == 1.0 and acc["all"] >= 0.9


def test_sparse_and_dense_adjacency_agree(ort_run) -> None:
    x = {"x": gnn.karate_graph().features}
    dense, sparse = gnn.gcn("karate", sparse=False), gnn.gcn("karate", sparse=True)
    assert any(n.op_type == "Constant" for n in sparse.graph.node)
    assert not any(n.op_type == "Constant" for n in dense.graph.node)
    np.testing.assert_allclose(ort_run(sparse, x)[0], ort_run(dense, x)[0], atol=1e-6)


def test_synthetic_graph_is_large_and_block_sparse() -> None:
    data = gnn.sbm_graph()
    assert data.n_nodes >= 10_000 and data.features.shape == (10_000, 32)
    assert (data.adjacency != data.adjacency.T).nnz == 0 and data.adjacency.diagonal().sum() == 0
    deg = np.asarray(data.adjacency.sum(axis=1)).ravel()
    assert 4 < deg.mean() < 12
    # Communities are contiguous: few 16x16 blocks of A_hat hold any edge.
    a = gnn.gcn_adjacency(data.adjacency).tocoo()
    blocks = np.unique((a.row // 16) * (data.n_nodes // 16 + 1) + a.col // 16)
    frac = len(blocks) / (data.n_nodes // 16) ** 2
    print(f"synthetic graph: {data.n_nodes} nodes, {data.n_edges} edges, "
          f"non-zero 16x16 blocks {frac:.2%}")
    assert frac < 0.05


def test_sample_neighbors_handles_isolated_nodes() -> None:
    import scipy.sparse as sp

    a = sp.csr_matrix(np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]], np.float32))
    nbr = gnn.sample_neighbors(a, 4)
    assert (nbr[0] == 1).all() and (nbr[1] == 0).all() and (nbr[2] == 2).all()


@pytest.mark.parametrize("kind,build", [("gcn", gnn.gcn), ("sage", gnn.graphsage),
                                        ("gin", gnn.gin)])
def test_synthetic_graph_models_match_numpy(ort_run, kind, build) -> None:
    model = build("sbm")
    onnx.checker.check_model(model, full_check=True)
    assert model.ByteSize() < 5_000_000  # sparse adjacency: no 400 MB dense constant
    data = gnn.sbm_graph()
    p = gnn.init_params(kind, 32, 16, 4)
    out = ort_run(model, gnn.gnn_feeds(kind, "sbm"))[0]
    ref = gnn.gnn_forward(kind, p, data)
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_bad_gnn_arguments() -> None:
    with pytest.raises(ModelError, match="unknown graph"):
        gnn.gcn("cora")
    with pytest.raises(ModelError, match="neighbors"):
        gnn.graphsage(neighbors="sampled")
    with pytest.raises(ModelError, match="fanouts"):
        gnn.graphsage("karate", fanouts=(3, 3))
    with pytest.raises(ModelError, match="kind"):
        gnn.init_params("gat", 4, 4, 2)
