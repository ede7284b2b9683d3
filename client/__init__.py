"""The zkv Python client library and the ``zkv`` command line."""

from client.aio import AsyncClient
from client.client import Client
from client.commands import ScanItem, ScanPage, WatchEvent
from protocol.errors import (
    ConditionFailed,
    ErrorCode,
    InternalError,
    InvalidRequest,
    KeyNotFound,
    KeyTooLarge,
    NotEnoughReplicas,
    StreamIncomplete,
    Unavailable,
    UnknownCommand,
    ValueChanged,
    ValueTooLarge,
    ZkvError,
    ZkvTimeout,
)

__all__ = [
    "AsyncClient",
    "Client",
    "ConditionFailed",
    "ErrorCode",
    "InternalError",
    "InvalidRequest",
    "KeyNotFound",
    "KeyTooLarge",
    "NotEnoughReplicas",
    "StreamIncomplete",
    "Unavailable",
    "UnknownCommand",
    "ValueChanged",
    "ValueTooLarge",
    "ScanItem",
    "ScanPage",
    "WatchEvent",
    "ZkvError",
    "ZkvTimeout",
]
