"""The zkv Python client library: ``Client`` (sync) and ``AsyncClient`` (asyncio), the same methods.

Importing it loads no broker, worker or command-line code; the ``zkv`` command line lives in
``client.cli`` (tests/test_client_imports.py holds that).
"""

from client.aio import AsyncClient, AsyncValueStream
from client.client import Client
from client.commands import ScanItem, ScanPage, StreamInfo
from client.streams import ValueStream
from client.watch import WatchEvent
from client.watch_streams import AsyncWatchStream, WatchStream
from protocol.errors import (
    RETRIED,
    RETRYABLE,
    BrokerTimeout,
    ClientClosed,
    ConditionFailed,
    ErrorCode,
    Forbidden,
    InternalError,
    InvalidRequest,
    KeyNotFound,
    KeyTooLarge,
    NoReply,
    NotEnoughReplicas,
    ResponseError,
    StreamIncomplete,
    TransportError,
    Unavailable,
    UnknownCommand,
    ValueChanged,
    ValueTooLarge,
    ZkvError,
    ZkvTimeout,
)

__all__ = [
    "RETRIED",
    "RETRYABLE",
    "AsyncClient",
    "AsyncValueStream",
    "AsyncWatchStream",
    "BrokerTimeout",
    "Client",
    "ClientClosed",
    "ConditionFailed",
    "ErrorCode",
    "Forbidden",
    "InternalError",
    "InvalidRequest",
    "KeyNotFound",
    "KeyTooLarge",
    "NoReply",
    "NotEnoughReplicas",
    "ResponseError",
    "ScanItem",
    "ScanPage",
    "StreamIncomplete",
    "StreamInfo",
    "TransportError",
    "Unavailable",
    "UnknownCommand",
    "ValueChanged",
    "ValueStream",
    "ValueTooLarge",
    "WatchEvent",
    "WatchStream",
    "ZkvError",
    "ZkvTimeout",
]
