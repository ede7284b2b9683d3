"""Error codes carried in error replies, and the exception tree the client raises.

Every error reply's header has ``ok: false``, a ``code`` from ``ErrorCode`` and a
human ``message``. The client maps each code to one exception class.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    BAD_REQUEST = "BAD_REQUEST"  # malformed frames, wrong types, missing fields
    UNKNOWN_COMMAND = "UNKNOWN_COMMAND"  # op the broker does not know
    KEY_TOO_LARGE = "KEY_TOO_LARGE"
    VALUE_TOO_LARGE = "VALUE_TOO_LARGE"
    NOT_ENOUGH_REPLICAS = "NOT_ENOUGH_REPLICAS"  # fewer than W live replicas: nothing was written
    TIMEOUT = "TIMEOUT"  # outcome unknown: the write may or may not have been applied
    UNAVAILABLE = "UNAVAILABLE"  # cluster not formed yet, or slot recovering; retry later
    CONDITION_FAILED = "CONDITION_FAILED"  # if_version / if_absent did not hold: nothing written
    NOT_FOUND = "NOT_FOUND"  # the key does not exist (for calls that need one, like ttl)
    STREAM_INCOMPLETE = "STREAM_INCOMPLETE"  # a streamed value's commit found chunks missing: nothing written
    VALUE_CHANGED = "VALUE_CHANGED"  # a streamed value was replaced or deleted while being read
    INTERNAL = "INTERNAL"


# Codes after which repeating the same request (same client id and request number) is safe
# and may succeed.
RETRYABLE = frozenset({ErrorCode.TIMEOUT, ErrorCode.UNAVAILABLE, ErrorCode.NOT_ENOUGH_REPLICAS})


class ZkvError(Exception):
    """Base class of every error zkv raises."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str = "", code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE


class InvalidRequest(ZkvError):
    """The request was malformed or out of limits; retrying it will not help."""

    code = ErrorCode.BAD_REQUEST


class UnknownCommand(InvalidRequest):
    code = ErrorCode.UNKNOWN_COMMAND


class KeyTooLarge(InvalidRequest):
    code = ErrorCode.KEY_TOO_LARGE


class ValueTooLarge(InvalidRequest):
    code = ErrorCode.VALUE_TOO_LARGE


class NotEnoughReplicas(ZkvError):
    """Fewer than W replicas of the key's slot are alive; the write was not applied."""

    code = ErrorCode.NOT_ENOUGH_REPLICAS


class Unavailable(ZkvError):
    """The cluster cannot serve this key right now (not formed yet, or recovering)."""

    code = ErrorCode.UNAVAILABLE


class ZkvTimeout(ZkvError):
    """No answer in time. For a write the outcome is unknown; a retry is applied at most once."""

    code = ErrorCode.TIMEOUT


class ConditionFailed(ZkvError):
    """A compare-and-set did not hold; nothing was written. ``version`` is the key's current
    version (None if it does not exist)."""

    code = ErrorCode.CONDITION_FAILED

    def __init__(self, message: str = "", code: ErrorCode | None = None, version: int | None = None) -> None:
        super().__init__(message, code)
        self.version = version


class KeyNotFound(ZkvError):
    code = ErrorCode.NOT_FOUND


class StreamIncomplete(InvalidRequest):
    """A streamed put's commit did not find every chunk it names (the stream was aborted, for
    instance after being idle too long); nothing was written. Send the value again."""

    code = ErrorCode.STREAM_INCOMPLETE


class ValueChanged(ZkvError):
    """The streamed value being read was replaced or deleted meanwhile; read it again."""

    code = ErrorCode.VALUE_CHANGED


class InternalError(ZkvError):
    code = ErrorCode.INTERNAL


_BY_CODE: dict[ErrorCode, type[ZkvError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        UnknownCommand,
        KeyTooLarge,
        ValueTooLarge,
        NotEnoughReplicas,
        Unavailable,
        ZkvTimeout,
        ConditionFailed,
        KeyNotFound,
        StreamIncomplete,
        ValueChanged,
        InternalError,
    )
}


def error_from_reply(code: str, message: str) -> ZkvError:
    """The exception for an error reply; unknown codes (a newer broker) map to ZkvError."""
    try:
        ec = ErrorCode(code)
    except ValueError:
        return ZkvError(f"{code}: {message}")
    return _BY_CODE.get(ec, ZkvError)(message, ec)
