"""Error codes carried in error replies, and the exception tree the client raises.

Every error reply's header has ``ok: false``, a ``code`` from ``ErrorCode`` and a
human ``message``. The client maps each code to one exception class.

The tree is typed by fault, as redis-py's is (``ConnectionError``/``TimeoutError`` apart from
``ResponseError``)::

    ZkvError
    +-- TransportError          no usable reply reached the client: raised by the client itself
    |   +-- NoReply             nothing within the client's timeout (also a ZkvTimeout)
    |   +-- ClientClosed        a call on a closed client
    +-- ResponseError           the broker answered with an error code (or would have: the client
        |                       checks a few things itself before sending and raises the same class)
        +-- InvalidRequest      -> UnknownCommand, KeyTooLarge, ValueTooLarge, StreamIncomplete
        +-- NotEnoughReplicas, Unavailable, ConditionFailed, KeyNotFound, ValueChanged, InternalError
        +-- Forbidden           the client's key does not have the role the request needs
        +-- NotLeader           a standby broker answered: ``leader`` is where to go (or None)
        +-- BrokerTimeout       the broker's request timeout expired (also a ZkvTimeout)

``ZkvTimeout`` (the outcome of a write is unknown) is caught as before for both kinds of timeout.
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
    FORBIDDEN = "FORBIDDEN"  # the client's key lacks the role the request needs (or was revoked)
    # A standby broker (etcd mode): it does not serve; the reply's ``leader`` names the leader's
    # frontend when it knows one. Nothing was done: send the same request there.
    NOT_LEADER = "NOT_LEADER"
    # A worker's reads endpoint cannot answer this read linearizably now (no read lease on the
    # slot, a TTL or streamed value, held too long): send the same read to the broker.
    NOT_LEASED = "NOT_LEASED"
    INTERNAL = "INTERNAL"


# Codes after which repeating the same request (same client id and request number) is safe
# and may succeed (docs/protocol.md §1.4, §1.6): ``ZkvError.retryable``.
RETRYABLE = frozenset({ErrorCode.TIMEOUT, ErrorCode.UNAVAILABLE, ErrorCode.NOT_ENOUGH_REPLICAS,
                       ErrorCode.NOT_LEADER})

# The part of RETRYABLE that the zkv clients resend by themselves (with backoff, until their
# ``timeout``): ``ZkvError.retried``. NOT_ENOUGH_REPLICAS is left out on purpose, since the first
# client (it resent on TIMEOUT and UNAVAILABLE only): the broker refuses such a write at once and
# nothing is written, a definite failure the caller must learn at once (README "fail at once with
# NotEnoughReplicas"; tests/test_core_faults.py wants it in under a second, `zkv put` exits 4;
# tests/workload.py counts it as certainly not applied). Resending it would turn that fast, definite
# "no" into a wait of up to ``timeout`` seconds. The caller may resend it, once replicas are back.
RETRIED = RETRYABLE - {ErrorCode.NOT_ENOUGH_REPLICAS}


class ZkvError(Exception):
    """Base class of every error zkv raises."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str = "", code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def retryable(self) -> bool:
        """Sending the same request again is safe and may succeed."""
        return self.code in RETRYABLE

    @property
    def retried(self) -> bool:
        """The client resends the request itself after this error (until its timeout runs out)."""
        return self.code in RETRIED


class TransportError(ZkvError):
    """No usable reply reached the client (nothing in time, or its socket is unusable). Raised by
    the client itself, never sent by a broker; the request may or may not have been applied."""


class ResponseError(ZkvError):
    """The broker answered the request with an error reply; ``code`` says which. The client checks
    a few of these itself before sending (key types, a value over the broker's limit, chunks
    missing from a streamed read) and raises the class the broker would have answered with."""


class InvalidRequest(ResponseError):
    """The request was malformed or out of limits; retrying it will not help."""

    code = ErrorCode.BAD_REQUEST


class UnknownCommand(InvalidRequest):
    code = ErrorCode.UNKNOWN_COMMAND


class KeyTooLarge(InvalidRequest):
    code = ErrorCode.KEY_TOO_LARGE


class ValueTooLarge(InvalidRequest):
    code = ErrorCode.VALUE_TOO_LARGE


class NotEnoughReplicas(ResponseError):
    """Fewer than W replicas of the key's slot are alive; the write was not applied."""

    code = ErrorCode.NOT_ENOUGH_REPLICAS


class Unavailable(ResponseError):
    """The cluster cannot serve this key right now (not formed yet, or recovering)."""

    code = ErrorCode.UNAVAILABLE


class ZkvTimeout(ZkvError):
    """No answer in time. For a write the outcome is unknown; a retry is applied at most once.
    Raised as ``NoReply`` (the client heard nothing) or ``BrokerTimeout`` (the broker said so)."""

    code = ErrorCode.TIMEOUT


class NoReply(ZkvTimeout, TransportError):
    """Nothing came back within the client's ``timeout`` (every attempt included)."""


class BrokerTimeout(ZkvTimeout, ResponseError):
    """A TIMEOUT reply: the broker's request timeout expired (a write had no W acknowledgements in
    time, or a read no answer)."""


class ClientClosed(TransportError):
    """A call on a client (or stream) that was closed."""


class ConditionFailed(ResponseError):
    """A compare-and-set did not hold; nothing was written. ``version`` is the key's current
    version (None if it does not exist)."""

    code = ErrorCode.CONDITION_FAILED

    def __init__(self, message: str = "", code: ErrorCode | None = None, version: int | None = None) -> None:
        super().__init__(message, code)
        self.version = version


class KeyNotFound(ResponseError):
    code = ErrorCode.NOT_FOUND


class StreamIncomplete(InvalidRequest):
    """A streamed put's commit did not find every chunk it names (the stream was aborted, for
    instance after being idle too long); nothing was written. Send the value again."""

    code = ErrorCode.STREAM_INCOMPLETE


class ValueChanged(ResponseError):
    """The streamed value being read was replaced or deleted meanwhile; read it again."""

    code = ErrorCode.VALUE_CHANGED


class Forbidden(ResponseError):
    """The client's key does not have the role this request needs (read, write, admin), or it
    was revoked; the message names the role needed. Not retryable: nothing was done."""

    code = ErrorCode.FORBIDDEN


class NotLeader(ResponseError):
    """A standby broker answered (etcd mode): nothing was done. ``leader`` is the leading broker's
    frontend if the standby knows it. The clients go there (or to the next broker) by themselves."""

    code = ErrorCode.NOT_LEADER

    def __init__(self, message: str = "", code: ErrorCode | None = None, leader: str | None = None) -> None:
        super().__init__(message, code)
        self.leader = leader


class InternalError(ResponseError):
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
        BrokerTimeout,
        ConditionFailed,
        KeyNotFound,
        StreamIncomplete,
        ValueChanged,
        Forbidden,
        NotLeader,
        InternalError,
    )
}


def error_from_reply(code: str, message: str) -> ZkvError:
    """The exception for an error reply; unknown codes (a newer broker) map to ResponseError."""
    try:
        ec = ErrorCode(code)
    except ValueError:
        return ResponseError(f"{code}: {message}")
    return _BY_CODE.get(ec, ResponseError)(message, ec)
