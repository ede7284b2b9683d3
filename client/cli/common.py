"""What the ``zkv`` client commands share: the broker URL, credentials and timeout options, the
client they open (after making sure a broker is there), the TTL option's parser, and how a
``ZkvError`` becomes an exit code."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import click

from client.client import Client
from client.probe import CredentialsRefused, first_listening
from client.retry import DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_TIMEOUT
from protocol.curve import CREDENTIALS_ENV, Credentials, KeysError, load_credentials
from protocol.errors import ErrorCode, Unavailable, ZkvError
from protocol.limits import DEFAULT_FRONTEND, MAX_TTL_MS, URL_ENV, split_urls

# Exit codes: 1 generic failure, 2 usage (click), 3 not found, 4 not enough replicas,
# 5 timeout or unavailable, 6 a compare-and-set whose condition did not hold, 7 forbidden (the
# credentials' role does not allow it, or the broker refused the key), 130 interrupted.
EXIT_NOT_FOUND = 3
EXIT_CODES = {ErrorCode.NOT_ENOUGH_REPLICAS: 4, ErrorCode.TIMEOUT: 5, ErrorCode.UNAVAILABLE: 5,
              ErrorCode.CONDITION_FAILED: 6, ErrorCode.FORBIDDEN: 7}
CREDENTIALS_META = "zkv.credentials"  # where --credentials keeps its value (click's ctx.meta)


class ZkvCommandError(click.ClickException):
    def __init__(self, err: ZkvError) -> None:
        super().__init__(f"{err.code.value}: {err}")
        self.exit_code = EXIT_CODES.get(err.code, 1)


class NoBroker(click.ClickException):
    exit_code = EXIT_CODES[ErrorCode.UNAVAILABLE]


class KeyRefused(click.ClickException):
    exit_code = EXIT_CODES[ErrorCode.FORBIDDEN]


def credentials() -> Credentials | None:
    """The credentials the running command was given (--credentials, ZKV_CREDENTIALS), loaded."""
    ctx = click.get_current_context(silent=True)
    path = ctx.find_root().meta.get(CREDENTIALS_META) if ctx is not None else None
    if not path:
        return None
    try:
        return load_credentials(path)
    except KeysError as e:
        raise click.ClickException(str(e)) from None


def connect(url: str, timeout: float, need_cluster: bool = True) -> Client:
    """A client of the broker at ``url`` (or of several brokers, comma-separated: it starts at the
    first that listens and follows the leader); fails within about a second (a second per URL)
    if no broker listens there (a request would wait for its whole timeout) and, with
    ``need_cluster``, at once if the broker's cluster has not formed (the client would resend the
    broker's UNAVAILABLE until ``timeout``). Commands that work before the cluster forms (status,
    admin) pass False."""
    creds = credentials()
    there = probe(url, min(timeout, 1.0), creds)
    client = Client(url, timeout=timeout, attempt_timeout=min(timeout, DEFAULT_ATTEMPT_TIMEOUT), credentials=creds)
    client.brokers.start_at(there)
    if need_cluster:
        try:
            _require_cluster(client)
        except BaseException:
            client.close()
            raise
    return client


def probe(url: str, wait: float, creds: Credentials | None) -> str:
    """Fail at once, in one line, if no broker listens at ``url`` (at any of them, for a
    comma-separated list) or it refuses ``creds``; else the URL where one listens."""
    urls = split_urls(url)
    try:
        there = first_listening(urls, wait, credentials=creds)
    except CredentialsRefused as e:
        who = "these credentials" if creds else "a client without credentials"
        raise KeyRefused(f"the broker at {url} refused {who} ({e}): {CREDENTIALS_ENV}, --credentials") from None
    if there is None:
        where = url if len(urls) == 1 else "any of " + ", ".join(urls)
        raise NoBroker(f"no broker at {where}: is it running? ({URL_ENV}, --url)")
    return there


def _require_cluster(client: Client) -> None:
    for _ in range(len(client.brokers.urls) + 1):
        if client.service_available(wait=min(client.timeout, 2.0)):
            return
        try:
            st = client.status()
        except ZkvError as e:
            raise ZkvCommandError(e) from None
        if st.get("role") != "standby":
            break
        # A standby (etcd mode) serves nothing: check the leader it names; without one, the
        # request itself finds the leader (it follows NOT_LEADER, within its timeout).
        if not st.get("leader") or not client.brokers.follow(st["leader"]):
            return
    else:
        return
    if not st["formed"]:
        registered = len(st["workers"])
        raise ZkvCommandError(Unavailable(
            f"cluster not formed: {registered} worker{'s' * (registered != 1)} registered, at least {st['rf']} "
            "needed (zkv status)"))
    # Formed but not serving (no worker alive yet, as just after a broker restart): the request
    # itself says why, after the client's retries.


_url_option: Callable[[Any], Any] = click.option(
    "--url", default=DEFAULT_FRONTEND, show_default=True, envvar=URL_ENV,
    help="Broker frontend, or several brokers' comma-separated (etcd mode: the leader is found and followed).")


def _keep_credentials(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    ctx.find_root().meta[CREDENTIALS_META] = value
    return value


_credentials_option: Callable[[Any], Any] = click.option(
    "--credentials", envvar=CREDENTIALS_ENV, type=click.Path(dir_okay=False), expose_value=False,
    callback=_keep_credentials, help="Client credentials file (zkv keys add-client) for a broker with --keys.")


def url_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """--url and --credentials: where the broker is and who connects (``credentials()``)."""
    return _url_option(_credentials_option(f))

timeout_option: Callable[[Any], Any] = click.option(
    "--timeout", default=DEFAULT_TIMEOUT, show_default=True, help="Seconds, retries included.")



# -- durations -------------------------------------------------------------------------------------

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?")


class DurationMs(click.ParamType):
    """A duration given as ``250ms``, ``60s``, ``5m``, ``1h``, ``1d`` (fractions allowed:
    ``1.5s``) or a bare number of milliseconds; converted to whole milliseconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        m = _DURATION.fullmatch(str(value).strip())
        if m is None:
            self.fail(f"{value!r} is not a duration (250ms, 60s, 5m, 1h, 1d, or milliseconds)", param, ctx)
        ms = round(float(m.group(1)) * _UNITS_MS[m.group(2) or "ms"])
        if not 1 <= ms <= MAX_TTL_MS:
            self.fail(f"{value!r} is out of range (1 ms to 100 years)", param, ctx)
        return ms


TTL = DurationMs()
TTL_HELP = "Time to live: 250ms, 60s, 5m, 1h, 1d, or a number of milliseconds."
