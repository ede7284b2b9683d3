"""zkv errors as HTTP answers: one status per code, a JSON body with the code and the message, and
``Retry-After`` where trying again later is the remedy."""

from __future__ import annotations

from aiohttp import web

from protocol.errors import RETRYABLE, ErrorCode, ZkvError

STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNKNOWN_COMMAND: 400,
    ErrorCode.KEY_TOO_LARGE: 400,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONDITION_FAILED: 412,
    ErrorCode.VALUE_TOO_LARGE: 413,
    ErrorCode.STREAM_INCOMPLETE: 409,
    ErrorCode.VALUE_CHANGED: 409,
    ErrorCode.NOT_ENOUGH_REPLICAS: 503,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.NOT_LEADER: 503,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.INTERNAL: 500,
}
RETRY_AFTER_S = 1


def problem(status: int, code: str, message: str, **extra: object) -> web.Response:
    """An error answer: ``{"code": ..., "message": ...}`` (and ``extra``) with ``status``."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return web.json_response({"code": code, "message": message, **extra}, status=status, headers=headers)


def from_error(e: ZkvError) -> web.Response:
    """The answer to a request the cluster refused (or did not answer: TIMEOUT, 504)."""
    status = STATUS.get(e.code, 500)
    if status == 500 and e.code in RETRYABLE:
        status = 503
    extra: dict[str, object] = {}
    version = getattr(e, "version", None)
    if e.code == ErrorCode.CONDITION_FAILED:
        extra["version"] = version
    return problem(status, e.code.value, str(e) or e.code.value, **extra)


def bad_request(message: str) -> web.Response:
    return problem(400, ErrorCode.BAD_REQUEST.value, message)
