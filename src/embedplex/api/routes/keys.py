"""Admin API for managed keys: the ``embedplex keys`` operations over HTTP.

    GET    /api/v1/keys                 every key, never a secret
    POST   /api/v1/keys                 create; the answer holds the key, once (201)
    DELETE /api/v1/keys/{name}          revoke
    POST   /api/v1/keys/rotate          {"name": ...}: a new secret, once; the old one stops
    GET    /api/v1/keys/usage?since=24h totals per key from the store

(Rotate takes the name in its body: every JSON POST route is a fixed path in the pipeline's
table, ``api/routes/table.py``.) Every route needs the admin secret, reads included (a key
list tells who uses the service): with no admin secret configured they are refused. A change
is applied to this process's key cache at once and reaches the other replicas through the
store's change counter. A store that fails or does not answer within ``state_timeout_s`` is a
503 (``admin.from_store``); one for a change not confirmed in time says it may have been made.
"""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from embedplex.api.common import json_response
from embedplex.api.errors import TEI_ERROR_RESPONSES
from embedplex.api.routes.admin import from_store, require_admin
from embedplex.core.errors import InvalidRequestError, ModelNotFoundError
from embedplex.core.tenant import Priority
from embedplex.state.cache import KeyVerifier
from embedplex.state.keys import LIMIT_MAX, KeySpec, KeyStore, KeyStoreError, duration
from embedplex.state.usage import usage_since

router = APIRouter(
    prefix="/api/v1/keys",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=TEI_ERROR_RESPONSES,
)


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    models: list[str] = Field(
        default_factory=list, max_length=256, description="Served names or * patterns; [] = all."
    )
    rpm: int | None = Field(None, ge=1, le=LIMIT_MAX)
    tpm: int | None = Field(None, ge=1, le=LIMIT_MAX)
    max_concurrent: int | None = Field(None, ge=1, le=LIMIT_MAX)
    priority: Priority = Priority.INTERACTIVE
    weight: int = Field(1, ge=1, le=1000)
    expires: str | None = Field(None, description="Lifetime: 90d, 12h, 30m (default: never).")


def _verifier(request: Request) -> KeyVerifier:
    verifier: KeyVerifier = request.app.state.keys
    return verifier


def _keys(request: Request) -> KeyStore:
    return _verifier(request).keys


@router.get("")
async def list_keys(request: Request) -> Response:
    keys = _keys(request)
    records = await from_store(keys.store, keys.list())
    return json_response({"object": "list", "data": [r.public() for r in records]})


@router.post("", status_code=201)
async def create_key(body: CreateKey, request: Request) -> Response:
    try:
        expires = None if body.expires is None else duration(body.expires)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="expires") from None
    try:
        spec = KeySpec(
            name=body.name,
            models=tuple(body.models),
            rpm=body.rpm,
            tpm=body.tpm,
            max_concurrent=body.max_concurrent,
            priority=body.priority,
            weight=body.weight,
            expires_in=expires,
        )
        keys = _keys(request)
        record, key = await from_store(keys.store, keys.create(spec), change=True)
    except (KeyStoreError, ValueError) as exc:
        raise InvalidRequestError(str(exc), param="name") from None
    await _verifier(request).changed()
    return json_response({**record.public(), "key": key}, status=201)


@router.get("/usage")
async def key_usage(request: Request, since: str | None = None) -> Response:
    start = None
    if since:
        try:
            start = datetime.now(UTC) - duration(since)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="since") from None
    store = _keys(request).store
    totals = await from_store(store, usage_since(store, start))
    fields = ("key_id", "name", "requests", "inputs", "tokens", "refusals")
    data = [{f: getattr(t, f) for f in fields} for t in totals]
    return json_response({"object": "list", "data": data})


@router.delete("/{name}")
async def revoke_key(name: str, request: Request) -> Response:
    keys = _keys(request)
    try:
        record = await from_store(keys.store, keys.revoke(name), change=True)
    except KeyStoreError as exc:
        raise ModelNotFoundError(str(exc), param="name") from None
    await _verifier(request).changed()
    return json_response(record.public())


class RotateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)


@router.post("/rotate")
async def rotate_key(body: RotateKey, request: Request) -> Response:
    keys = _keys(request)
    try:
        record, key = await from_store(keys.store, keys.rotate(body.name), change=True)
    except KeyStoreError as exc:
        raise ModelNotFoundError(str(exc), param="name") from None
    await _verifier(request).changed()
    return json_response({**record.public(), "key": key})
