"""API errors: one exception type per HTTP outcome, and the FastAPI handlers that render them.

Every error a client sees is JSON in the OpenAI envelope (so the ``openai`` package and the UI both
read it)::

    {"error": {"message": "state_id must match [A-Za-z0-9_-]{1,64}", "type": "invalid_request_error",
               "param": "state_id", "code": "invalid_state_id"}}

Errors raised inside Ray actors or deployments arrive wrapped in ``RayTaskError``; :func:`find_api_error`
digs the original out so a 404 raised in a SessionBank shard is still a 404 at the ingress.
Never a traceback: unexpected exceptions become a 500 with a short reference the logs carry too.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

logger = logging.getLogger("serve.errors")


class APIError(Exception):
    """Base of every error the API reports on purpose. ``status`` is the HTTP status."""

    status: int = 400
    type: str = "invalid_request_error"

    def __init__(self, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code or self.__class__.__name__
        self.param = param

    def __reduce__(self):  # keep code/param across Ray's pickling
        return (self.__class__, (self.message, self.code, self.param))

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class BadRequest(APIError):
    status = 400


class Unauthorized(APIError):
    """No valid API key (the server has keys). Answered with ``WWW-Authenticate: Bearer``."""

    status = 401
    type = "authentication_error"


class NotFound(APIError):
    status = 404
    type = "not_found_error"


class Conflict(APIError):
    status = 409
    type = "conflict_error"


class Unprocessable(APIError):
    """Well-formed JSON whose values the server cannot use (same status as schema errors)."""

    status = 422


class TooManyRequests(APIError):
    """A quota or concurrency cap of the caller's key (sessions, expensive research calls)."""

    status = 429
    type = "rate_limit_error"


class Busy(APIError):
    status = 503
    type = "service_unavailable"


class StorageUnavailable(APIError):
    """The session store could not make a write durable (disk full, storage down): nothing changed."""

    status = 503
    type = "service_unavailable"


class StateDamaged(APIError):
    """A session's stored data is damaged and cannot be recovered as acknowledged (never guessed)."""

    status = 500
    type = "server_error"


def session_not_found(state_id: str) -> NotFound:
    return NotFound(f"state {state_id!r} not found for this owner; list yours with GET /v1/states "
                    "or create it with POST /v1/states or a generation with create_state=true",
                    code="state_not_found", param="state_id")


def find_api_error(exc: BaseException) -> APIError | None:
    """The APIError behind ``exc``, looking through Ray's RayTaskError wrappers and causes."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        if isinstance(cur, APIError):
            # A RayTaskError dual class is an APIError too, but its str() is a traceback:
            # rebuild a clean instance from the carried fields.
            return _clean(cur)
        cur = getattr(cur, "cause", None) or cur.__cause__
        seen += 1
    return None


def _clean(err: APIError) -> APIError:
    base = next(c for c in type(err).__mro__ if issubclass(c, APIError) and c.__module__ == __name__)
    out = APIError.__new__(base)
    APIError.__init__(out, getattr(err, "message", str(err)), getattr(err, "code", None),
                      getattr(err, "param", None))
    return out


def error_response(err: APIError):
    """The JSON response of ``err`` (401s carry ``WWW-Authenticate: Bearer``, as RFC 6750 asks)."""
    from fastapi.responses import JSONResponse

    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def install_handlers(app) -> None:
    """Register JSON error handlers on a FastAPI app: APIError, request validation (422 with one
    readable line per problem), Starlette HTTP errors (404 for unknown routes...) and the rest."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def api_error(_: Request, exc: APIError):
        return error_response(exc)

    async def validation_error(_: Request, exc: RequestValidationError):
        errors = [describe_validation_error(e) for e in exc.errors()]
        msg = "; ".join(e["msg_full"] for e in errors) or "invalid request"
        first = errors[0]["param"] if errors else None
        body = {"error": {"message": msg, "type": "invalid_request_error", "param": first,
                          "code": "validation_error"},
                "detail": [{"loc": e["loc"], "msg": e["msg"], "type": e["type"]} for e in errors]}
        return JSONResponse(body, status_code=422)

    async def http_error(_: Request, exc: StarletteHTTPException):
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and msg == "Not Found":
            msg = "no such endpoint; see /docs for the API"
        elif exc.status_code == 405:
            msg = f"method not allowed here ({msg}); see /docs for the API"
        body = {"error": {"message": msg, "type": "invalid_request_error", "param": None,
                          "code": exc.status_code}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def unexpected(_: Request, exc: Exception):
        api = find_api_error(exc)
        if api is not None:
            return error_response(api)
        ref = uuid.uuid4().hex[:12]
        logger.exception("unhandled error ref=%s", ref, exc_info=exc)
        body = {"error": {"message": f"internal error (ref {ref}); the server log has the details",
                          "type": "server_error", "param": None, "code": "internal_error"}}
        return JSONResponse(body, status_code=500)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def describe_validation_error(e: dict[str, Any]) -> dict[str, Any]:
    """One pydantic error -> {loc, param, msg, msg_full} with the location as a dotted path."""
    loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    msg = e.get("msg", "invalid value")
    ctx_input = e.get("input")
    typ = e.get("type", "")
    if typ == "missing":
        msg = "field required"
    elif typ == "extra_forbidden":
        msg = "unknown field; remove it (see /docs for the fields this endpoint takes)"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if typ not in ("missing", "extra_forbidden") and ctx_input is not None and not isinstance(ctx_input, (dict, list)):
        shown = repr(ctx_input)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        msg = f"{msg} (got {shown})"
    full = f"{param}: {msg}" if param else msg
    return {"loc": list(e.get("loc", ())), "param": param, "msg": msg, "msg_full": full, "type": typ or "value_error"}
