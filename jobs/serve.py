"""Serve search over an embedded corpus: ``python jobs/serve.py --model RUN --corpus PATH [--index …] [--port 8000]``.

Starts (or joins) Ray, then a Ray Serve application (``vcl_dist.serving.app``): a query encoder
with dynamic batching, a searcher holding the corpus and its index (``jobs/index.py``; the exact
scan without one), and an HTTP API with a web page. Binds to 127.0.0.1 unless ``--host`` says
otherwise; beyond loopback every query needs ``Authorization: Bearer <token>`` (the token from
``VCL_DIST_SERVE_TOKEN`` or ``--token-file``; the page takes it as ``/#token=…``) unless
``--no-auth`` says otherwise, and only the Host names it knows are answered. Runs until Ctrl-C.
The same application deploys from a config file with ``serve run jobs/configs/serve.yaml`` or
``serve deploy``; running this again with another ``--model``/``--corpus`` against the same
cluster swaps them in (Serve's rolling update).

    GET  /search?text=a+red+circle&k=12     POST /search?k=12  (an image as the body)
    GET  /similar?key=<row key>&k=12        GET  /healthz      GET /  (the web page)
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export, checkpoint or run folder (local or s3://)")
    parser.add_argument("--corpus", required=True, help="the folder or s3:// prefix jobs/embed.py wrote")
    parser.add_argument("--index", default="corpus",
                        help="'corpus': the corpus's own index if built (default); a folder; 'none': the exact scan")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token-file", help="a file holding the bearer token (default: the VCL_DIST_SERVE_TOKEN variable)")
    parser.add_argument("--no-auth", action="store_true", help="serve beyond loopback without a token (prints a warning)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="a Host name clients use to reach this server (repeatable; '*': any)")
    parser.add_argument("--no-batching", action="store_true", help="embed each query alone (no dynamic batching)")
    parser.add_argument("--name", default="vcl-dist", help="the Serve application's name (default: %(default)s)")
    parser.add_argument("--detach", action="store_true", help="return once the app is up (it keeps running in Ray)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vcl_dist.runtime.console import run_job

    return run_job(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    import time

    from ray import serve

    from vcl_dist.ray_cluster import connect_ray
    from vcl_dist.runtime.console import say, warn
    from vcl_dist.serving.access import read_token, resolve_access
    from vcl_dist.serving.app import build_app

    if not 0 < args.port < 65536:
        raise ValueError("--port must be between 1 and 65535")
    policy, warning = resolve_access(args.host, read_token(args.token_file), args.no_auth, args.allowed_host)
    if warning:
        warn(warning)
    # Ray first: build_app gives the encoder a GPU when the cluster it is connected to has one.
    say(connect_ray(2))
    app = build_app({"model": args.model, "corpus": args.corpus, "index": None if args.index == "none" else args.index,
                     "batching": not args.no_batching, "auth_token_sha256": policy.token_sha256,
                     "allowed_hosts": list(policy.allowed_hosts)})
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name=args.name, route_prefix="/")
    page = f"http://{args.host}:{args.port}/" + ("#token=<your token>" if policy.token_sha256 else "")
    say(f"serving {args.corpus} with {args.model} at {page} (/search?text=…, /healthz; "
          f"{'a bearer token required, ' if policy.token_sha256 else ''}Ctrl-C stops)")
    if args.detach:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(args.name)
        say("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
