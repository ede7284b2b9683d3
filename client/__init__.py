"""The zkv Python client library and the ``zkv`` command line."""

from client.client import Client
from protocol.errors import (
    ErrorCode,
    InternalError,
    InvalidRequest,
    KeyTooLarge,
    NotEnoughReplicas,
    Unavailable,
    UnknownCommand,
    ValueTooLarge,
    ZkvError,
    ZkvTimeout,
)

__all__ = [
    "Client",
    "ErrorCode",
    "InternalError",
    "InvalidRequest",
    "KeyTooLarge",
    "NotEnoughReplicas",
    "Unavailable",
    "UnknownCommand",
    "ValueTooLarge",
    "ZkvError",
    "ZkvTimeout",
]
