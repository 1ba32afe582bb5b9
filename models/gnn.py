"""GNN builders (GCN, GraphSAGE, GIN) on Zachary's karate club and a synthetic 10,000-node graph.

The seeds name GraphSAGE and GCN but give no equations; the ones here are the standard ones
(Kipf & Welling; Hamilton et al.; Xu et al.):

* **GCN**: ``H' = relu(A_hat (H W) + b)`` with ``A_hat = D^-1/2 (A + I) D^-1/2`` (self loops,
  symmetric normalisation) stored as a constant matrix; two layers, the second without relu.
  ONNX: MatMul(x, W), MatMul(A_hat, .), Add(b), Relu.
* **GraphSAGE** (mean aggregator, sampled neighbours): ``h_v' = relu(W [h_v || mean_{u in
  S(v)} h_u] + b)``; layer k uses ``fanouts[k]`` neighbours per node sampled with replacement
  (10 then 5 by default), given as int64 index tensors [N, S] (graph inputs ``nbr1``,
  ``nbr2``, or constants). ONNX: Gather(h, nbr) [N, S, F], ReduceMean(axis 1), Concat, Gemm.
* **GIN** (sum aggregation, eps = 0): ``h' = MLP((A + I) h)`` with a two-layer MLP (Gemm, Relu,
  Gemm, Relu) per layer; two layers and a linear classifier. ONNX: MatMul(A + I, h), Gemm.

Graphs: :func:`karate_graph` (34 nodes, labels from the 'club' attribute, one-hot features) and
:func:`sbm_graph` (10,000 nodes in communities of 32 ordered contiguously, so the adjacency is
block-banded and most array-sized blocks are zero; noisy class-mean features). Graphs larger
than :data:`DENSE_LIMIT` nodes store their adjacency as a ``Constant`` with a ``sparse_value``
(a dense 10,000^2 float matrix would be 400 MB); onnxruntime densifies it when loading.

Every builder returns an ``onnx.ModelProto`` (opset 17): input ``x`` [N, F] float32 (plus
``nbr1``/``nbr2`` for GraphSAGE), output ``logits`` [N, classes]. Weights are trained here in
numpy (Adam, full batch, 200 steps, cached) on karate; on the synthetic graph they are seeded
He init unless ``trained=True`` (training there takes tens of seconds).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import onnx
import scipy.sparse as sp

from ._nn import Adam, cross_entropy, single_threaded
from ._onnx import GraphBuilder, ModelError, check_positive, he_normal
from .data import accuracy

Params = dict[str, np.ndarray]

#: Above this many nodes the adjacency constant is stored sparse.
DENSE_LIMIT = 2048
#: GraphSAGE fanouts per layer (layer 1, layer 2).
FANOUTS = (10, 5)


@dataclass(frozen=True)
class GraphData:
    """An undirected graph with node features, labels and a fixed train/test split."""

    name: str
    adjacency: sp.csr_matrix  # [N, N] 0/1, symmetric, no self loops
    features: np.ndarray  # [N, F] float32
    labels: np.ndarray  # [N] int64
    train_mask: np.ndarray  # [N] bool

    @property
    def n_nodes(self) -> int:
        return self.adjacency.shape[0]

    @property
    def n_classes(self) -> int:
        return int(self.labels.max()) + 1

    @property
    def n_edges(self) -> int:
        """Undirected edges."""
        return self.adjacency.nnz // 2


def _split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A train mask with ``fraction`` of each class."""
    mask = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        mask[rng.permutation(idx)[:max(1, round(len(idx) * fraction))]] = True
    return mask


@lru_cache(maxsize=1)
def karate_graph() -> GraphData:
    """Zachary's karate club (networkx): 34 nodes, 78 edges, 2 clubs ('Mr. Hi' = 0,
    'Officer' = 1), one-hot node features, half of each club in the training set."""
    import networkx as nx

    g = nx.karate_club_graph()
    n = g.number_of_nodes()
    a = nx.to_scipy_sparse_array(g, nodelist=range(n), weight=None, format="csr")
    labels = np.array([0 if g.nodes[v]["club"] == "Mr. Hi" else 1 for v in range(n)], np.int64)
    mask = _split(labels, 0.5, np.random.default_rng(0))
    return GraphData("karate", sp.csr_matrix(a, dtype=np.float32), np.eye(n, dtype=np.float32),
                     labels, mask)


@lru_cache(maxsize=4)
def sbm_graph(n_nodes: int = 10_000, n_classes: int = 4, community: int = 32,
              degree_in: float = 6.0, degree_out: float = 1.0, homophily: float = 0.8,
              n_features: int = 32, noise: float = 6.0, seed: int = 0) -> GraphData:
    """A seeded stochastic block model with many small communities.

    Nodes are grouped into consecutive communities of ``community`` nodes (community ``k`` has
    class ``k % n_classes``); each node has about ``degree_in`` neighbours inside its community
    and ``degree_out`` outside, a fraction ``homophily`` of those in a community of its class.
    Features are the class mean (a random unit-scale vector) plus Gaussian noise of std
    ``noise``, so a single node is hard to classify and aggregation helps.
    """
    check_positive(n_nodes=n_nodes, n_classes=n_classes, community=community,
                   n_features=n_features)
    rng = np.random.default_rng([seed, n_nodes])
    comm = np.arange(n_nodes) // community
    labels = (comm % n_classes).astype(np.int64)
    # Inside communities: each pair with probability degree_in / (community - 1).
    p_in = min(1.0, degree_in / max(1, community - 1))
    src, dst = [], []
    starts = np.arange(0, n_nodes, community)
    iu = np.triu_indices(community, 1)
    draws = rng.random((len(starts), len(iu[0]))) < p_in
    for k, s in enumerate(starts):
        keep = draws[k] & (s + iu[1] < n_nodes)
        src.append(s + iu[0][keep])
        dst.append(s + iu[1][keep])
    # Between communities: n * degree_out / 2 edges, mostly to a node of the same class.
    m = int(n_nodes * degree_out / 2)
    u = rng.integers(0, n_nodes, m)
    by_class = [np.flatnonzero(labels == c) for c in range(n_classes)]
    same = rng.random(m) < homophily
    v = rng.integers(0, n_nodes, m)
    for c in range(n_classes):
        sel = same & (labels[u] == c)
        v[sel] = by_class[c][rng.integers(0, len(by_class[c]), int(sel.sum()))]
    ok = comm[u] != comm[v]
    src.append(u[ok])
    dst.append(v[ok])
    s, d = np.concatenate(src), np.concatenate(dst)
    a = sp.coo_matrix((np.ones(len(s), np.float32), (s, d)), shape=(n_nodes, n_nodes)).tocsr()
    a = ((a + a.T) > 0).astype(np.float32).tocsr()
    a.setdiag(0)
    a.eliminate_zeros()
    means = rng.standard_normal((n_classes, n_features))
    x = means[labels] + noise * rng.standard_normal((n_nodes, n_features))
    mask = _split(labels, 0.1, rng)
    return GraphData(f"sbm{n_nodes}", a.tocsr(), x.astype(np.float32), labels, mask)


def get_graph(graph: str | GraphData) -> GraphData:
    """``"karate"``, ``"sbm"`` (10,000 nodes) or a :class:`GraphData` itself."""
    if isinstance(graph, GraphData):
        return graph
    if graph == "karate":
        return karate_graph()
    if graph == "sbm":
        return sbm_graph()
    raise ModelError(f"unknown graph {graph!r}: use 'karate', 'sbm' or a GraphData")


# ------------------------------------------------------------------------------------------
# Propagation matrices

def gcn_adjacency(a: sp.spmatrix) -> sp.csr_matrix:
    """``D^-1/2 (A + I) D^-1/2`` with D the degrees of A + I."""
    a_hat = sp.csr_matrix(a, dtype=np.float64) + sp.identity(a.shape[0], format="csr")
    d = np.asarray(a_hat.sum(axis=1)).ravel() ** -0.5
    return sp.csr_matrix(sp.diags(d) @ a_hat @ sp.diags(d), dtype=np.float32)


def gin_adjacency(a: sp.spmatrix, eps: float = 0.0) -> sp.csr_matrix:
    """``A + (1 + eps) I``: the GIN sum aggregation including the node itself."""
    return sp.csr_matrix(sp.csr_matrix(a, dtype=np.float32)
                         + (1.0 + eps) * sp.identity(a.shape[0], format="csr",
                                                     dtype=np.float32))


def sample_neighbors(a: sp.spmatrix, fanout: int, seed: int = 0) -> np.ndarray:
    """[N, fanout] int64: per node, ``fanout`` neighbours drawn uniformly with replacement
    (a node without neighbours samples itself)."""
    check_positive(fanout=fanout)
    a = sp.csr_matrix(a)
    rng = np.random.default_rng([seed, fanout])
    deg = np.diff(a.indptr)
    pick = (rng.random((a.shape[0], fanout)) * np.maximum(deg, 1)[:, None]).astype(np.int64)
    idx = a.indices[np.minimum(a.indptr[:-1, None] + pick, len(a.indices) - 1)]
    idx = np.where(deg[:, None] > 0, idx, np.arange(a.shape[0])[:, None])
    return idx.astype(np.int64)


def mean_matrix(nbr: np.ndarray) -> sp.csr_matrix:
    """The sampled-mean aggregation as a sparse [N, N] matrix (row v averages rows nbr[v])."""
    n, s = nbr.shape
    rows = np.repeat(np.arange(n), s)
    return sp.csr_matrix((np.full(n * s, 1.0 / s, np.float32), (rows, nbr.ravel())),
                         shape=(n, n))


# ------------------------------------------------------------------------------------------
# numpy models and training

def init_params(kind: str, n_in: int, hidden: int, n_classes: int, seed: int = 0) -> Params:
    """Seeded He-init parameters of a two-layer GCN / SAGE / GIN."""
    rng = np.random.default_rng([seed, zlib.crc32(kind.encode())])
    z = np.zeros
    if kind == "gcn":
        return {"gc1.weight": he_normal(rng, n_in, (n_in, hidden)), "gc1.bias": z(hidden, "f4"),
                "gc2.weight": he_normal(rng, hidden, (hidden, n_classes), 1.0),
                "gc2.bias": z(n_classes, "f4")}
    if kind == "sage":
        return {"sage1.weight": he_normal(rng, 2 * n_in, (2 * n_in, hidden)),
                "sage1.bias": z(hidden, "f4"),
                "sage2.weight": he_normal(rng, 2 * hidden, (2 * hidden, n_classes), 1.0),
                "sage2.bias": z(n_classes, "f4")}
    if kind == "gin":
        p: Params = {}
        dims = [n_in, hidden]
        for layer in (1, 2):
            f_in = dims[layer - 1]
            p[f"gin{layer}.mlp0.weight"] = he_normal(rng, f_in, (f_in, hidden))
            p[f"gin{layer}.mlp0.bias"] = z(hidden, "f4")
            p[f"gin{layer}.mlp1.weight"] = he_normal(rng, hidden, (hidden, hidden))
            p[f"gin{layer}.mlp1.bias"] = z(hidden, "f4")
        p["head.weight"] = he_normal(rng, hidden, (hidden, n_classes), 1.0)
        p["head.bias"] = z(n_classes, "f4")
        return p
    raise ModelError(f"unknown GNN kind {kind!r}: use 'gcn', 'sage' or 'gin'")


def _forward(kind: str, p: Params, x: np.ndarray, props: list[sp.spmatrix],
             cache: dict | None = None) -> np.ndarray:
    """numpy forward with sparse propagation matrices (GCN: [A_hat], SAGE: [M1, M2],
    GIN: [A + I])."""
    c: dict = {} if cache is None else cache
    if kind == "gcn":
        a = props[0]
        c["z1"] = a @ (x @ p["gc1.weight"]) + p["gc1.bias"]
        c["h"] = np.maximum(c["z1"], 0)
        return a @ (c["h"] @ p["gc2.weight"]) + p["gc2.bias"]
    if kind == "sage":
        m1, m2 = props
        c["c1"] = np.concatenate([x, m1 @ x], axis=1)
        c["z1"] = c["c1"] @ p["sage1.weight"] + p["sage1.bias"]
        c["h"] = np.maximum(c["z1"], 0)
        c["c2"] = np.concatenate([c["h"], m2 @ c["h"]], axis=1)
        return c["c2"] @ p["sage2.weight"] + p["sage2.bias"]
    if kind == "gin":
        a = props[0]
        h = x
        for layer in (1, 2):
            agg = a @ h
            z0 = agg @ p[f"gin{layer}.mlp0.weight"] + p[f"gin{layer}.mlp0.bias"]
            u = np.maximum(z0, 0)
            z1 = u @ p[f"gin{layer}.mlp1.weight"] + p[f"gin{layer}.mlp1.bias"]
            c[layer] = (agg, z0, u, z1)
            h = np.maximum(z1, 0)
        c["h"] = h
        return h @ p["head.weight"] + p["head.bias"]
    raise ModelError(f"unknown GNN kind {kind!r}")


def _backward(kind: str, p: Params, x: np.ndarray, props: list[sp.spmatrix], c: dict,
              dout: np.ndarray) -> Params:
    g: Params = {}
    if kind == "gcn":
        a = props[0]
        dhw = a.T @ dout
        g["gc2.weight"], g["gc2.bias"] = c["h"].T @ dhw, dout.sum(0)
        dz1 = (dhw @ p["gc2.weight"].T) * (c["z1"] > 0)
        g["gc1.bias"] = dz1.sum(0)
        g["gc1.weight"] = x.T @ (a.T @ dz1)
    elif kind == "sage":
        m1, m2 = props
        g["sage2.weight"], g["sage2.bias"] = c["c2"].T @ dout, dout.sum(0)
        dc2 = dout @ p["sage2.weight"].T
        f = c["h"].shape[1]
        dh = dc2[:, :f] + m2.T @ dc2[:, f:]
        dz1 = dh * (c["z1"] > 0)
        g["sage1.weight"], g["sage1.bias"] = c["c1"].T @ dz1, dz1.sum(0)
    elif kind == "gin":
        a = props[0]
        g["head.weight"], g["head.bias"] = c["h"].T @ dout, dout.sum(0)
        dh = dout @ p["head.weight"].T
        for layer in (2, 1):
            agg, z0, u, z1 = c[layer]
            dz1 = dh * (z1 > 0)
            g[f"gin{layer}.mlp1.weight"], g[f"gin{layer}.mlp1.bias"] = u.T @ dz1, dz1.sum(0)
            dz0 = (dz1 @ p[f"gin{layer}.mlp1.weight"].T) * (z0 > 0)
            g[f"gin{layer}.mlp0.weight"], g[f"gin{layer}.mlp0.bias"] = agg.T @ dz0, dz0.sum(0)
            if layer == 2:
                dh = a.T @ (dz0 @ p[f"gin{layer}.mlp0.weight"].T)
    return g


def propagation(kind: str, data: GraphData, fanouts: tuple[int, ...] = FANOUTS,
                seed: int = 0) -> tuple[list[sp.csr_matrix], list[np.ndarray]]:
    """The propagation matrices of ``kind`` on ``data`` and (SAGE) the sampled indices."""
    if kind == "gcn":
        return [gcn_adjacency(data.adjacency)], []
    if kind == "gin":
        return [gin_adjacency(data.adjacency)], []
    if kind == "sage":
        nbrs = [sample_neighbors(data.adjacency, f, seed + k) for k, f in enumerate(fanouts)]
        return [mean_matrix(n) for n in nbrs], nbrs
    raise ModelError(f"unknown GNN kind {kind!r}")


def gnn_forward(kind: str, p: Params, data: GraphData, fanouts: tuple[int, ...] = FANOUTS,
                seed: int = 0) -> np.ndarray:
    """Float logits [N, classes] of a GNN on its graph (numpy, sparse propagation)."""
    props, _ = propagation(kind, data, fanouts, seed)
    return _forward(kind, p, data.features, props)


@lru_cache(maxsize=16)
@single_threaded
def _trained(kind: str, graph: str, hidden: int, steps: int, seed: int) -> Params:
    data = get_graph(graph)
    props, _ = propagation(kind, data, FANOUTS, seed)
    p = init_params(kind, data.features.shape[1], hidden, data.n_classes, seed)
    opt = Adam(p, lr=0.01, weight_decay=5e-4)
    for _ in range(steps):
        cache: dict = {}
        logits = _forward(kind, p, data.features, props, cache)
        _, dout = cross_entropy(logits, data.labels, data.train_mask)
        opt.step(_backward(kind, p, data.features, props, cache, dout))
    return p


def train_gnn(kind: str, graph: str = "karate", hidden: int = 16, steps: int = 200,
              seed: int = 0) -> Params:
    """Train a GNN full-batch on the training nodes of ``graph`` (cached; about a second)."""
    if graph not in ("karate", "sbm"):
        raise ModelError(f"train_gnn trains on 'karate' or 'sbm', got {graph!r}")
    return {k: v.copy() for k, v in _trained(kind, graph, hidden, steps, seed).items()}


def gnn_accuracy(kind: str, p: Params, graph: str | GraphData = "karate"
                 ) -> dict[str, float]:
    """Float accuracy on the train nodes, the test nodes and all nodes."""
    data = get_graph(graph)
    logits = gnn_forward(kind, p, data)
    m = data.train_mask
    return {"train": accuracy(logits[m], data.labels[m]),
            "test": accuracy(logits[~m], data.labels[~m]),
            "all": accuracy(logits, data.labels)}


# ------------------------------------------------------------------------------------------
# ONNX builders

def _adjacency_const(g: GraphBuilder, hint: str, a: sp.spmatrix, sparse: bool | None) -> str:
    if sparse is None:
        sparse = a.shape[0] > DENSE_LIMIT
    if sparse:
        return g.sparse_const(hint, a)
    return g.const(hint, np.asarray(a.toarray(), np.float32))


def _params(kind: str, data: GraphData, graph: str | GraphData, hidden: int,
            trained: bool | None, seed: int, params: Params | None) -> Params:
    """Given parameters, trained ones (default on karate) or seeded He init (default on the
    synthetic graph, where training takes tens of seconds)."""
    if params is not None:
        return params
    if trained is None:
        trained = graph == "karate"
    if trained and isinstance(graph, str):
        return train_gnn(kind, graph, hidden, seed=seed)
    return init_params(kind, data.features.shape[1], hidden, data.n_classes, seed)


def gcn(graph: str | GraphData = "karate", hidden: int = 16, trained: bool | None = None,
        seed: int = 0, params: Params | None = None, sparse: bool | None = None
        ) -> onnx.ModelProto:
    """Two-layer GCN with the normalised adjacency as a constant (see the module docstring).

    Input ``x`` [N, F]; output ``logits`` [N, classes]. ``sparse`` forces the adjacency
    storage (default: sparse above :data:`DENSE_LIMIT` nodes).
    """
    data = get_graph(graph)
    p = _params("gcn", data, graph, hidden, trained, seed, params)
    g = GraphBuilder(f"gcn_{data.name}")
    x = g.input("x", [data.n_nodes, data.features.shape[1]])
    a = _adjacency_const(g, "a_hat", gcn_adjacency(data.adjacency), sparse)
    h = g.node("MatMul", [x, g.const("gc1.weight", p["gc1.weight"])], "gc1.xw")
    h = g.node("Add", [g.node("MatMul", [a, h], "gc1.agg"), g.const("gc1.bias", p["gc1.bias"])],
               "gc1.out")
    h = g.node("Relu", [h], "gc1.relu")
    h = g.node("MatMul", [h, g.const("gc2.weight", p["gc2.weight"])], "gc2.xw")
    g.node("Add", [g.node("MatMul", [a, h], "gc2.agg"), g.const("gc2.bias", p["gc2.bias"])],
           out="logits")
    g.output("logits", [data.n_nodes, data.n_classes])
    return g.build(f"GCN on {data.name}: {data.n_nodes} nodes, {data.n_edges} edges")


def graphsage(graph: str | GraphData = "karate", hidden: int = 16,
              fanouts: tuple[int, int] = FANOUTS, trained: bool | None = None, seed: int = 0,
              params: Params | None = None, neighbors: str = "input") -> onnx.ModelProto:
    """Two-layer GraphSAGE-mean over sampled neighbours fetched with Gather.

    Inputs ``x`` [N, F] and, with ``neighbors="input"``, ``nbr1`` [N, fanouts[0]] and ``nbr2``
    [N, fanouts[1]] (int64 node indices, see :func:`sample_neighbors` and
    :func:`sage_neighbors`); with ``neighbors="constant"`` the seeded samples are constants.
    Output ``logits`` [N, classes]. Trained weights are trained on the same seeded samples.
    """
    if neighbors not in ("input", "constant"):
        raise ModelError(f"neighbors must be 'input' or 'constant', got {neighbors!r}")
    if (tuple(fanouts) != FANOUTS and params is None
            and (trained if trained is not None else graph == "karate")):
        raise ModelError(f"trained GraphSAGE uses fanouts {FANOUTS}; pass trained=False")
    data = get_graph(graph)
    p = _params("sage", data, graph, hidden, trained, seed, params)
    g = GraphBuilder(f"graphsage_{data.name}")
    h = g.input("x", [data.n_nodes, data.features.shape[1]])
    for layer, fanout in enumerate(fanouts, start=1):
        if neighbors == "input":
            nbr = g.input(f"nbr{layer}", [data.n_nodes, fanout], onnx.TensorProto.INT64)
        else:
            nbr = g.const(f"nbr{layer}", sample_neighbors(data.adjacency, fanout,
                                                          seed + layer - 1))
        gathered = g.node("Gather", [h, nbr], f"sage{layer}.gather", axis=0)  # [N, S, F]
        mean = g.node("ReduceMean", [gathered], f"sage{layer}.mean", axes=[1], keepdims=0)
        cat = g.node("Concat", [h, mean], f"sage{layer}.cat", axis=1)
        w, b = p[f"sage{layer}.weight"], p[f"sage{layer}.bias"]
        if layer < len(fanouts):
            h = g.node("Relu", [g.gemm(cat, w, b, f"sage{layer}")], f"sage{layer}.relu")
        else:
            g.gemm(cat, w, b, f"sage{layer}", out="logits")
    g.output("logits", [data.n_nodes, data.n_classes])
    return g.build(f"GraphSAGE-mean on {data.name}, fanouts {tuple(fanouts)}")


def sage_neighbors(graph: str | GraphData = "karate", fanouts: tuple[int, int] = FANOUTS,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """The seeded neighbour samples as GraphSAGE feeds: ``{"nbr1": ..., "nbr2": ...}``."""
    data = get_graph(graph)
    return {f"nbr{k + 1}": sample_neighbors(data.adjacency, f, seed + k)
            for k, f in enumerate(fanouts)}


def gin(graph: str | GraphData = "karate", hidden: int = 16, trained: bool | None = None,
        seed: int = 0, params: Params | None = None, sparse: bool | None = None
        ) -> onnx.ModelProto:
    """Two GIN layers (sum aggregation with A + I, then Gemm-Relu-Gemm-Relu) and a Gemm head.

    Input ``x`` [N, F]; output ``logits`` [N, classes].
    """
    data = get_graph(graph)
    p = _params("gin", data, graph, hidden, trained, seed, params)
    g = GraphBuilder(f"gin_{data.name}")
    h = g.input("x", [data.n_nodes, data.features.shape[1]])
    a = _adjacency_const(g, "a_plus_i", gin_adjacency(data.adjacency), sparse)
    for layer in (1, 2):
        h = g.node("MatMul", [a, h], f"gin{layer}.agg")
        for k in (0, 1):
            name = f"gin{layer}.mlp{k}"
            h = g.node("Relu", [g.gemm(h, p[f"{name}.weight"], p[f"{name}.bias"], name)],
                       f"{name}.relu")
    g.gemm(h, p["head.weight"], p["head.bias"], "head", out="logits")
    g.output("logits", [data.n_nodes, data.n_classes])
    return g.build(f"GIN on {data.name}: {data.n_nodes} nodes, {data.n_edges} edges")


def gnn_feeds(kind: str, graph: str | GraphData = "karate", seed: int = 0
              ) -> dict[str, np.ndarray]:
    """The inputs of a GNN built by :func:`gcn` / :func:`graphsage` / :func:`gin`."""
    data = get_graph(graph)
    feeds = {"x": data.features}
    if kind == "sage":
        feeds.update(sage_neighbors(data, FANOUTS, seed))
    return feeds
