"""The daemon's local HTTP API (FastAPI): its routes, a thin layer over client.service.ClientService
(schemas: client/api_schemas.py; Host, token and body-size checks: client/api_middleware.py).

Every /v1 route needs `Authorization: Bearer <DIR/token>` (compared in constant time); only the
OpenAPI schema (/openapi.json) is public, and it holds nothing about the user. Requests are
checked strictly: unknown keys are refused, strings and batches have limits, request bodies
have a size cap, and Host must be a loopback name (127.0.0.1, localhost, [::1]; a web page that
rebinds a DNS name to 127.0.0.1 gets nothing). GET /identity (public, outside the schema) proves
to the CLI that this process holds the token before the CLI sends it (client.daemon.identity_proof).
Errors say which field is wrong:

    422  {"detail": [{"loc": ["body", "items", 3, "fields", "score"], "msg": "...", "type": "..."}]}
    409  {"detail": "...", "job": {...}}      a conflicting id, or a job already running
    401  missing or wrong token;  413  body too large;  404  unknown job or history item

A refused history batch is refused whole: its 409 or 422 says that nothing of it was stored.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from shared.adapters import FRAMEWORK_VERSION
from shared.records import HistoryItem

from .api_middleware import BodyLimit, LoopbackHost, TokenGate, token_matches
from .api_schemas import (CONFLICT, NO_ITEM, NOT_FOUND, AddRequest, AddResult, AskRequest, AskResult, DeleteResult,
                          ErrorOut, ForgetRequest, ForgetResult, ImportResult, ItemPage, JobOut, SearchResult,
                          TrainRequest, describe_items)
from .archive import ArchiveError
from .basechoice import Preparing
from .daemon import IDENTITY_PATH, identity_proof
from .items import MAX_FIELD_NAME_CHARS, ItemError, check_item, check_text, item_out
from .jobs import JobBusy
from .service import ClientService
from .service_errors import Busy, Conflict, NotFound

log = logging.getLogger(__name__)

CANCEL_WAIT_S = 30.0  # a job stops between steps; a step of a small model on a CPU takes seconds
NONCE_PATTERN = r"^[0-9a-f]{32,128}$"
REFUSED_WHOLE = "; the batch was refused whole: nothing of it was stored"


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
    describe_items(app, service.task, spec.max_field_chars)
    return app


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
