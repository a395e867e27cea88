"""Where a worker's memory goes when it warms its index from PostgreSQL, without a server around it.

Against the stack `bench/match.py --n N --direct-load` filled (var/bench-match-<N>-direct), one process
does what an API worker does at a first start without a snapshot: warm the index on a thread of its
own (binary COPY out of PostgreSQL, HNSW build, search breadth measured), write the sealed snapshot on
another thread, then hand the freed heap back (``vector.memory.release_free_heap``, i.e. glibc's
``malloc_trim``). RSS and peak RSS after each step; the index's own size beside them. Writes
bench/results/warm_rss_<n>.json.

Usage: python bench/warm_rss.py [--n 1000000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import MODEL, ROOT, settings_of, start_stack, write_result


def _rss() -> dict[str, float]:
    """VmRSS and VmHWM (peak) of this process, in MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                out[line.split(":")[0]] = round(int(line.split()[1]) / 1024, 1)
    return out


def main() -> None:
    from appliance.matching import IndexService, ServiceConfig
    from appliance.state import AppState
    from vector.memory import release_free_heap

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    args = ap.parse_args()
    if not (ROOT / "var" / f"bench-match-{args.n}-direct").exists():
        raise SystemExit(f"run `bench/match.py --n {args.n} --direct-load` first (it loads the stack)")
    stack = start_stack(f"bench-match-{args.n}-direct")
    settings = settings_of(stack)
    state = AppState.build(settings)
    steps = {"started": _rss()}
    config = ServiceConfig.from_settings(settings)
    config.snapshot_dir = Path(tempfile.mkdtemp(dir=ROOT / "var"))
    service = IndexService(settings, state.pool, state.redis, lambda: state.keys, config)
    started = time.perf_counter()
    mi = ThreadPoolExecutor(1).submit(service.warm, MODEL).result()  # as in the server: a thread of its own
    warm_s = round(time.perf_counter() - started, 1)
    service.models[MODEL] = mi
    steps["warmed from PostgreSQL"] = _rss()
    saver = threading.Thread(target=service.save_snapshots)
    saver.start()
    saver.join()
    steps["snapshot written"] = _rss()
    trimmed = release_free_heap()
    steps["freed heap handed back"] = _rss()
    for f in config.snapshot_dir.glob("*"):
        f.unlink()
    config.snapshot_dir.rmdir()
    state.close()
    result = {"n": args.n, "warm_seconds": warm_s, "index_mb": round(mi.index.memory_bytes() / 2**20, 1),
              "ef_search": mi.index.ef_search, "malloc_trim_released": trimmed, "rss_mb": steps}
    for step, mem in steps.items():
        print(f"{step:>24}: RSS {mem['VmRSS']:>7} MB, peak {mem['VmHWM']:>7} MB")
    print(f"index {result['index_mb']} MB, warm-up {warm_s} s -> {write_result(f'warm_rss_{args.n}', result)}")


if __name__ == "__main__":
    main()
