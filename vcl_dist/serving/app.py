"""Retrieval as a service: a Ray Serve application over a trained model and an embedded corpus.

Three deployments:

- ``QueryEncoder`` embeds queries with dynamic batching (``@serve.batch``: concurrent text
  queries run through the text tower together; images likewise after each is decoded and
  checked alone, so one bad image fails only its own request). One GPU per replica on a
  cluster with GPUs.
- ``Searcher`` holds the corpus and its index (``jobs/index.py``; the exact scan without one).
- ``SearchApi`` is the HTTP ingress (FastAPI): ``GET /search?text=…&k=…``, ``POST /search``
  with an image as the body, ``GET /similar?key=…`` ("more like this": the row's own image
  embedding as the query), ``GET /healthz``, and the web page at ``/``.

Every request is bounded (``ServeLimits``: text length, ``k``, body size, image pixels checked
from the header before decoding, uploads decoded at once); a bad one gets a 4xx with
``{"error": "<one line>"}``, an overloaded server a 503 (Serve's queues are bounded too), and
nothing returns a traceback. Access: a bearer token and a Host allow-list
(`vcl_dist.serving.access`).

``build_app(args)`` is an application builder, as ``serve run`` / ``serve deploy`` config files
expect (``import_path: vcl_dist.serving.app:build_app`` with ``args: {model: …, corpus: …}``);
``jobs/serve.py`` runs it from the command line. Deploying it again under the same name with a
new model and corpus swaps them in with Serve's rolling update: the new replicas start before
the old ones stop, so no request is dropped.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations in the
# replicas, where a class made inside a function and shipped by cloudpickle keeps only the
# globals its code uses — a string "Request" would not resolve there and would become a
# required query parameter.
import asyncio
import base64
from typing import Literal

import numpy as np
from fastapi import Query, Request
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from ..runtime.console import one_line
from .access import LOOPBACK_NAMES, AccessPolicy, read_token, token_digest
from .page import PAGE


class ServeLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_k: int = Field(100, ge=1, le=10_000)
    max_text_chars: int = Field(1000, ge=1)
    max_body_bytes: int = Field(10 * 2**20, ge=1024)
    max_image_pixels: int = Field(25_000_000, ge=1, description="width × height of an uploaded image, read from its "
                                  "header before anything is decoded")
    max_concurrent_decodes: int = Field(2, ge=1, description="uploads an encoder replica decodes at once (each costs "
                                        "up to ~6 bytes per pixel while it decodes)")
    max_waiting_uploads: int = Field(8, ge=0, description="uploads that may wait for a decode; more are answered 503")


class ServeArgs(BaseModel):
    """What ``build_app`` takes (a ``serve`` config file's ``args``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="export, checkpoint or run folder (local or s3://)")
    corpus: str = Field(description="the folder jobs/embed.py wrote (local or s3://)")
    index: str | None = Field("corpus", description="'corpus': the corpus's own index when it has one; a folder; "
                              "null: the exact scan")
    target: Literal["image", "text"] = "image"
    use_gpu: bool | Literal["auto"] = "auto"
    batching: bool = Field(True, description="dynamic batching of concurrent queries")
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    limits: ServeLimits = ServeLimits()
    s3_endpoint_url: str | None = None
    auth_token_sha256: str | None = Field(None, description="SHA-256 of the bearer token (jobs/serve.py sets it); "
                                          "else the token is read from auth_token_file or VCL_DIST_SERVE_TOKEN")
    auth_token_file: str | None = None
    allowed_hosts: list[str] = Field(list(LOOPBACK_NAMES), description="Host header names answered ('*': any); "
                                     "add the names clients use when binding beyond loopback")


class RequestError(ValueError):
    """A request this app cannot answer; ``status`` is its HTTP status (4xx)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# Enough requests in flight per replica for a batch to fill (Serve's default is 5); the queue
# behind them is bounded, so an overload is answered 503 instead of growing without end.
@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64, max_queued_requests=256)
class QueryEncoder:
    def __init__(self, model: str, use_gpu: bool, batching: bool, max_batch_size: int, batch_wait_timeout_s: float,
                 limits: ServeLimits, s3_endpoint_url: str | None = None):
        from ..config import S3Config
        from ..retrieval.model import load_model

        self.model = load_model(model, "cuda" if use_gpu else "cpu", S3Config(endpoint_url=s3_endpoint_url))
        self.limits = limits
        self.decoding = asyncio.Semaphore(limits.max_concurrent_decodes)
        self.waiting = 0
        size = max_batch_size if batching else 1
        for method in (self.encode_text, self.encode_pixels):
            method.set_max_batch_size(size)
            method.set_batch_wait_timeout_s(batch_wait_timeout_s if batching else 0.0)

    def describe(self) -> dict:
        return {"embed_dim": self.model.embed_dim, "normalized": self.model.normalized,
                "class_names": self.model.class_names or []}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def encode_text(self, texts: list[str]) -> list[np.ndarray]:
        return list(self.model.encode_texts(texts).numpy())

    async def pixels(self, data: bytes) -> np.ndarray:
        """An uploaded image, checked and prepared as the model's evaluation prepares pictures.

        The header is read first (format and pixel count, nothing decoded); at most
        ``max_concurrent_decodes`` uploads then decode at once, each in a thread, and at most
        ``max_waiting_uploads`` wait for their turn.

        Raises:
            RequestError: no readable image (415), too many pixels (413), too many uploads (503).
        """
        from ..data.images import UnusableImageError, image_size

        try:
            image_size(data, self.limits.max_image_pixels)
        except UnusableImageError as err:
            if err.reason == "image too large":
                raise RequestError(f"{err}: uploads may have at most {self.limits.max_image_pixels} pixels "
                                   "(limits.max_image_pixels)", 413) from None
            raise RequestError(f"the body is not an image this service can read (JPEG, PNG, WebP, GIF, BMP or TIFF): "
                               f"{err}", 415) from None
        if self.decoding.locked() and self.waiting >= self.limits.max_waiting_uploads:
            raise RequestError(f"busy: {self.limits.max_concurrent_decodes} uploads are being decoded and "
                               f"{self.waiting} wait; try again shortly", 503)
        self.waiting += 1
        try:
            await self.decoding.acquire()
        finally:
            self.waiting -= 1
        try:
            return await asyncio.to_thread(self.model._pixels, data)
        except ValueError as err:
            raise RequestError(str(err), 415) from None
        finally:
            self.decoding.release()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def encode_pixels(self, images: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        return list(self.model.encode_pixels(torch.from_numpy(np.stack(images))).numpy())


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32, max_queued_requests=256)
class Searcher:
    def __init__(self, corpus: str, index: str | None, target: str, s3_endpoint_url: str | None = None):
        from ..config import S3Config
        from ..retrieval.ann_index import LoadedIndex, index_folder
        from ..retrieval.search import Corpus
        from ..storage import exists

        self.corpus = Corpus(corpus, S3Config(endpoint_url=s3_endpoint_url))
        self.target = target
        self.index = None
        if index == "corpus":
            if exists(self.corpus.filesystem, f"{index_folder(self.corpus, target)}/index.json"):
                self.index = LoadedIndex(self.corpus, target)
        elif index:
            self.index = LoadedIndex(self.corpus, target, folder=index)
        self.normalized = bool(self.corpus.info.get("normalized", True))
        # "More like this" finds its row here, not by scanning the key column per request.
        keys = self.corpus.dataset.to_table(columns=["key"]).column("key").to_pylist()
        self.row_of_key = {key: row for row, key in enumerate(keys)}
        self.rows = len(keys)

    def describe(self) -> dict:
        """What the corpus is, without where it lies (``/healthz`` is public)."""
        return {"rows": self.rows, "embed_dim": self.corpus.embed_dim,
                "index": self.index.description if self.index is not None else f"exact scan of {self.rows} rows"}

    def search(self, query: np.ndarray, k: int) -> list[dict]:
        import torch

        from ..evaluate import similarity

        def rank(queries, items):
            return similarity(queries, items, self.normalized)

        query = np.asarray(query, dtype=np.float32)
        if not np.isfinite(query).all():
            raise RequestError("the model made a NaN or infinite embedding of this query: it cannot be searched", 422)
        hits = self.corpus.search(torch.from_numpy(query), rank, target=self.target, k=k, index=self.index)
        # A NaN row in the corpus scores NaN, which JSON cannot carry: such rows are never answers.
        return [{"rank": h.rank, "score": h.score, "key": h.key, "caption": h.caption, "label": h.label,
                 "thumbnail": "data:image/jpeg;base64," + base64.b64encode(h.thumbnail).decode() if h.thumbnail else ""}
                for h in hits if np.isfinite(h.score)]

    def image_embedding(self, key: str) -> np.ndarray:
        """The image embedding of the row ``key`` ("more like this").

        Raises:
            RequestError: no row has that key (404).
        """
        from ..retrieval.search import fixed_size_lists_to_numpy

        row = self.row_of_key.get(key)
        if row is None:
            raise RequestError(f"no item with key {key[:100]!r} in the corpus", 404)
        table = self.corpus.dataset.take([row], columns=["image_embedding"])
        return fixed_size_lists_to_numpy(table.column(0))[0]


def _fastapi_app(policy: AccessPolicy):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from ray.serve.exceptions import BackPressureError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="vcl-dist search", docs_url=None, redoc_url=None, openapi_url="/openapi.json")

    def error(status: int, message: str) -> JSONResponse:
        headers = {"Retry-After": "1"} if status == 503 else {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": one_line(message, 300)}, status_code=status, headers=headers)

    @app.middleware("http")
    async def access(request: Request, call_next):
        refused = policy.refusal(request.url.path, request.headers.get("host"), request.headers.get("authorization"))
        return error(*refused) if refused else await call_next(request)

    @app.exception_handler(BackPressureError)
    async def overloaded(_: Request, err: BackPressureError):  # a deployment's queue is full
        return error(503, "the server is overloaded: try again shortly")

    @app.exception_handler(RequestError)
    async def request_error(_: Request, err: RequestError):
        # Raised in another deployment, it arrives wrapped (a RayTaskError that is also a
        # RequestError, whose text holds the remote traceback): answer with the cause's line.
        cause = getattr(err, "cause", None) or err
        return error(getattr(cause, "status", 400), cause.args[0] if cause.args else "bad request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException):  # unknown paths, wrong methods
        return error(err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError):
        first = err.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("query", "body"))
        return error(422, f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid request"))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception):  # never a traceback to the client (the replica's log has it)
        if isinstance(getattr(err, "cause", None), BackPressureError):
            return error(503, "the server is overloaded: try again shortly")
        return error(500, f"internal error ({type(err).__name__})")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE

    return app


def _check_k(k: int, limits: ServeLimits) -> int:
    if not 1 <= k <= limits.max_k:
        raise RequestError(f"k must be between 1 and {limits.max_k}, got {k}", 422)
    return k


def build_app(args: dict):
    """The application (``serve run vcl_dist.serving.app:build_app model=… corpus=…``).

    Raises:
        ValueError: bad arguments (one line).
    """
    import ray
    from pydantic import ValidationError

    try:
        config = ServeArgs.model_validate(args)
    except ValidationError as err:
        first = err.errors()[0]
        raise ValueError(f"serve args: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    # A model or corpus that cannot be used stops here, in one line, not in replicas that Serve
    # would restart again and again (or at the first request).
    from ..config import S3Config
    from ..retrieval.model import load_model
    from ..retrieval.search import Corpus

    s3 = S3Config(endpoint_url=config.s3_endpoint_url)
    load_model(config.model, "cpu", s3)
    Corpus(config.corpus, s3)
    gpu = config.use_gpu if config.use_gpu != "auto" else (ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1)
    encoder = QueryEncoder.options(ray_actor_options={"num_cpus": 0.5, "num_gpus": 1 if gpu else 0}).bind(
        config.model, bool(gpu), config.batching, config.max_batch_size, config.batch_wait_timeout_s,
        config.limits, config.s3_endpoint_url)
    searcher = Searcher.bind(config.corpus, config.index, config.target, config.s3_endpoint_url)
    # Only the token's digest travels to the replicas.
    digest = config.auth_token_sha256
    if digest is None:
        token = read_token(config.auth_token_file)
        digest = token_digest(token) if token else None
    policy = AccessPolicy(digest, tuple(h.lower() for h in config.allowed_hosts))
    return make_ingress(config.limits, policy).bind(encoder, searcher)


def make_ingress(limits: ServeLimits, policy: AccessPolicy):
    app = _fastapi_app(policy)

    @serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=128, max_queued_requests=512)
    @serve.ingress(app)
    class SearchApi:
        def __init__(self, encoder, searcher):
            self.encoder, self.searcher = encoder, searcher

        async def _answer(self, vector: np.ndarray, k: int, **about) -> dict:
            # The class names come from the model replica of the moment (a rolling update may have
            # swapped it), asked alongside the search rather than after it.
            hits, described = await asyncio.gather(self.searcher.search.remote(vector, k), self.encoder.describe.remote())
            names = described["class_names"]
            for hit in hits:
                hit["class"] = names[hit["label"]] if 0 <= hit["label"] < len(names) else None
            return {**about, "k": k, "hits": hits}

        @app.get("/healthz")
        async def healthz(self) -> dict:
            return {"status": "ok", **(await self.searcher.describe.remote())}

        @app.get("/search")
        async def search_text(self, text: str = Query(..., min_length=1), k: int = 12) -> dict:
            _check_k(k, limits)
            if len(text) > limits.max_text_chars or not text.strip():
                raise RequestError(f"text must be 1 to {limits.max_text_chars} characters, not blank", 422)
            query = await self.encoder.encode_text.remote(text)
            return await self._answer(query, k, query={"text": text})

        @app.post("/search")
        async def search_image(self, request: Request, k: int = 12) -> dict:
            _check_k(k, limits)
            declared = request.headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > limits.max_body_bytes):
                raise RequestError(f"the body is larger than {limits.max_body_bytes} bytes", 413)
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > limits.max_body_bytes:
                    raise RequestError(f"the body is larger than {limits.max_body_bytes} bytes", 413)
            if not body:
                raise RequestError("POST /search needs an image as the request body", 422)
            pixels = await self.encoder.pixels.remote(bytes(body))
            query = await self.encoder.encode_pixels.remote(pixels)
            return await self._answer(query, k, query={"image_bytes": len(body)})

        @app.get("/similar")
        async def similar(self, key: str = Query(..., min_length=1, max_length=1000), k: int = 12) -> dict:
            _check_k(k, limits)
            query = await self.searcher.image_embedding.remote(key)
            return await self._answer(query, k, query={"similar_to": key})

    return SearchApi
