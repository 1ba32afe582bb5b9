"""GCN and GIN on the NPU: the constant-adjacency aggregation as a block-sparse matmul.

``python bench/gnn_lowering.py [--nodes 10000] [--config npu16] [--skip-karate]`` compiles the
two-layer GCN and GIN of ``npu.models.gnn`` on karate club (34 nodes) and on the synthetic
block-banded graph (``--nodes`` nodes, communities of 32, adjacency stored as a
``sparse_value`` Constant), runs one inference on the numba engine and prints, per model: total
cycles, MAC utilization of the whole run, int8 agreement with onnxruntime on the same QDQ
model, compile and run wall times, the cycles of the DMA transposes around the aggregations
(0 with the direct lowering; only the transposed fallback has them); and per aggregation layer
(``Y = A X`` with X as the array's weights, or the transposed fallback ``Y^T = X^T A^T``):
all-zero array-sized blocks of A skipped out of the total, the layer's cycles (its share of the
pipelined total), the MACs the array ran (whole 16x16 passes, padding included), its
utilization, and the cycles a dense matmul of the same shape would need at full utilization
(``N^2 F / PEs``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from npu.compiler.session import InferenceSession
from npu.models import checks, gnn


def measure(kind: str, graph: Any, config: str) -> dict[str, Any]:
    """Compile and run one GNN; its figures and per-aggregation-layer rows."""
    data = gnn.get_graph(graph)
    build = {"gcn": gnn.gcn, "gin": gnn.gin}[kind]
    model = build(graph) if isinstance(graph, str) else build(data, sparse=True)
    feeds = gnn.gnn_feeds(kind, data)
    t0 = time.perf_counter()
    sess = InferenceSession(model, config=config, calibration=[feeds])
    t1 = time.perf_counter()
    sess.run(None, feeds)
    t2 = time.perf_counter()
    agreement = checks.int8_agreement(sess, feeds)
    pes = sess.compiled.config.pes
    profs = sess.profiles
    cycles = sum(p.cycles for p in profs)
    regions = {r.label: r for p in profs for r in p.regions}
    layers = []
    for s in sess.compiled.report()["segments"]:
        for layer in s["layers"]:
            skip = layer.get("skipped_blocks")
            name = layer["name"]
            node = sess.graph.node(name)
            agg = node.attrs.get("kind") == "agg"
            if not skip or not (agg or node.attrs.get("transposed")):
                continue
            f, n = (node.plan.f, node.plan.n) if agg else (node.plan.ow, node.plan.cout)
            reg = regions.get(name)
            layers.append({"name": name, "skipped": skip[0], "total": skip[1],
                           "cycles": reg.cycles if reg else 0, "macs": reg.macs if reg else 0,
                           "util": reg.utilization if reg else 0.0,
                           "dense_ideal": n * n * f / pes})
    transposes = sum(r.cycles for k, r in regions.items() if "/transpose_" in k)
    return {"cycles": cycles, "transposes": transposes,
            "util": sum(p.macs for p in profs) / (cycles * pes),
            "identical": agreement.identical, "max_diff": agreement.max_diff,
            "compile_s": t1 - t0, "run_s": t2 - t1, "layers": layers,
            "fallbacks": len(sess.compiled.report()["host_fallbacks"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="npu16")
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--skip-karate", action="store_true")
    args = ap.parse_args(argv)
    graphs: list[Any] = [] if args.skip_karate else ["karate"]
    graphs.append(gnn.sbm_graph(n_nodes=args.nodes))
    for graph in graphs:
        for kind in ("gcn", "gin"):
            gname = graph if isinstance(graph, str) else f"sbm{graph.n_nodes}"
            r = measure(kind, graph, args.config)
            print(f"{kind}_{gname}: {r['cycles']:,d} cycles, utilization "
                  f"{100 * r['util']:.1f}%, host fallbacks {r['fallbacks']}, int8 identical "
                  f"to onnxruntime {100 * r['identical']:.3f}% (max diff {r['max_diff']}), "
                  f"compile {r['compile_s']:.1f} s, run {r['run_s']:.1f} s; the transposes "
                  f"around the aggregations {r['transposes']:,d} cycles")
            for layer in r["layers"]:
                print(f"  {layer['name']:24s} skipped {layer['skipped']:,d}/{layer['total']:,d}"
                      f" blocks ({100 * layer['skipped'] / layer['total']:.1f}%), "
                      f"{layer['cycles']:,d} cycles, {layer['macs']:,d} MACs, utilization "
                      f"{100 * layer['util']:.1f}%, dense ideal {layer['dense_ideal']:,.0f} "
                      f"cycles")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
