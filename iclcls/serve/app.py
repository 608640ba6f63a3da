"""The FastAPI application: classify, add classes, list classes, health, metrics, docs, a page.

Requests carry texts and labels only: nothing in a request names a file, a model or a URL
(request models forbid unknown fields). Every error is JSON ``{"error": {"status",
"message"}}`` with the right status: 422 bad body, 413 over a size limit, 401/403 auth,
503 overloaded.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI, Header, Request, Security
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from iclcls.serve.auth import Guard
from iclcls.serve.batcher import MicroBatcher, Overloaded
from iclcls.serve.metrics import Metrics
from iclcls.serve.models import (
    AddClassesRequest,
    AddClassesResponse,
    ClassesResponse,
    ClassifyRequest,
    ClassifyResponse,
    ClassInfo,
    prediction_out,
    top_k_warning,
)
from iclcls.serve.state import AdditionRefused, LiveClassifier
from iclcls.store import StoreError, StoreWriteFailed
from iclcls.store.additions import Addition

log = logging.getLogger("iclcls.serve")

MAX_IDEMPOTENCY_KEY = 200


@dataclass
class ServeSettings:
    """Limits and batching; every field has a CLI flag of the same name."""

    max_texts: int = 64  # texts per classify call
    max_text_chars: int = 2000  # characters per text (and per example, per description)
    max_examples: int = 256  # examples per addition
    max_body_bytes: int = 1_000_000
    batching: bool = True
    batch_wait_ms: float = 5.0
    max_batch: int = 32  # texts per classifier call when batching
    max_queue: int = 1024  # waiting classify requests before 503
    max_classes: int = 10_000  # classes in the state; an addition past it gets 409
    max_pool: int = 200_000  # pool examples in the state; an addition past it gets 409
    min_seq_wait_s: float = 5.0  # how long a classify request with min_seq waits for it before 503


def _too_large(what: str, n: int, limit: int, flag: str) -> HTTPException:
    return HTTPException(413, f"{what}: {n} is over the limit of {limit} ({flag})")


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="iclcls"'} if status == 401 else None
    return JSONResponse({"error": {"status": status, "message": message, **extra}}, status_code=status, headers=headers)


_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def create_app(
    live: LiveClassifier,
    settings: ServeSettings | None = None,
    *,
    api_key: str | None = None,
    admin_key: str | None = None,
    loopback_port: int | None = None,
) -> Any:
    """The ASGI application (FastAPI wrapped in the auth/size/host guard and request metrics).

    ``admin_key`` guards additions and the class listing (default: ``api_key``);
    ``loopback_port`` (the port of a loopback-bound server) turns on the Host header check."""
    s = settings or ServeSettings()
    metrics = Metrics(live)
    batcher = MicroBatcher(
        live.predict,
        enabled=s.batching,
        max_wait_s=s.batch_wait_ms / 1000.0,
        max_batch=s.max_batch,
        max_queue=s.max_queue,
        on_batch=metrics.observe_batch,
    )
    metrics.bind_queue(lambda: batcher.pending)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        batcher.close()
        live.close()

    app = FastAPI(
        title="iclcls",
        summary="In-context-learning classifier with live class addition",
        version="1",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    bearer = HTTPBearer(auto_error=False, description="the classify key (--api-key-env); additions and the class "
                        "list take the admin key (--admin-key-env) when one is set")
    api = APIRouter(dependencies=[Security(bearer)] if api_key or admin_key else [])

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [
            {"field": ".".join(str(x) for x in e.get("loc", ())), "message": e.get("msg", "")} for e in exc.errors()
        ]
        summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
        return _error(422, f"invalid request: {summary}", fields=jsonable_encoder(fields))

    @app.exception_handler(HTTPException)
    async def _http(_req: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return _error(500, f"internal error: {type(exc).__name__}")

    @api.post("/v1/classify", response_model=ClassifyResponse, response_model_exclude_none=True)
    async def classify(req: ClassifyRequest) -> ClassifyResponse:
        """Ranked labels for each text, with scores and their softmax (with ``trace``: the
        candidates, demonstrations and prompt). A text the tokenizer cannot take (a NUL, a lone
        surrogate) gets 422 naming its index, before it reaches a batch with other requests."""
        if len(req.texts) > s.max_texts:
            raise _too_large("texts per request", len(req.texts), s.max_texts, "--max-texts")
        for i, t in enumerate(req.texts):
            if len(t) > s.max_text_chars:
                raise _too_large(f"characters in text {i}", len(t), s.max_text_chars, "--max-text-chars")
        if req.min_seq is not None and live.applied_seq < req.min_seq:
            if not await run_in_threadpool(live.wait_seq, req.min_seq, s.min_seq_wait_s):
                raise HTTPException(503, f"this replica has applied additions up to seq {live.applied_seq}, not yet "
                                    f"{req.min_seq} (waited {s.min_seq_wait_s:g} s, --min-seq-wait-s); retry")
        try:
            preds = await batcher.submit(req.texts)
        except Overloaded as e:
            raise HTTPException(503, f"overloaded: {e}") from None
        warning = top_k_warning(preds, req.top_k, live.shortlist_k)
        return ClassifyResponse(predictions=[prediction_out(p, req.top_k, req.trace) for p in preds],
                                shortlist_k=live.shortlist_k, warnings=[warning] if warning else None)

    @api.post("/v1/classes", response_model=AddClassesResponse)
    async def add_classes(
        req: AddClassesRequest,
        idempotency_key: str | None = Header(
            None, alias="Idempotency-Key", max_length=MAX_IDEMPOTENCY_KEY,
            description="a unique key per addition (e.g. a UUID): a retry with the same key and body gets the "
            "first answer and adds nothing; the same key with another body gets 422",
        ),
    ) -> AddClassesResponse:
        """Add examples of new or known classes. Answers once the addition is applied and committed
        to the store (fsync'd), so an acknowledged addition survives a crash; an addition that fails
        (4xx, 503, 507) stored nothing and changed nothing. 409: over --max-classes or --max-pool."""
        if len(req.examples) > s.max_examples:
            raise _too_large("examples per addition", len(req.examples), s.max_examples, "--max-examples")
        for i, ex in enumerate(req.examples):
            if len(ex.text) > s.max_text_chars:
                raise _too_large(f"characters in example {i}", len(ex.text), s.max_text_chars, "--max-text-chars")
        descriptions = dict(req.descriptions or {})
        for lab, desc in descriptions.items():
            if len(desc) > s.max_text_chars:
                raise _too_large(f"characters in the description of {lab!r}", len(desc), s.max_text_chars, "--max-text-chars")
        if idempotency_key is not None and (not idempotency_key.strip() or not idempotency_key.isprintable()):
            raise HTTPException(422, "Idempotency-Key: must be printable and not blank")
        try:
            addition = Addition.build([(ex.text, ex.label) for ex in req.examples], descriptions)
        except (TypeError, ValueError) as e:
            raise HTTPException(422, str(e)) from None
        try:
            result = await run_in_threadpool(live.add, addition, key=idempotency_key)
        except AdditionRefused as e:
            raise HTTPException(e.status, str(e)) from None
        except StoreWriteFailed as e:
            raise HTTPException(507 if e.full else 503, f"the addition was not stored: {e}; the service goes on "
                                "serving the state as it was, retry later") from None
        except StoreError as e:
            raise HTTPException(503, str(e)) from None
        if not result.replayed:
            metrics.observe_addition(result.added_examples)
        return AddClassesResponse(**vars(result))

    @api.get("/v1/classes", response_model=ClassesResponse, response_model_exclude_none=True)
    async def list_classes() -> ClassesResponse:
        """Labels with their example counts (and descriptions)."""
        v = live.view
        return ClassesResponse(
            classes=[ClassInfo(label=lab, examples=n, description=v.descriptions.get(lab)) for lab, n in v.counts.items()],
            count=len(v.counts),
            pool_size=v.pool_size,
            seq=v.seq,
        )

    @api.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """Liveness and the seq this replica has applied: 200 once the state is loaded and the store
        replayed; 503 if a failed addition could not be rolled back or a followed one could not be
        applied (then additions are stopped until a restart replays the store)."""
        if live.failed:
            return JSONResponse({"status": "failed", "seq": live.applied_seq, "reason": live.failed}, status_code=503)
        return JSONResponse({"status": "ok", "seq": live.applied_seq})

    app.include_router(api)

    _mount_docs(app)  # before /static: its assets live under /static/docs
    static = resources.files("iclcls.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(static / "index.html"), media_type="text/html", headers=_PAGE_HEADERS)

    return metrics.wrap(Guard(app, api_key=api_key, admin_key=admin_key, max_body_bytes=s.max_body_bytes,
                              loopback_port=loopback_port))


def _mount_docs(app: FastAPI) -> None:
    """Swagger UI 5 (it reads OpenAPI 3.1) at /docs, every asset served from here: the bundle,
    its stylesheet and favicon come from the ``fastapi-swagger`` package (the serve extra), so
    the page renders with no request leaving the machine (FastAPI's default points at a CDN)."""
    from fastapi.openapi.docs import get_swagger_ui_html

    try:
        assets = resources.files("fastapi_swagger") / "resources"
    except ModuleNotFoundError:
        assets = None
    if assets is None or not assets.joinpath("swagger-ui-bundle.js").is_file():

        @app.get("/docs", include_in_schema=False)
        async def no_docs() -> HTMLResponse:
            return HTMLResponse(
                "<!doctype html><title>iclcls API</title><p>The interactive docs need the serve extra "
                "(<code>pip install 'iclcls[serve]'</code>); the OpenAPI document is at "
                '<a href="/openapi.json">/openapi.json</a>.</p>'
            )

        return

    app.mount("/static/docs", StaticFiles(directory=str(assets)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="iclcls API",
            swagger_js_url="/static/docs/swagger-ui-bundle.js",
            swagger_css_url="/static/docs/swagger-ui.css",
            swagger_favicon_url="/static/docs/favicon-32x32.png",
            # validatorUrl: no badge that would send the spec to validator.swagger.io
            swagger_ui_parameters={"validatorUrl": None},
        )


def serve(
    state: str,
    *,
    store: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    admin_key: str | None = None,
    trust_state: bool = False,
    lm: str | None = None,
    snapshot_every: int = 100,
    refresh_every_s: float = 60.0,
    follow_poll_s: float = 1.0,
    settings: ServeSettings | None = None,
    log_level: str = "info",
) -> None:
    """Open the store (SQLite: take its writer lock), load the state, replay the store, and serve
    until interrupted (following the other replicas' additions on a PostgreSQL store)."""
    import uvicorn

    from iclcls.serve.auth import is_loopback

    s = settings or ServeSettings()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.time()
    live = LiveClassifier(state, store=store, holder={"port": port}, lm=lm, trust_state=trust_state,
                          snapshot_every=snapshot_every, max_classes=s.max_classes, max_pool=s.max_pool,
                          refresh_every_s=refresh_every_s, follow_poll_s=follow_poll_s)
    log.info("state ready in %.1f s", time.time() - t0)
    if api_key and not admin_key:
        log.warning("additions and the class list take the classify key: pass --admin-key-env to give them their own")
    asgi = create_app(live, s, api_key=api_key, admin_key=admin_key,
                      loopback_port=port if is_loopback(host) else None)
    uvicorn.run(asgi, host=host, port=port, log_level=log_level, access_log=False, lifespan="on")
