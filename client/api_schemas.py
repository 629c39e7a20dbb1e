"""The daemon API's request and response schemas (pydantic), and the task's item rules stated in
its OpenAPI schema. Requests are strict: unknown keys are refused, strings and batches have limits.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.tasks import Task

from .items import FIELD_NAME_PATTERN, MAX_FIELD_NAME_CHARS, MAX_FIELDS, ItemIn, WholeNumber, check_text


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


def describe_items(app: FastAPI, task: Task, limit: int) -> None:
    """State the task's item rules in the OpenAPI schema, so a client (or a schema-driven fuzzer)
    knows what a valid item is: the required fields, non-empty text (at most `limit` characters),
    the label's values."""
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
