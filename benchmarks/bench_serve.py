"""Time to open a neuron page through ``mambascope serve``, over real HTTP.

    python benchmarks/bench_serve.py DIR [DIR ...] [--lookups 50] [--seed 0] [--parallel 64] [--readers [--reps 7]]

For each output directory it starts the explorer (``create_app(DIR, live=False)``: no model) under uvicorn on a
free 127.0.0.1 port in a thread, then, with one HTTP client, requests ``/api/neuron/{layer}/{neuron}`` (what the
page fetches when a neuron page opens) for ``--lookups`` random neurons: the first request (cold: the store's
files opened) and the rest (warm), median / p95 / max, and the payload size; also ``GET /`` (the summary page)
and one ``/api/neurons`` search page sorted by frequency.  ``--parallel K``: the same lookups again, K at a
time (each answer checked equal to the one-at-a-time answer).  ``--readers``: how a layer's detail row group
is read under threads (no server): the store's way (the file opened per read, its footer parsed once) against
one shared ``ParquetFile`` behind a lock, a ``ParquetFile`` per thread, and the file opened with its footer
parsed per read; 1 and 8 threads, interleaved repetitions, median ms per read.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import uvicorn

from mambascope.results.store import ROW_GROUP, NeuronStore
from mambascope.serve import create_app
from mambascope.serve.server import bind, url


def _serve(directory: Path) -> tuple[uvicorn.Server, threading.Thread, str]:
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(directory, live=False), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, url(sock)


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f} ms"


def bench(directory: Path, lookups: int, seed: int, parallel: int) -> None:
    t0 = time.perf_counter()
    server, thread, base = _serve(directory)
    started = time.perf_counter() - t0
    try:
        with httpx.Client(base_url=base, timeout=120) as client:
            sizes = client.get("/api/summary").json()["layers"]
            rng = random.Random(seed)
            picks = [(layer, rng.randrange(sizes[layer])) for layer in rng.choices(sorted(sizes, key=int), k=lookups)]
            times, nbytes = [], []
            for layer, neuron in picks:
                t = time.perf_counter()
                r = client.get(f"/api/neuron/{layer}/{neuron}")
                times.append(time.perf_counter() - t)
                r.raise_for_status()
                nbytes.append(len(r.content))
            if parallel:
                t = time.perf_counter()
                with ThreadPoolExecutor(parallel) as pool:
                    answers = list(pool.map(lambda p: client.get(f"/api/neuron/{p[0]}/{p[1]}"), picks))
                parallel_time = time.perf_counter() - t
                assert all(r.status_code == 200 for r in answers), sorted({r.status_code for r in answers})
            t = time.perf_counter()
            page = client.get("/")
            page_time = time.perf_counter() - t
            t = time.perf_counter()
            client.get("/api/neurons", params={"sort": "frequency", "limit": 50}).raise_for_status()
            search_time = time.perf_counter() - t
    finally:
        server.should_exit = True
        thread.join(30)
    warm = sorted(times[1:])
    print(f"{directory}: {len(sizes)} layers, {sum(sizes.values()):,} neurons; server up in {started:.1f} s")
    print(f"  /api/neuron: first {_ms(times[0])}; warm median {_ms(statistics.median(warm))}, "
          f"p95 {_ms(warm[max(0, int(0.95 * len(warm)) - 1)])}, max {_ms(warm[-1])} over {len(warm)}; "
          f"payload median {statistics.median(nbytes) / 1e3:.1f} kB")
    print(f"  GET /: {_ms(page_time)} ({len(page.content) / 1e6:.2f} MB); /api/neurons sorted page: {_ms(search_time)}")
    if parallel:
        print(f"  /api/neuron, {lookups} lookups {parallel} at a time: {_ms(parallel_time)} in all "
              f"({_ms(parallel_time / lookups)} per lookup; one at a time: {_ms(sum(times) / lookups)})")


def _row(file: pq.ParquetFile, neuron: int) -> pa.Table:
    table = file.read_row_groups([neuron // ROW_GROUP])
    return table.filter(pc.equal(table["neuron"], neuron))


def _readers(store: NeuronStore) -> dict[str, Callable[[int, int], pa.Table]]:
    """(layer, neuron) -> its detail row, four ways."""
    def path(layer: int) -> str:
        return str(store.path / "neurons" / f"layer={layer}" / "part-0.parquet")

    shared = {layer: pq.ParquetFile(path(layer)) for layer in store.layers}
    lock = threading.Lock()
    local = threading.local()

    def locked(layer: int, neuron: int) -> pa.Table:
        with lock:
            return _row(shared[layer], neuron)

    def per_thread(layer: int, neuron: int) -> pa.Table:
        files = local.__dict__.setdefault("files", {})
        if layer not in files:
            files[layer] = pq.ParquetFile(path(layer))
        return _row(files[layer], neuron)

    def per_read(layer: int, neuron: int) -> pa.Table:
        with pq.ParquetFile(path(layer)) as file:
            return _row(file, neuron)

    return {"store (open per read, footer once)": lambda layer, neuron: store.detail(layer, [neuron]),
            "one reader behind a lock": locked, "a reader per thread": per_thread,
            "open per read, footer each time": per_read}


def bench_readers(directory: Path, lookups: int, seed: int, reps: int = 7) -> None:
    store = NeuronStore(directory)
    rng = random.Random(seed)
    picks = [(layer, rng.randrange(store.manifest["n_neurons"][str(layer)]))
             for layer in rng.choices(store.layers, k=max(lookups, 200))]
    readers = _readers(store)
    want = [readers["open per read, footer each time"](*p) for p in picks[:20]]
    times: dict[tuple[str, int], list[float]] = {(name, k): [] for name in readers for k in (1, 8)}
    for name, read in readers.items():
        assert [read(*p) for p in picks[:20]] == want, name
    for _ in range(reps):  # interleaved, so that a change in the machine's load hits every way alike
        for name, read in readers.items():
            for k in (1, 8):
                t = time.perf_counter()
                with ThreadPoolExecutor(k) as pool:
                    list(pool.map(read, *zip(*picks, strict=True)))
                times[(name, k)].append((time.perf_counter() - t) / len(picks))
    print(f"{directory}: detail reads, {len(picks)} random neurons, median of {reps} interleaved repetitions")
    for (name, k), ts in times.items():
        print(f"  {name:36s} {k} thread{'s' if k > 1 else ' '}: {_ms(statistics.median(ts))} per read "
              f"(min {_ms(min(ts))})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--lookups", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=0, help="also the lookups K at a time")
    parser.add_argument("--readers", action="store_true", help="compare ways to read the store under threads")
    parser.add_argument("--reps", type=int, default=7, help="--readers: interleaved repetitions")
    args = parser.parse_args()
    for directory in args.dirs:
        if args.readers:
            bench_readers(directory, args.lookups, args.seed, args.reps)
        else:
            bench(directory, args.lookups, args.seed, args.parallel)


if __name__ == "__main__":
    main()
