"""``deltarec serve``: FastAPI + uvicorn over the champion's snapshot.

- ``GET /recommendations/{user_id}?k=``: the recommendations table's rows
  (an in-memory Arrow index; no Spark, no lake read per request); a user it
  does not know gets the popularity list with ``"fallback": "popularity"``;
- ``POST /score`` ``{"user_id", "items": [...], "k"}``: the champion scores the
  user with ``items`` (bought since the table was written) appended to the
  history stored for them;
- ``GET /health``: the champion served, the table version, load time, what a
  newer champion waits for, the last failed load.

Every bad input is a 4xx whose JSON body names the field (``{"error", "field"}``);
an unexpected error is a 500 for that request only.
"""
from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .holder import ModelHolder
from .ids import user_key

if TYPE_CHECKING:
    from ..config import Config
    from .snapshot import Snapshot

log = logging.getLogger("deltarec.serve")
MAX_ID = 256  # longest user id accepted


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str = Field(min_length=1, max_length=MAX_ID)
    items: list[str] = Field(default_factory=list, description="item ids since the table was written, oldest first")
    k: int | None = None


def _error(status: int, message: str, field: str | None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status)


def _field(loc: tuple) -> str:
    parts = list(loc[1:]) if loc and loc[0] in ("body", "query", "path") else list(loc)
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def create_app(cfg: "Config", holder: ModelHolder | None = None, *, poll: bool = True) -> FastAPI:
    holder = holder or ModelHolder(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if poll:
            holder.start()
        yield
        holder.stop()

    app = FastAPI(title="deltarec", summary="recommendations from the champion", lifespan=lifespan)
    app.state.holder = holder

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request"}
        field = _field(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                          "body")
        got = f" (got {first['input']!r})" if "input" in first and not isinstance(first["input"], dict) else ""
        return _error(422, f"{field}: {first['msg']}{got}", field)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        log.exception("request %s %s failed", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", None)

    def serving() -> "Snapshot | JSONResponse":
        snap = holder.current
        if snap is None:
            why = holder.error or holder.pending or "the first poll has not finished"
            return _error(503, f"no champion loaded yet: {why}", None)
        return snap

    def check_k(k: int | None, snap: "Snapshot") -> int | JSONResponse:
        k = cfg.recommend.k if k is None else k
        if not 1 <= k <= snap.max_k:
            return _error(422, f"k={k} is out of range: ask for 1..{snap.max_k} (recommend.max_k)", "k")
        return k

    def answer(user_id: str, k: int, snap: "Snapshot", res: dict[str, Any]) -> JSONResponse:
        return JSONResponse({
            "user_id": user_id, "k": k, "run_id": snap.run_id, "table_version": snap.table_version,
            "fallback": res["fallback"], "from": res["from"],
            "items": [{"rank": r, "item_id": i, "score": s} for r, (i, s) in enumerate(res["items"], 1)]})

    @app.get("/health")
    async def health():
        h = holder.health()
        return JSONResponse(h, status_code=200 if holder.current is not None else 503)

    @app.get("/recommendations/{user_id}")
    async def recommendations(user_id: str = Path(min_length=1, max_length=MAX_ID),
                              k: int | None = Query(default=None)):
        snap = serving()
        if isinstance(snap, JSONResponse):
            return snap
        k = check_k(k, snap)
        if isinstance(k, JSONResponse):
            return k
        key = user_key(user_id, cfg)
        res = snap.from_table(key, k)
        if res is None:  # deeper than the table: scored live (torch), off the event loop
            from starlette.concurrency import run_in_threadpool

            res = await run_in_threadpool(snap.score, key, [], k)
        return answer(user_id, k, snap, res)

    @app.post("/score")
    async def score(request: Request):
        # the body is parsed here, whatever its content type, so every problem gets its own message
        import json

        from pydantic import ValidationError
        from starlette.concurrency import run_in_threadpool

        raw = await request.body()
        try:
            data = json.loads(raw or b"null")
        except ValueError as e:
            return _error(400, f"the body is not valid JSON: {e}", "body")
        if not isinstance(data, dict):
            return _error(422, 'the body must be a JSON object like {"user_id": "...", "items": [...], "k": 10}, '
                               f"got {type(data).__name__}", "body")
        try:
            req = ScoreRequest.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            field = _field(tuple(err["loc"])) if err["loc"] else "body"
            got = f" (got {err['input']!r})" if err.get("type") != "missing" else ""
            return _error(422, f"{field}: {err['msg']}{got}", field)
        snap = serving()
        if isinstance(snap, JSONResponse):
            return snap
        k = check_k(req.k, snap)
        if isinstance(k, JSONResponse):
            return k
        if len(req.items) > cfg.serve.max_items:
            return _error(422, f"items: {len(req.items)} ids, at most {cfg.serve.max_items} (serve.max_items)",
                          "items")
        unknown = snap.unknown_items(req.items)
        if unknown:
            i, item = unknown[0]
            more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
            return _error(422, f"items[{i}]: unknown item id {item!r}{more} (champion {snap.run_id} has never "
                               "seen it)", f"items[{i}]")
        res = await run_in_threadpool(snap.score, user_key(req.user_id, cfg), req.items, k)
        return answer(req.user_id, k, snap, res)

    return app


def run_server(cfg: "Config") -> int:
    """Serve until interrupted (uvicorn handles SIGINT / SIGTERM)."""
    import torch
    import uvicorn

    torch.set_num_threads(1)  # requests run in parallel threads; one scoring thread each
    app = create_app(cfg)
    log.info("serving model %r from %s on http://%s:%d (polling every %gs)", cfg.model.name, cfg.lake.root,
             cfg.serve.host, cfg.serve.port, cfg.serve.poll_seconds)
    uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level="warning", access_log=False)
    return 0
