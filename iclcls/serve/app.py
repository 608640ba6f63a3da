"""The FastAPI application: classify, add classes, list classes, health, metrics, docs, a page.

Requests carry texts and labels only: nothing in a request names a file, a model or a URL
(request models forbid unknown fields). Every error is JSON ``{"error": {"status",
"message"}}`` with the right status: 422 bad body, 413 over a size limit, 401/403 auth,
503 overloaded.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Security
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from iclcls.serve.auth import Guard
from iclcls.serve.batcher import MicroBatcher, Overloaded
from iclcls.serve.metrics import Metrics
from iclcls.serve.state import Addition, LiveClassifier
from iclcls.types import Example, Prediction

log = logging.getLogger("iclcls.serve")

MAX_LABEL_CHARS = 200


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


# -- request and response models -------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassifyRequest(_Strict):
    texts: list[str] = Field(min_length=1, description="texts to classify")
    top_k: int | None = Field(None, ge=1, le=1000, description="labels per prediction (default: all ranked)")
    trace: bool = Field(False, description="also return candidates, demonstrations and the prompt")

    @field_validator("texts")
    @classmethod
    def _non_empty(cls, texts: list[str]) -> list[str]:
        for i, t in enumerate(texts):
            if not t.strip():
                raise ValueError(f"text {i} is empty or whitespace")
        return texts


class Demonstration(BaseModel):
    text: str
    label: str | None


class PredictionOut(BaseModel):
    label: str | None = Field(None, description="the top label")
    labels: list[str]
    scores: list[float | None]
    candidates: list[str] | None = None
    demonstrations: list[Demonstration] | None = None
    prompt: str | None = None
    prompt_tokens: int | None = None


class ClassifyResponse(BaseModel):
    predictions: list[PredictionOut]


class ExampleIn(_Strict):
    text: str = Field(min_length=1)
    label: str = Field(min_length=1, max_length=MAX_LABEL_CHARS)

    @field_validator("text", "label")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v


class AddClassesRequest(_Strict):
    examples: list[ExampleIn] = Field(min_length=1, description="examples of new or known classes")
    descriptions: dict[str, str] | None = Field(None, description="label -> description, for labels in examples")


class AddClassesResponse(BaseModel):
    seq: int = Field(description="the addition's number in the write-ahead log")
    added_examples: int
    new_classes: list[str]
    classes: int
    pool_size: int


class ClassInfo(BaseModel):
    label: str
    examples: int
    description: str | None = None


class ClassesResponse(BaseModel):
    classes: list[ClassInfo]
    count: int
    pool_size: int
    seq: int


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _prediction_out(p: Prediction, top_k: int | None, trace: bool) -> PredictionOut:
    k = len(p.labels) if top_k is None else top_k
    out = PredictionOut(label=p.labels[0] if p.labels else None, labels=list(p.labels[:k]),
                        scores=[_finite(s) for s in p.scores[:k]])
    if trace:
        out.candidates = list(p.candidates)
        out.demonstrations = [Demonstration(text=d.text, label=d.label) for d in p.demonstrations]
        out.prompt = p.trace.get("prompt")
        out.prompt_tokens = p.prompt_tokens
    return out


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


def create_app(live: LiveClassifier, settings: ServeSettings | None = None, *, api_key: str | None = None) -> Any:
    """The ASGI application (FastAPI wrapped in the auth/size guard and request metrics)."""
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
    bearer = HTTPBearer(auto_error=False, description="the key in the server's --api-key-env variable")
    api = APIRouter(dependencies=[Security(bearer)] if api_key else [])

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
        """Ranked labels for each text (with ``trace``: the candidates, demonstrations and prompt)."""
        if len(req.texts) > s.max_texts:
            raise _too_large("texts per request", len(req.texts), s.max_texts, "--max-texts")
        for i, t in enumerate(req.texts):
            if len(t) > s.max_text_chars:
                raise _too_large(f"characters in text {i}", len(t), s.max_text_chars, "--max-text-chars")
        try:
            preds = await batcher.submit(req.texts)
        except Overloaded as e:
            raise HTTPException(503, f"overloaded: {e}") from None
        return ClassifyResponse(predictions=[_prediction_out(p, req.top_k, req.trace) for p in preds])

    @api.post("/v1/classes", response_model=AddClassesResponse)
    async def add_classes(req: AddClassesRequest) -> AddClassesResponse:
        """Add examples of new or known classes; answers once the addition is in the fsync'd log
        and applied, so an acknowledged addition survives a crash."""
        if len(req.examples) > s.max_examples:
            raise _too_large("examples per addition", len(req.examples), s.max_examples, "--max-examples")
        for i, ex in enumerate(req.examples):
            if len(ex.text) > s.max_text_chars:
                raise _too_large(f"characters in example {i}", len(ex.text), s.max_text_chars, "--max-text-chars")
        descriptions = dict(req.descriptions or {})
        labels = {ex.label for ex in req.examples}
        for lab, desc in descriptions.items():
            if lab not in labels:
                raise HTTPException(422, f"descriptions: label {lab!r} has no example in this request")
            if len(desc) > s.max_text_chars:
                raise _too_large(f"characters in the description of {lab!r}", len(desc), s.max_text_chars, "--max-text-chars")
        try:
            addition = Addition([Example(ex.text, (ex.label,)) for ex in req.examples], descriptions)
        except (TypeError, ValueError) as e:
            raise HTTPException(422, f"examples: {e}") from None
        result = await run_in_threadpool(live.add, addition)
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
        """Liveness: 200 once the state is loaded and the log replayed; 503 if an addition failed
        to apply (then additions are stopped until a restart replays the log)."""
        if live.failed:
            return JSONResponse({"status": "failed"}, status_code=503)
        return JSONResponse({"status": "ok"})

    app.include_router(api)

    _mount_docs(app)  # before /static: its assets live under /static/docs
    static = resources.files("iclcls.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(static / "index.html"), media_type="text/html", headers=_PAGE_HEADERS)

    return metrics.wrap(Guard(app, api_key=api_key, max_body_bytes=s.max_body_bytes))


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
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    trust_state: bool = False,
    lm: str | None = None,
    snapshot_every: int = 100,
    settings: ServeSettings | None = None,
    log_level: str = "info",
) -> None:
    """Load the state, replay the log, and serve until interrupted (uvicorn)."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.time()
    live = LiveClassifier(state, lm=lm, trust_state=trust_state, snapshot_every=snapshot_every)
    log.info("state ready in %.1f s", time.time() - t0)
    asgi = create_app(live, settings, api_key=api_key)
    uvicorn.run(asgi, host=host, port=port, log_level=log_level, access_log=False, lifespan="on")
