"""Time to open a neuron page through ``mambascope serve``, over real HTTP.

    python benchmarks/bench_serve.py DIR [DIR ...] [--lookups 50] [--seed 0]

For each output directory it starts the explorer (``create_app(DIR, live=False)``: no model) under uvicorn on a
free 127.0.0.1 port in a thread, then, with one HTTP client, requests ``/api/neuron/{layer}/{neuron}`` (what the
page fetches when a neuron page opens) for ``--lookups`` random neurons: the first request (cold: the store's
files opened) and the rest (warm), median / p95 / max, and the payload size; also ``GET /`` (the summary page)
and one ``/api/neurons`` search page sorted by frequency.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import uvicorn

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


def bench(directory: Path, lookups: int, seed: int) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--lookups", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for directory in args.dirs:
        bench(directory, args.lookups, args.seed)


if __name__ == "__main__":
    main()
