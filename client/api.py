"""The daemon's local HTTP API (FastAPI): a thin layer over client.service.ClientService.

Every /v1 route needs `Authorization: Bearer <DIR/token>` (compared in constant time); only the
OpenAPI schema (/openapi.json) is public, and it holds nothing about the user. Requests are
checked strictly: unknown keys are refused, strings and batches have limits, request bodies
have a size cap, and Host must be a loopback name (a web page that rebinds a DNS name to
127.0.0.1 gets nothing). Errors say which field is wrong:

    422  {"detail": [{"loc": ["body", "items", 3, "fields", "score"], "msg": "...", "type": "..."}]}
    409  {"detail": "...", "job": {...}}      a conflicting id, or a job already running
    401  missing or wrong token;  413  body too large;  404  unknown job
"""

from __future__ import annotations

import hmac
import logging
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware

from shared.adapters import FRAMEWORK_VERSION

from .archive import ArchiveError
from .items import MAX_FIELD_NAME_CHARS, MAX_FIELDS, ItemError, ItemIn, check_item, check_text, item_out
from .jobs import JobBusy
from .service import Busy, ClientService, Conflict

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]


# ------------------------------------------------------------------------------------ schemas


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AddRequest(Strict):
    items: list[ItemIn] = Field(min_length=1, description="History items, validated against the task's fields.")


class AddResult(BaseModel):
    added: int = Field(description="Items stored now.")
    skipped: int = Field(description="Items already stored with identical content (ids are idempotent).")
    history_count: int
    auto_train_job: str | None = Field(description="Training job started because enough new items arrived.")


class ItemOut(BaseModel):
    id: str
    fields: dict[str, str]
    time: int


class ItemPage(BaseModel):
    total: int
    offset: int
    items: list[ItemOut]


class SearchResult(BaseModel):
    retriever: str
    query: str
    items: list[ItemOut]


class AskRequest(Strict):
    input: str | None = Field(default=None, min_length=1, description="The full question, worded as the task's queries.")
    fields: dict[str, str] | None = Field(
        default=None, description="Or the item's fields; the question is built with the task's template.")
    personal: bool = Field(default=True, description="Use the personal adapter (false: base adapter only).")
    max_new_tokens: int | None = Field(default=None, ge=1, le=512)

    @model_validator(mode="after")
    def _one_of(self) -> AskRequest:
        if (self.input is None) == (self.fields is None):
            raise ValueError("give exactly one of 'input' (the question) or 'fields' (an item without its answer)")
        if self.fields is not None and len(self.fields) > MAX_FIELDS:
            raise ValueError(f"at most {MAX_FIELDS} fields")
        if self.input is not None:
            check_text(self.input, "input")
        for name, value in (self.fields or {}).items():
            check_text(name, "a field name")
            check_text(value, f"field {name[:64]!r}")
        return self


class AskResult(BaseModel):
    answer: str = Field(description="The model's text.")
    prediction: str = Field(description="The answer parsed as the task scores it (a label, a rating, a text).")
    method: str = Field(description="OPPU, OPPU+RAG, OPPU+PAG, or RAG/PAG/non-personalized without a personal adapter.")
    personal_version: int | None = Field(description="The personal-adapter version that answered; null: none.")
    base_adapter_version: str
    retrieved: list[str] = Field(description="Ids of the history items put into the prompt.")
    seconds: float
    waited_for_model_s: float


class TrainRequest(Strict):
    epochs: float | None = Field(default=None, gt=0, le=100, description="Override personal_train.epochs.")
    lr: float | None = Field(default=None, gt=0, le=1, description="Override personal_train.lr.")


class JobOut(BaseModel):
    id: str
    kind: str
    trigger: str
    state: str = Field(description="queued | running | succeeded | failed | cancelled | interrupted")
    params: dict[str, Any]
    created: float
    started: float | None
    finished: float | None
    steps_done: int
    steps_total: int
    progress: float
    loss: float | None
    result: dict[str, Any]
    error: str | None
    pid: int


class ForgetRequest(Strict):
    confirm: bool = Field(description="Must be true: everything personal in the data directory is deleted.")


class ForgetResult(BaseModel):
    deleted: dict[str, Any]
    kept: dict[str, str]


class ImportResult(BaseModel):
    history_added: int
    history_skipped: int
    profile: bool
    personal_version: int | None
    archive_personal_version: int | None


# ------------------------------------------------------------------------------------- limits


class BodyLimit:
    """Pure ASGI middleware: refuse bodies over the limit (by Content-Length, and while streaming)."""

    def __init__(self, app: Any, *, default: int, per_path: dict[str, int]) -> None:
        self.app, self.default, self.per_path = app, default, per_path

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.per_path.get(scope.get("path", ""), self.default)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                too_big = True
            if too_big:
                return await _too_large(send, limit)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, limited, send)
        except _BodyTooLarge:
            await _too_large(send, limit)


class _BodyTooLarge(HTTPException):
    # An HTTPException, so FastAPI's body parsing re-raises it instead of answering 400.
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")
        self.limit = limit


async def _too_large(send: Any, limit: int) -> None:
    body = f'{{"detail": "request body larger than {limit} bytes"}}'.encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------- app


def create_app(service: ClientService, token: str) -> FastAPI:
    spec = service.spec
    app = FastAPI(
        title="oppu client daemon",
        version=FRAMEWORK_VERSION,
        description="One user's private history, personal adapter and personalized answers, on their own machine. "
        f"Task: {service.task.name} (item fields: {', '.join(service.task.item_fields)}).",
        docs_url=None, redoc_url=None,  # their pages load scripts from a CDN; the schema is enough
    )
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_HOSTS)
    app.add_middleware(BodyLimit, default=int(spec.max_request_mb * 2**20),
                       per_path={"/v1/import": int(spec.max_import_mb * 2**20)})
    bearer = HTTPBearer(auto_error=False, description="The token in DIR/token (created on first start, mode 0600).")
    expected = token.encode()

    def authorized(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        given = creds.credentials.encode() if creds is not None and creds.scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(given, expected):
            raise HTTPException(401, "missing or wrong bearer token (see DIR/token)",
                                headers={"WWW-Authenticate": "Bearer"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    @app.exception_handler(ItemError)
    async def _item_error(_: Request, e: ItemError) -> JSONResponse:
        return JSONResponse({"detail": [e.detail(("body",))]}, status_code=422)

    @app.exception_handler(Conflict)
    async def _conflict(_: Request, e: Conflict) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=409)

    @app.exception_handler(JobBusy)
    async def _busy_job(_: Request, e: JobBusy) -> JSONResponse:
        return JSONResponse({"detail": str(e), "job": e.job.public()}, status_code=409)

    @app.exception_handler(Busy)
    async def _busy(_: Request, e: Busy) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=409)

    @app.exception_handler(ArchiveError)
    async def _archive(_: Request, e: ArchiveError) -> JSONResponse:
        return JSONResponse({"detail": f"import refused, nothing was changed: {e}"}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes the whole input back; the location and message are enough.
        errors = [{"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
                  for err in e.errors()[:20]]
        return JSONResponse({"detail": errors}, status_code=422)

    # -- history ---------------------------------------------------------------------------------

    @v1.post("/history", response_model=AddResult, summary="Add history items (idempotent by id, batched)")
    def add_history(req: AddRequest) -> dict[str, Any]:
        if len(req.items) > spec.max_batch_items:
            raise ItemError(("items",), f"{len(req.items)} items in one request; the limit is {spec.max_batch_items} "
                            "(daemon.max_batch_items)")
        records = [check_item(it, service.task, index=i, max_field_chars=spec.max_field_chars)
                   for i, it in enumerate(req.items)]
        return service.add(records)

    @v1.get("/history", response_model=ItemPage, summary="List history items, oldest first")
    def list_history(offset: Annotated[int, Query(ge=0)] = 0,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        total, items = service.list_items(offset, limit)
        return {"total": total, "offset": offset, "items": [item_out(it) for it in items]}

    @v1.get("/history/search", response_model=SearchResult, summary="Top-k history items with the retriever in use")
    def search_history(q: Annotated[str, Query(min_length=1, max_length=20000)],
                       k: Annotated[int, Query(ge=1, le=100)] = 5) -> dict[str, Any]:
        try:
            check_text(q, "q")
        except ValueError as e:
            raise ItemError(("q",), str(e)) from None
        items = service.search(q, k)
        return {"retriever": spec.retrieval.retriever, "query": q, "items": [item_out(it) for it in items]}

    # -- asking ----------------------------------------------------------------------------------

    @v1.post("/ask", response_model=AskResult,
             summary="Personalized answer: base + base adapter + personal adapter + retrieval")
    def ask(req: AskRequest) -> dict[str, Any]:
        if req.input is not None:
            if len(req.input) > spec.max_field_chars:
                raise ItemError(("input",), f"input is longer than {spec.max_field_chars} characters")
            query = req.input
        else:
            query = _input_from_fields(service, req.fields or {})
        return service.ask(query, personal=req.personal, max_new_tokens=req.max_new_tokens)

    # -- training --------------------------------------------------------------------------------

    @v1.post("/train", response_model=JobOut, status_code=202, summary="Start training the personal adapter")
    def train(req: TrainRequest | None = None) -> dict[str, Any]:
        req = req or TrainRequest()
        try:
            job = service.train(overrides={"epochs": req.epochs, "lr": req.lr})
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return job.public()

    @v1.get("/jobs", response_model=list[JobOut], summary="Recent jobs, newest first")
    def jobs() -> list[dict[str, Any]]:
        return [j.public() for j in service.jobs.list()]

    @v1.get("/jobs/{job_id}", response_model=JobOut, summary="A job's state and progress")
    def job(job_id: str) -> dict[str, Any]:
        j = service.jobs.get(job_id)
        if j is None:
            raise HTTPException(404, f"no job {job_id[:80]!r}")
        return j.public()

    @v1.post("/jobs/{job_id}/cancel", response_model=JobOut, summary="Cancel a job (the previous adapter stays)")
    def cancel(job_id: str) -> dict[str, Any]:
        j = service.jobs.cancel(job_id)
        if j is None:
            raise HTTPException(404, f"no job {job_id[:80]!r}")
        return j.public()

    # -- status, export, import, forget ----------------------------------------------------------

    @v1.get("/status", summary="Base model and adapters, history count, privacy spent, federation, jobs")
    def status() -> dict[str, Any]:
        return service.status()

    @v1.get("/export", summary="History + profile + personal adapter + manifest as one .tar.gz",
            response_class=FileResponse, responses={200: {"content": {"application/gzip": {}}}})
    def export() -> FileResponse:
        tmp_dir = service.dir / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, name = tempfile.mkstemp(prefix="export-", suffix=".tar.gz", dir=tmp_dir)
        os.close(fd)
        try:
            manifest = service.export(Path(name))
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return FileResponse(name, media_type="application/gzip", filename="oppu-export.tar.gz",
                            headers={"X-Oppu-History-Items": str(manifest["history_items"])},
                            background=BackgroundTask(lambda: Path(name).unlink(missing_ok=True)))

    @v1.post("/import", response_model=ImportResult,
             summary="Import an export archive (history merged by id; its adapter becomes a new version)",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/gzip": {"schema": {"type": "string", "format": "binary"}}}}})
    async def import_(request: Request) -> dict[str, Any]:
        tmp_dir = service.dir / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".tar.gz", dir=tmp_dir)
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in request.stream():
                    out.write(chunk)
            return await run_in_threadpool(service.import_archive, Path(name))
        finally:
            Path(name).unlink(missing_ok=True)

    @v1.post("/forget", response_model=ForgetResult,
             summary="Delete the history store and every personal-adapter version; says what was deleted")
    def forget(req: ForgetRequest) -> dict[str, Any]:
        if req.confirm is not True:
            raise HTTPException(422, "set confirm to true to delete your history and adapters")
        return service.forget()

    app.include_router(v1)
    return app


def _input_from_fields(service: ClientService, fields: dict[str, str]) -> str:
    from shared.records import HistoryItem

    limit = service.spec.max_field_chars
    for name, value in fields.items():
        if len(name) > MAX_FIELD_NAME_CHARS:
            raise ItemError(("fields",), "field names are short identifiers")
        if len(value) > limit:
            raise ItemError(("fields", name), f"field {name!r} is longer than {limit} characters")
    try:
        return service.task.make_input(HistoryItem("query", dict(fields)))
    except KeyError as e:
        name = str(e.args[0]) if e.args else "?"
        raise ItemError(("fields", name), f"the question needs field {name!r} ({service.task.name} questions use: "
                        f"{', '.join(f for f in service.task.item_fields if f != service.task.target_field)})") from None
