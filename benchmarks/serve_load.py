"""The search application under a bounded load: throughput and latency of text queries over
HTTP on loopback, with and without dynamic batching.

    python benchmarks/serve_load.py --model RUN --corpus CORPUS [--clients 16] [--seconds 20]

``RUN`` and ``CORPUS``: a trained run and its embedded corpus, e.g. the built-in default's
(``python jobs/train.py run.name=serve-bench`` then ``python jobs/embed.py --model
runs/serve-bench --out corpora/serve-bench``). The app runs on a local Ray Serve instance
(bound to 127.0.0.1) as ``jobs/serve.py`` starts it; ``--clients`` threads send
``GET /search?text=…&k=10`` back to back for ``--seconds`` (after a warm-up), each query a
different caption. Prints requests/s and p50 / p99 latency for each setting, and how many
requests failed (none should).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
import urllib.parse
import urllib.request


def load(url: str, clients: int, seconds: float, path: str = "search") -> tuple[list[float], int]:
    latencies: list[float] = []
    failures = [0]
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def client(number: int) -> None:
        count = 0
        while time.monotonic() < stop:
            text = f"a photo of a shape number {number}-{count}"
            started = time.perf_counter()
            try:
                query = "?" + urllib.parse.urlencode({"text": text, "k": 10}) if path == "search" else ""
                with urllib.request.urlopen(f"{url}/{path}{query}", timeout=60) as r:
                    r.read()
                    ok = r.status == 200
            except OSError:
                ok = False
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures[0] += 1
            count += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, failures[0]


def row(setting: str, latencies: list[float], failures: int, seconds: float) -> tuple[str, ...]:
    latencies = sorted(latencies)
    return (setting, f"{len(latencies) / seconds:.1f}", f"{1000 * statistics.median(latencies):.0f} ms",
            f"{1000 * latencies[max(0, int(0.99 * len(latencies)) - 1)]:.0f} ms", str(failures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()

    import ray
    from ray import serve

    from vcl_dist.serving.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    rows = []
    for batching in (True, False):
        serve.run(build_app({"model": args.model, "corpus": args.corpus, "batching": batching}), name="bench", route_prefix="/")
        load(url, args.clients, 3)  # warm-up
        latencies, failures = load(url, args.clients, args.seconds)
        rows.append(row(f"text queries, dynamic batching {'on (up to 32, 5 ms)' if batching else 'off'}", latencies,
                        failures, args.seconds))
        single, failures = load(url, 1, args.seconds / 2)
        rows.append(row("  the same, one client at a time", single, failures, args.seconds / 2))
    # The floor of the HTTP path itself: the proxy, the ingress and one call to the searcher, no model.
    floor, failures = load(url, args.clients, args.seconds, path="healthz")
    rows.append(row("GET /healthz (proxy + ingress + one replica call)", floor, failures, args.seconds))
    serve.shutdown()
    ray.shutdown()
    header = ("setting", "requests/s", "p50", "p99", "failed")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{args.clients} concurrent clients for {args.seconds:g} s each (unless said), k=10, loopback")
    for cells in [header, *rows]:
        print(" | ".join(cell.ljust(width) for cell, width in zip(cells, widths)))


if __name__ == "__main__":
    main()
