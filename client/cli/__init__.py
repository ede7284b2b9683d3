"""``zkv``: one command for running and using a cluster.

Every option can also be set through an environment variable ``ZKV_<COMMAND>_<OPTION>`` (for
example ``ZKV_BROKER_DATA``, ``ZKV_WORKER_ID``); the client commands read ``ZKV_URL``. ``--help``
names each option's variable and, when it is set, shows its value as the default.

The client commands are here (client/cli/data.py, cluster.py, bench.py); the process launchers
belong to their programs (broker/cli.py, worker/cli.py) and are loaded only when run, as the load
generator is, so that ``zkv get`` imports no broker, worker or benchmark code.
"""

from __future__ import annotations

import importlib
import os

import click

from client.cli import cluster, data, listing, multi
from protocol.logs import configure_logging

LOG_LEVELS = ["debug", "info", "warning", "error", "critical"]

# name -> "module:attribute" of a command imported only when it is run (or listed by --help).
LAZY_COMMANDS = {
    "backup": "client.cli.backup:backup",
    "bench": "client.cli.bench:bench",
    "verify": "client.cli.verify:verify",
    "broker": "broker.cli:broker",
    "gateway": "client.gateway.cli:gateway",
    "keys": "client.cli.keys:keys",
    "restore": "client.cli.backup:restore",
    "worker": "worker.cli:worker",
}


class Group(click.Group):
    """A click group with commands from other packages, imported when needed (click's documented
    lazy-loading pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        where = LAZY_COMMANDS.get(cmd_name)
        if where is None:
            return super().get_command(ctx, cmd_name)
        module, attr = where.split(":")
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command)
        return command

    def resolve_command(self, ctx: click.Context, args: list[str]):  # type: ignore[no-untyped-def]
        """The command to run, its options' help set up by ``show_environment``."""
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and name is not None:
            show_environment(command, f"{ctx.auto_envvar_prefix}_{name.upper().replace('-', '_')}")
        return name, command, rest


def show_environment(command: click.Command, prefix: str) -> None:
    """Make ``--help`` name each option's environment variable and, when the variable is set,
    show its value as the default: that is the value the option takes (click would show the
    built-in default). ``prefix``: the command's ``auto_envvar_prefix`` (``ZKV_BROKER``)."""
    for param in command.params:
        if not isinstance(param, click.Option) or param.hidden or not param.name or param.name == "version":
            continue
        param.show_envvar = True
        if isinstance(param.envvar, str):
            names = [param.envvar]
        elif param.envvar:
            names = list(param.envvar)
        else:
            names = [f"{prefix}_{param.name.upper()}"]
        for name in names:
            if os.environ.get(name):
                param.show_default = f"{os.environ[name]} from {name}"
                break


@click.group(cls=Group, context_settings={"auto_envvar_prefix": "ZKV", "help_option_names": ["-h", "--help"]})
@click.option("--log-json", is_flag=True, help="Log JSON lines instead of key=value.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="info", show_default=True,
              help="Least severe log lines shown.")
@click.version_option(package_name="zkv")
def main(log_json: bool, log_level: str) -> None:
    """zkv: a sharded, replicated key-value store (ZeroMQ broker, LMDB workers)."""
    configure_logging(json=log_json, level=log_level)


show_environment(main, "ZKV")

for _command in (data.put, data.get, data.delete, multi.exists, multi.mget, multi.mset, multi.ttl, multi.expire,
                 listing.scan, listing.watch, cluster.status, cluster.drain, cluster.undrain, cluster.remove,
                 cluster.rebalance, cluster.ping, cluster.reload_keys):
    main.add_command(_command)

__all__ = ["main"]
