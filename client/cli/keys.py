"""``zkv keys``: the cluster's CURVE key directory (protocol/curve.py has its layout).

``init`` makes the broker's key pair and an admin client; ``add-worker`` and ``add-client`` make
one credentials file each (all a worker or a client needs); ``revoke`` deletes one. The broker
rereads the directory on SIGHUP or ``zkv reload-keys``: copy ``public/`` to the broker's machine
first when the directory lives elsewhere (docs/operations.md "Keys").
"""

from __future__ import annotations

from pathlib import Path

import click

from protocol import curve

DIR = click.argument("directory", type=click.Path(file_okay=False, path_type=Path))


def _run(action, *args):  # type: ignore[no-untyped-def]
    try:
        return action(*args)
    except curve.KeysError as e:
        raise click.ClickException(str(e)) from None


@click.group()
def keys() -> None:
    """Manage the cluster's CURVE keys (zkv broker --keys DIR)."""


@keys.command()
@DIR
def init(directory: Path) -> None:
    """Make DIRECTORY: the broker's key pair and an admin client."""
    admin = _run(curve.init, directory)
    click.echo(f"broker key pair: {directory / curve.BROKER_SECRET} (run zkv broker --keys {directory})")
    click.echo(f"admin client:    {admin} (zkv status --credentials {admin})")


@keys.command("add-worker")
@DIR
@click.argument("worker_id")
def add_worker(directory: Path, worker_id: str) -> None:
    """Register worker WORKER_ID; prints its credentials file (zkv worker --credentials)."""
    click.echo(_run(curve.add, directory, curve.WORKER, worker_id))


@keys.command("add-client")
@DIR
@click.argument("name")
@click.option("--role", type=click.Choice(curve.ROLES), default="write", show_default=True,
              help="read: get, exists, mget, ttl, scan, watch; write: also every write; admin: also the cluster.")
def add_client(directory: Path, name: str, role: str) -> None:
    """Register client NAME; prints its credentials file (--credentials, ZKV_CREDENTIALS)."""
    click.echo(_run(curve.add, directory, curve.CLIENT, name, role))


@keys.command()
@DIR
@click.argument("name")
def revoke(directory: Path, name: str) -> None:
    """Unregister worker or client NAME (then SIGHUP the broker, or zkv reload-keys)."""
    removed = _run(curve.revoke, directory, name)
    if not removed:
        raise click.ClickException(f"no worker or client {name!r} in {directory}")
    for p in removed:
        click.echo(f"removed {p}")


@keys.command("list")
@DIR
def list_(directory: Path) -> None:
    """Every registered worker and client."""
    for peer in _run(curve.listing, directory):
        click.echo(f"{peer.kind}\t{peer.name}\t{peer.role or '-'}\t{peer.public.decode()}")
