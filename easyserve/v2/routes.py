"""The Open Inference Protocol's HTTP routes, for the one model a server runs.

::

    GET  /v2                                      server metadata: name, version, extensions
    GET  /v2/health/live                          200 {"live": true} while the process lives (open, like /health)
    GET  /v2/health/ready                         200 {"ready": true} when /ready is 200, else 400 (open)
    GET  /v2/models/{name}[/versions/{v}]         model metadata: inputs and outputs
    GET  /v2/models/{name}[/versions/{v}]/ready   200 {"name": ..., "ready": true} when it can run requests, else 400
    GET  /v2/models/{name}[/versions/{v}]/config  Triton's model configuration (easyserve/v2/modelconfig.py)
    GET  /v2/models[/{name}[/versions/{v}]]/stats  the statistics extension: requests, queue, compute phases
    POST /v2/models/{name}[/versions/{v}]/infer   inference, JSON or binary tensor data

A health answer's status is its truth, as the protocol says: 200 for true, 400 for false. Its body
is the protocol's JSON (``{"live": true}``, ``{"ready": false}``, and why, as ``/ready`` says it,
under ``error``): KServe's client reads it, where Triton's reads the status alone. An unknown model
or version is 404; every other error is ``{"error": "..."}`` with its class's status, as on
``/predict``. Inference requests take the same path as ``/predict`` from the body on: the same
limits, API key, queue, batches, retries and statistics.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from aiohttp import web

from .. import __version__
from ..budget import Reservation
from ..errors import BadRequest, EasyServeError, NotFound, NotReady
from ..http import (
    MAX_BODY,
    POOL,
    REPORTS,
    _answer,
    _authorize,
    _expect,
    body_response,
    error_response,
    json_answer,
    may_read_stats,
    preflight,
    queued,
)
from ..reading import read_body, single_header
from .modelconfig import model_config
from .modelconfig import model_metadata as model_metadata_of
from .protocol import EXTENSIONS, HEADER_LENGTH, InferTask, Signature, infer_task

if TYPE_CHECKING:
    from ..pool import WorkerPool

__all__ = ["add_routes"]

SERVER_NAME = "easyserve"


def add_routes(app: web.Application) -> None:
    """Add the protocol's routes to the application made by :func:`easyserve.http.make_app`."""
    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/v2/", server_metadata)  # as the protocol's OpenAPI file writes it
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", server_ready)
    # what a page at a CorsOrigins origin may call, after its browser's preflight
    guarded = ["/v2", "/v2/", "/v2/health/live", "/v2/health/ready", "/v2/models/stats"]
    app.router.add_get("/v2/models/stats", model_statistics)  # every model's: before the routes of one named
    for model in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.router.add_get(model, model_metadata)
        app.router.add_get(model + "/ready", model_ready)
        app.router.add_get(model + "/config", model_configuration)
        app.router.add_get(model + "/stats", model_statistics)
        app.router.add_post(model + "/infer", infer, expect_handler=_expect_infer)
        guarded += [model, model + "/ready", model + "/config", model + "/stats", model + "/infer"]
    for path in guarded:
        app.router.add_route("OPTIONS", path, preflight)


async def server_metadata(request: web.Request) -> web.Response:
    try:
        _authorize(request)
    except EasyServeError as exc:
        return _answer(exc)
    return json_answer({"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)})


async def live(request: web.Request) -> web.Response:
    return json_answer({"live": True})


async def server_ready(request: web.Request) -> web.Response:
    return await _readiness(request, {})


async def model_metadata(request: web.Request) -> web.Response:
    try:
        _authorize(request)
        name, version = _model(request)
        signature = _signature(request.app[POOL], name)
    except EasyServeError as exc:
        return _answer(exc)
    return json_answer(model_metadata_of(signature, name, version))


async def model_configuration(request: web.Request) -> web.Response:
    pool: WorkerPool = request.app[POOL]
    try:
        _authorize(request)
        name, _ = _model(request)
        signature = _signature(pool, name)
    except EasyServeError as exc:
        return _answer(exc)
    return json_answer(model_config(signature, name, pool.config, pool.specs))


async def model_statistics(request: web.Request) -> web.Response:
    """The statistics extension: the model's numbers since the start (``stats.Inferences``), for every
    model (``/v2/models/stats``: the one this server runs) or the one named, in Triton's form. Behind
    the API key, as ``/stats`` is."""
    try:
        _authorize(request)
        if "name" in request.match_info:
            name, version = _model(request)
        else:
            name, version = request.app[POOL].config.model_identity
    except EasyServeError as exc:
        return _answer(exc)
    return json_answer({"model_stats": [await request.app[REPORTS].model_stat(name, version)]})


async def model_ready(request: web.Request) -> web.Response:
    try:
        _authorize(request)
        name, _ = _model(request)
    except EasyServeError as exc:
        return _answer(exc)
    return await _readiness(request, {"name": name})


async def _readiness(request: web.Request, identity: dict) -> web.Response:
    is_ready, reason, _ = await request.app[REPORTS].readiness(may_read_stats(request))
    if is_ready:
        return json_answer({**identity, "ready": True})
    return json_answer({**identity, "ready": False, "error": reason}, status=400)


async def infer(request: web.Request) -> web.StreamResponse:
    pool: WorkerPool = request.app[POOL]
    try:
        _authorize(request)  # first: the 404 for a wrong name would tell a stranger the right one
        name, version = _model(request)
        read = functools.partial(_read, signature=_signature(pool, name), model=(name, version),
                                 max_items=pool.config.max_batch_size)
        status, payload, pending = await queued(request, read)
    except EasyServeError as exc:
        return _answer(exc)
    if status != 200:
        return error_response(status, payload, pending.retry_after)
    header_length, body = payload  # written as /predict's answers are: a large one a piece at a time
    if header_length is None:
        return await body_response(request, body, "application/json")
    return await body_response(request, body, "application/octet-stream", {HEADER_LENGTH: str(header_length)})


async def _read(request: web.Request, held: Reservation, signature: Signature, model: tuple[str, str],
                max_items: int) -> InferTask:
    body = await read_body(request, request.app[MAX_BODY], held)
    if not body:
        raise BadRequest('empty body: send an inference request, a JSON object with "inputs"')
    # given twice differently, where the JSON ends would be a guess, and a proxy on the way may guess otherwise
    return infer_task(body, single_header(request, HEADER_LENGTH), signature, *model, max_items=max_items)


async def _expect_infer(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue`` on an inference request: an unknown model is a 404 before the body."""
    return await _expect(request, also=_model)


def _model(request: web.Request) -> tuple[str, str]:
    """The model and version the path names, if this server serves them; else :class:`NotFound`."""
    name, version = request.app[POOL].config.model_identity
    asked = request.match_info["name"]
    if asked != name:
        # Triton's words, which clients written for it look for: "Request for unknown model: 'x' is not found",
        # the name between single quotes as it is (repr would quote one holding a ' with double quotes)
        raise NotFound(f"Request for unknown model: '{asked}' is not found (this server serves '{name}')")
    asked_version = request.match_info.get("version", version)
    if asked_version != version:
        raise NotFound(f"Request for unknown model: '{name}' version {asked_version} is not found (it has version "
                       f"'{version}')")
    return name, version


def _signature(pool: WorkerPool, name: str) -> Signature:
    if pool.signature is None:  # only before the first worker has started
        raise NotReady(f"model {name!r} is not loaded yet: no worker has started", retry_after=1.0)
    return pool.signature
