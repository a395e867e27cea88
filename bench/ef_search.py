"""HNSW search breadth against recall@1, and the breadth the index measures for itself, at one scale.

The hot index alone (no server): the same clustered synthetic identities as bench/match.py, an HNSW
graph built as the appliance builds it (M 16, efConstruction 40, inner product), then for each
efSearch step: recall@1 per identity of the bench's probes against exact search, and the time per
search on one thread. Beside it, what ``vector.index.tune_ef_search`` picks from the index's own
templates (the default, ``index_hnsw_ef_search`` unset) and the recall the probes get at that breadth.
The graph is cached under var/bench-ef-search/ (its build takes minutes at 1M). Writes
bench/results/ef_search_<n>.json.

Usage: python bench/ef_search.py [--n 1000000] [--queries 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, identities, probes, write_result


def main() -> None:
    import faiss

    from vector.index import EF_STEPS, IndexParams, tune_ef_search

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    args = ap.parse_args()
    params = IndexParams()
    x, ident, centres = identities(args.n)
    q, _ = probes(centres, args.queries)
    faiss.omp_set_num_threads(2)
    _, exact = faiss.knn(q, x, 1, faiss.METRIC_INNER_PRODUCT)
    truth = ident[exact[:, 0]]
    cache = ROOT / "var" / "bench-ef-search" / f"hnsw_{args.n}_m{params.hnsw_m}_efc{params.ef_construction}.faiss"
    started = time.perf_counter()
    if cache.exists():
        index = faiss.read_index(str(cache))
        built = None
    else:
        index = faiss.IndexHNSWFlat(x.shape[1], params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
        index.add(x)
        built = round(time.perf_counter() - started, 1)
        cache.parent.mkdir(parents=True, exist_ok=True)
        faiss.write_index(index, str(cache))
    del x
    subjects = np.zeros((args.n, 16), np.uint8)  # an identity's 16-byte "subject id", as the index stores them
    subjects[:, :8] = ident.astype("<i8").view(np.uint8).reshape(-1, 8)
    started = time.perf_counter()
    chosen, probe_recall = tune_ef_search(index, subjects, params.recall_target)
    tune_s = round(time.perf_counter() - started, 1)
    faiss.omp_set_num_threads(1)
    sweep = []
    for ef in EF_STEPS:
        sp = faiss.SearchParametersHNSW()
        sp.efSearch = ef
        lat = []
        found = np.empty(len(q), np.int64)
        for i, v in enumerate(q):
            t = time.perf_counter()
            _, pos = index.search(v[None, :], 1, params=sp)
            lat.append(time.perf_counter() - t)
            found[i] = pos[0, 0]
        sweep.append({"ef_search": ef, "recall_at_1": round(float(np.mean(ident[found] == truth)), 4),
                      "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 3),
                      "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 3)})
        print(sweep[-1], flush=True)
    result = {"n": args.n, "queries": args.queries, "build_seconds": built, "tune_seconds": tune_s,
              "measured_ef_search": chosen, "measured_probe_recall": probe_recall,
              "bench_recall_at_measured": next(s["recall_at_1"] for s in sweep if s["ef_search"] == chosen),
              "sweep": sweep}
    print(f"measured ef_search {chosen} (its probes: recall {probe_recall}) in {tune_s} s; bench probes at it: "
          f"{result['bench_recall_at_measured']}")
    print(f"-> {write_result(f'ef_search_{args.n}', result)}")


if __name__ == "__main__":
    main()
