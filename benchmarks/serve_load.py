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

``--scenario hostile``: 32 clients upload a 20-megapixel 16-bit PNG at once (a smooth ramp, a
few hundred KB on the wire). Every answer must be 2xx or 503 (the decode queue is bounded:
``ServeLimits.max_concurrent_decodes`` decoding, ``max_waiting_uploads`` waiting), the query
encoder replica's peak resident memory is sampled every 20 ms and must stay under
``--rss-bound-mb`` above its resting size, and a normal text query must be answered afterwards.
Exits non-zero when a check fails.
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


def deep_ramp_png(width: int, height: int) -> bytes:
    """A 16-bit greyscale PNG of ``width × height`` pixels: a horizontal ramp, which compresses
    to little while decoding to the full size."""
    import io

    import numpy as np
    from PIL import Image

    row = np.linspace(0, 65535, width).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(np.broadcast_to(row, (height, width)).copy()).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


class PeakRss:
    """Samples the resident memory of the processes whose title contains ``title`` (a Serve
    replica's ``ray::ServeReplica:<app>:<deployment>``) until stopped; ``peak`` in bytes."""

    def __init__(self, title: str, every_s: float = 0.02):
        import psutil

        self.processes = [p for p in psutil.process_iter(["cmdline"]) if title in " ".join(p.info["cmdline"] or [])]
        if not self.processes:
            raise SystemExit(f"no process titled {title}")
        self.every_s, self.peak = every_s, self.now()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        return sum(p.memory_info().rss for p in self.processes)

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> "PeakRss":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def hostile(url: str, uploads: int, megapixels: float, rss_bound_mb: float) -> bool:
    """The hostile-upload scenario (module docstring); prints its table, returns whether it passed."""
    import urllib.error

    side = int((megapixels * 1e6) ** 0.5)
    body = deep_ramp_png(side * 5 // 4, side * 4 // 5)
    statuses: list[int] = []
    lock = threading.Lock()

    def upload() -> None:
        request = urllib.request.Request(f"{url}/search?k=5", data=body, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=300) as r:
                r.read()
                status = r.status
        except urllib.error.HTTPError as err:
            status = err.code
        except OSError:
            status = -1  # no answer at all: the replica or the proxy died
        with lock:
            statuses.append(status)

    with PeakRss("ServeReplica:bench:QueryEncoder") as rss:
        resting = rss.peak
        started = time.perf_counter()
        threads = [threading.Thread(target=upload) for _ in range(uploads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
    after, _ = load(url, 1, 2)
    counts = {code: statuses.count(code) for code in sorted(set(statuses))}
    growth_mb = (rss.peak - resting) / 2**20
    ok = all(200 <= code < 300 or code == 503 for code in statuses) and growth_mb < rss_bound_mb and len(after) > 0
    print(f"\n{uploads} concurrent uploads of a {side * 5 // 4}x{side * 4 // 5} 16-bit PNG ({len(body) / 2**10:.0f} KiB), "
          f"all answered in {seconds:.1f} s")
    print(f"answers: {', '.join(f'{n} x {code}' for code, n in counts.items())}")
    print(f"query encoder replica RSS: {resting / 2**20:.0f} MiB resting, {rss.peak / 2**20:.0f} MiB peak "
          f"(+{growth_mb:.0f} MiB; bound +{rss_bound_mb:.0f} MiB)")
    print(f"a text query afterwards: {'answered' if after else 'NOT answered'}")
    print(f"checks {'passed' if ok else 'FAILED'}: every answer 2xx or 503, peak under the bound, the server still answers")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--scenario", choices=["load", "hostile"], default="load")
    parser.add_argument("--uploads", type=int, default=32, help="hostile: concurrent uploads")
    parser.add_argument("--megapixels", type=float, default=20, help="hostile: pixels of each upload")
    parser.add_argument("--rss-bound-mb", type=float, default=600, help="hostile: most the replica may grow")
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
    if args.scenario == "hostile":
        serve.run(build_app({"model": args.model, "corpus": args.corpus}), name="bench", route_prefix="/")
        load(url, 1, 2)  # warm-up
        passed = hostile(url, args.uploads, args.megapixels, args.rss_bound_mb)
        serve.shutdown()
        ray.shutdown()
        raise SystemExit(0 if passed else 1)
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
