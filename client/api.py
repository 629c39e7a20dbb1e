"""The daemon's local HTTP API (FastAPI): a thin layer over client.service.ClientService.

Every /v1 route needs `Authorization: Bearer <DIR/token>` (compared in constant time); only the
OpenAPI schema (/openapi.json) is public, and it holds nothing about the user. Requests are
checked strictly: unknown keys are refused, strings and batches have limits, request bodies
have a size cap, and Host must be a loopback name (127.0.0.1, localhost, [::1]; a web page that
rebinds a DNS name to 127.0.0.1 gets nothing). GET /identity (public, outside the schema) proves
to the CLI that this process holds the token before the CLI sends it (client.daemon.identity_proof). Errors say which field is wrong:

    422  {"detail": [{"loc": ["body", "items", 3, "fields", "score"], "msg": "...", "type": "..."}]}
    409  {"detail": "...", "job": {...}}      a conflicting id, or a job already running
    401  missing or wrong token;  413  body too large;  404  unknown job or history item

A refused history batch is refused whole: its 409 or 422 says that nothing of it was stored.
"""

from __future__ import annotations

import errno
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

from shared.adapters import FRAMEWORK_VERSION
from shared.records import HistoryItem

from .archive import ArchiveError
from .daemon import IDENTITY_PATH, identity_proof
from .items import (FIELD_NAME_PATTERN, MAX_FIELD_NAME_CHARS, MAX_FIELDS, ItemError, ItemIn, WholeNumber, check_item,
                    check_text, item_out)
from .jobs import JobBusy
from .service import Busy, ClientService, Conflict, NotFound, Preparing

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
CANCEL_WAIT_S = 30.0  # a job stops between steps; a step of a small model on a CPU takes seconds
NONCE_PATTERN = r"^[0-9a-f]{32,128}$"


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


class DeleteResult(BaseModel):
    deleted: str = Field(description="The id of the item removed from the history store and the ClientApp's snapshot.")
    history_count: int
    profile_removed: bool = Field(description="The PAG profile, written from the whole history, was removed with it "
                                  "(made again without the item when next needed).")
    personal_version: int | None = Field(description="The personal adapter in use, trained before the deletion (it "
                                         "keeps what it learned until the next training); null: none.")


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
    max_new_tokens: Annotated[int, WholeNumber] | None = Field(default=None, ge=1, le=512)

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
    prediction: str | None = Field(description="The answer parsed as the task scores it (a label, a rating, a "
                                   "text); null when the text holds none (see warnings).")
    method: str = Field(description="OPPU, OPPU+RAG, OPPU+PAG, or RAG/PAG/non-personalized without a personal adapter.")
    personal_version: int | None = Field(description="The personal-adapter version that answered; null: none.")
    base_adapter_version: str = Field(description="The base adapter that answered (its weights' sha256, 12 digits; "
                                      "'untrained' for one never trained).")
    base_adapter_source: str = Field(description="Where it came from: base_adapter_dir (named in the settings) | "
                                     "coordinator (DIR/base_adapter) | builtin (trained and cached for the task on "
                                     "this machine) | untrained.")
    warnings: list[str] = Field(description="What makes this answer less than it should be: an untrained base "
                                "adapter, a personal adapter left out because it was trained on another base "
                                "adapter, an answer the task cannot read.")
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
    phase: str = Field(description="What the job is doing now (known from its first second; steps_total only "
                       "once the first step is done).")
    result: dict[str, Any]
    error: str | None
    pid: int


class ForgetRequest(Strict):
    confirm: bool = Field(description="Must be true: everything personal in the data directory is deleted.")


class ForgetResult(BaseModel):
    deleted: dict[str, Any]
    kept: dict[str, str]


class ErrorOut(BaseModel):
    detail: Any = Field(description="What is wrong: a message, or a list of {loc, msg, type}.")
    job: dict[str, Any] | None = Field(default=None, description="409 on training: the job that is running; 503 on "
                                       "asking: the job preparing the base adapter.")


CONFLICT = {409: {"model": ErrorOut, "description": "Conflicts with what is stored or running."}}
NOT_FOUND = {404: {"model": ErrorOut, "description": "No such job."}}
NO_ITEM = {404: {"model": ErrorOut, "description": "No history item has this id."}}
REFUSED_WHOLE = "; the batch was refused whole: nothing of it was stored"


class ImportResult(BaseModel):
    history_added: int
    history_skipped: int
    profile: bool
    personal_version: int | None
    archive_personal_version: int | None
    personal_answers: bool = Field(description="The imported adapter answers (false: none imported, or trained on "
                                   "another base adapter than this daemon's).")
    personal_not_answering_because: str | None = None
    retrain_job: str | None = Field(default=None, description="Training started because the imported adapter was "
                                    "trained on another base adapter.")
    retraining: str | None = Field(default=None, description="Why no retraining started (too little history, a job "
                                   "running).")


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


class TokenGate:
    """Pure ASGI middleware: a request under `prefix` without the bearer token is answered 401
    before its body is read, so nothing of it is parsed or validated (the route dependency
    `authorized` checks again and documents the scheme in the OpenAPI schema)."""

    def __init__(self, app: Any, *, token: bytes, prefix: str) -> None:
        self.app, self.token, self.prefix = app, token, prefix

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith(self.prefix):
            return await self.app(scope, receive, send)
        if token_matches(dict(scope.get("headers") or []).get(b"authorization", b""), self.token):
            return await self.app(scope, receive, send)
        body = b'{"detail": "missing or wrong bearer token (see DIR/token)"}'
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


def loopback_host(header: str) -> bool:
    """A Host header naming a loopback host, with an optional port: 127.0.0.1, localhost, [::1]
    (an IPv6 literal carries its brackets; Starlette's TrustedHostMiddleware cut "[::1]:8731" at
    its first colon and refused it)."""
    host, port = header.strip().lower(), ""
    if host.startswith("["):
        end = host.find("]")
        host, rest = (host[:end + 1], host[end + 1:]) if end > 0 else ("", "")
        if rest:
            if not rest.startswith(":"):
                return False
            port = rest[1:] or "x"
    elif ":" in host:
        host, _, port = host.rpartition(":")
        port = port or "x"
    return host in LOOPBACK_HOSTS and (not port or (port.isdigit() and len(port) <= 5))


class LoopbackHost:
    """Pure ASGI middleware: a request whose Host is not a loopback name gets 400 (a web page that
    rebinds its DNS name to 127.0.0.1 reaches nothing)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if loopback_host(host):
            return await self.app(scope, receive, send)
        body = b'{"detail": "Host must be a loopback name: 127.0.0.1, localhost or [::1]"}'
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def token_matches(header: bytes, expected: bytes) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time (hmac.compare_digest)."""
    scheme, _, given = header.partition(b" ")
    if scheme.lower() != b"bearer":
        given = b""
    return hmac.compare_digest(given.strip(), expected)


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
    expected = token.encode()
    # Outermost first: Host, then the token (before a byte of the body is read or parsed), then size.
    app.add_middleware(BodyLimit, default=int(spec.max_request_mb * 2**20),
                       per_path={"/v1/import": int(spec.max_import_mb * 2**20)})
    app.add_middleware(TokenGate, token=expected, prefix="/v1/")
    app.add_middleware(LoopbackHost)
    bearer = HTTPBearer(auto_error=False, description="The token in DIR/token (created on first start, mode 0600).")

    def authorized(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        given = creds.credentials.encode() if creds is not None and creds.scheme.lower() == "bearer" else b""
        if not token_matches(b"Bearer " + given, expected):
            raise HTTPException(401, "missing or wrong bearer token (see DIR/token)",
                                headers={"WWW-Authenticate": "Bearer"})

    def known_query(request: Request) -> None:
        """Unknown query parameters are refused, as unknown body keys are (a typo is not ignored)."""
        route = request.scope.get("route")
        dependant = getattr(route, "dependant", None)
        allowed = {getattr(p, "alias", None) or p.name for p in getattr(dependant, "query_params", [])}
        unknown = sorted(set(request.query_params) - allowed)
        if unknown:
            raise ItemError(("query", unknown[0][:64]), f"unknown query parameter {unknown[0][:64]!r}"
                            + (f"; this endpoint takes: {', '.join(sorted(allowed))}" if allowed else
                               "; this endpoint takes none"))

    @app.get(IDENTITY_PATH, include_in_schema=False)
    def identity(nonce: Annotated[str, Query(pattern=NONCE_PATTERN)]) -> dict[str, Any]:
        """Unauthenticated proof that this process holds the token (client.daemon.identity_proof):
        the CLI asks before it sends the token. Not in the schema: a handshake, not a user API."""
        pid = os.getpid()
        return {"pid": pid, "proof": identity_proof(token, nonce, pid)}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized), Depends(known_query)], responses={
        400: {"model": ErrorOut, "description": "A body that cannot be decoded, or a Host that is not loopback."},
        401: {"model": ErrorOut, "description": "Missing or wrong bearer token."},
        413: {"model": ErrorOut, "description": "Request body over the limit."},
        422: {"model": ErrorOut, "description": "Invalid request; `detail` says which field and why."}})

    @app.exception_handler(ItemError)
    async def _item_error(_: Request, e: ItemError) -> JSONResponse:
        return JSONResponse({"detail": [e.detail(() if e.loc[:1] == ("query",) else ("body",))]}, status_code=422)

    @app.exception_handler(Conflict)
    async def _conflict(_: Request, e: Conflict) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=409)

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, e: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=404)

    @app.exception_handler(JobBusy)
    async def _busy_job(_: Request, e: JobBusy) -> JSONResponse:
        return JSONResponse({"detail": str(e), "job": e.job.public()}, status_code=409)

    @app.exception_handler(Preparing)
    async def _preparing(_: Request, e: Preparing) -> JSONResponse:
        return JSONResponse({"detail": str(e), "job": e.job.public()}, status_code=503, headers={"Retry-After": "10"})

    @app.exception_handler(Busy)
    async def _busy(_: Request, e: Busy) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=409)

    @app.exception_handler(ArchiveError)
    async def _archive(_: Request, e: ArchiveError) -> JSONResponse:
        return JSONResponse({"detail": f"import refused, nothing was changed: {e}"}, status_code=422)

    @app.exception_handler(OSError)
    async def _os_error(_: Request, e: OSError) -> JSONResponse:
        # Disk full or a failing disk: say so, and that the request did not complete (writes are
        # atomic: what was acknowledged before is intact, and a failed batch can be sent again).
        log.error("request failed on the disk: %s", e)
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        return JSONResponse({"detail": ("the disk is full" if full else f"a disk operation failed ({e.strerror})")
                             + "; nothing of this request was acknowledged, retry it when fixed"},
                            status_code=507 if full else 500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes the whole input back; the location and message are enough.
        errors = [{"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
                  for err in e.errors()[:20]]
        if errors and request.method == "POST" and request.url.path == "/v1/history":
            errors[0]["msg"] += REFUSED_WHOLE
        return JSONResponse({"detail": errors}, status_code=422)

    # -- history ---------------------------------------------------------------------------------

    @v1.post("/history", response_model=AddResult, responses=CONFLICT, summary="Add history items (idempotent by id, batched)")
    def add_history(req: AddRequest) -> dict[str, Any]:
        if len(req.items) > spec.max_batch_items:
            raise ItemError(("items",), f"{len(req.items)} items in one request; the limit is {spec.max_batch_items} "
                            "(daemon.max_batch_items)" + REFUSED_WHOLE)
        try:
            records = [check_item(it, service.task, index=i, max_field_chars=spec.max_field_chars)
                       for i, it in enumerate(req.items)]
            return service.add(records)
        except ItemError as e:
            raise ItemError(e.loc, e.msg + REFUSED_WHOLE) from None
        except Conflict as e:
            raise Conflict(f"{e}{REFUSED_WHOLE}") from None

    @v1.delete("/history/{item_id:path}", response_model=DeleteResult, responses=NO_ITEM,
               summary="Delete one history item (from the store and what the next training reads)")
    def delete_history_item(item_id: str) -> dict[str, Any]:
        return service.delete(item_id)

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
            raise ItemError(("query", "q"), str(e)) from None
        items = service.search(q, k)
        return {"retriever": spec.retrieval.retriever, "query": q, "items": [item_out(it) for it in items]}

    # -- asking ----------------------------------------------------------------------------------

    @v1.post("/ask", response_model=AskResult, responses={503: {
                 "model": ErrorOut, "description": "The base adapter is being prepared (first start); `job` is its "
                 "job: ask again when it is done."}},
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

    @v1.post("/train", response_model=JobOut, status_code=202, responses=CONFLICT, summary="Start training the personal adapter")
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

    @v1.get("/jobs/{job_id}", response_model=JobOut, responses=NOT_FOUND, summary="A job's state and progress")
    def job(job_id: str) -> dict[str, Any]:
        j = service.jobs.get(job_id)
        if j is None:
            raise HTTPException(404, f"no job {job_id[:80]!r}")
        return j.public()

    @v1.post("/jobs/{job_id}/cancel", response_model=JobOut, responses=NOT_FOUND,
             summary="Cancel a job (the previous adapter stays); answers once it stopped, or after "
             f"{CANCEL_WAIT_S:.0f} s still 'running' (it stops after its current step)")
    def cancel(job_id: str) -> dict[str, Any]:
        j = service.jobs.cancel(job_id, wait=CANCEL_WAIT_S)
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

    @v1.post("/import", response_model=ImportResult, responses=CONFLICT,
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

    @v1.post("/forget", response_model=ForgetResult, responses=CONFLICT,
             summary="Delete the history store and every personal-adapter version; says what was deleted")
    def forget(req: ForgetRequest) -> dict[str, Any]:
        if req.confirm is not True:
            raise HTTPException(422, "set confirm to true to delete your history and adapters")
        return service.forget()

    app.include_router(v1)
    _describe_items(app, service)
    return app


def _describe_items(app: FastAPI, service: ClientService) -> None:
    """State the task's item rules in the OpenAPI schema, so a client (or a schema-driven fuzzer)
    knows what a valid item is: the required fields, non-empty text, the label's values."""
    from fastapi.openapi.utils import get_openapi

    task, limit = service.task, service.spec.max_field_chars
    text = {"type": "string", "minLength": 1, "maxLength": limit, "pattern": r"^[^\x00]*[^\x00\s][^\x00]*$"}
    number = {"type": "number"}  # stored as the text it is written as (client.items.FieldText)
    props: dict[str, Any] = {f: {"anyOf": [dict(text), dict(number)]} for f in task.item_fields}
    if task.label_field in props:
        if task.kind == "regression":
            ratings = "|".join(task.labels or ())  # the task's scale, 1-5 unless a config says otherwise
            props[task.label_field] = {"anyOf": [
                {"type": "string", "pattern": rf"^\s*(?:{ratings})(\.0*)?\s*$"},
                {"type": "integer", "minimum": task.scale[0], "maximum": task.scale[1]}]}
        elif task.labels:
            numeric = [int(x) for x in task.labels if x.isdigit() and str(int(x)) == x]
            props[task.label_field] = {"anyOf": [{"type": "string", "enum": list(task.labels)}]
                                       + ([{"type": "integer", "enum": numeric}] if numeric else [])}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            item = schema.get("components", {}).get("schemas", {}).get("ItemIn")
            if item is not None:
                item["properties"]["fields"] = {
                    "type": "object", "title": "Fields", "required": list(task.item_fields), "properties": props,
                    "additionalProperties": False,  # a field the task does not have is refused
                    "propertyNames": {"pattern": FIELD_NAME_PATTERN, "maxLength": MAX_FIELD_NAME_CHARS},
                    "maxProperties": MAX_FIELDS,
                    "description": item["properties"]["fields"].get("description", ""),
                }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _input_from_fields(service: ClientService, fields: dict[str, str]) -> str:
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
