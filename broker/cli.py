"""``zkv broker``: the broker's command-line options, and the broker configuration built from them.

The ``zkv`` group (client/cli/) loads this module only when the command is run. Every default is
BrokerConfig's (broker/state.py), so there is one definition of each.

Protected mode: without a key directory (``--keys``), anyone who reaches a port reads, writes and
administers everything, so the broker listens on loopback only unless told ``--insecure``.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import click

from broker.leadership import LeaseRules
from broker.state import BrokerConfig
from protocol.limits import DEFAULT_BACKEND, DEFAULT_FRONTEND, DEFAULT_REPLICATION, split_urls
from protocol.metrics import host_port
from protocol.sockets import loopback

MIB = 1024 * 1024
D = BrokerConfig()


@click.command()
@click.option("--data", default="./data/broker", show_default=True, help="Metadata directory (LMDB).")
@click.option("--frontend", default=DEFAULT_FRONTEND, show_default=True, help="Clients connect here.")
@click.option("--backend", default=DEFAULT_BACKEND, show_default=True, help="Workers connect here.")
@click.option("--replication", default=DEFAULT_REPLICATION, show_default=True,
              help="Replication PUB endpoint.")
@click.option("--keys", default="", type=click.Path(file_okay=False),
              help="Key directory (zkv keys init): CURVE encryption and authentication on every socket.")
@click.option("--insecure", is_flag=True,
              help="Without --keys, listen beyond loopback anyway (anyone who reaches a port may do anything).")
@click.option("--slots", default=D.slots, show_default=True, help="Hash slots (fixed when the cluster forms).")
@click.option("--rf", default=D.rf, show_default=True, help="Replicas per slot.")
@click.option("-w", "--write-quorum", "w", default=D.w, show_default=True,
              help="Replicas that must have a write on disk before it is acknowledged.")
@click.option("--heartbeat", default=D.heartbeat, show_default=True, help="Heartbeat interval, seconds.")
@click.option("--request-timeout", default=D.request_timeout, show_default=True,
              help="Seconds before a request times out.")
@click.option("--max-value", default=D.max_value, show_default=True,
              help="Largest value sent in one request (put, mset), bytes.")
@click.option("--max-stream", default=D.max_stream, show_default=True,
              help="Largest streamed value (put_stream, zkv put --file), bytes.")
@click.option("--stream-idle", default=D.stream_idle, show_default=True,
              help="Seconds without a chunk before an unfinished streamed put is aborted and its chunks freed.")
@click.option("--max-streams", default=D.max_streams, show_default=True,
              help="Streamed puts open at once in the whole cluster; a new one past it is refused (UNAVAILABLE).")
@click.option("--max-client-streams", default=D.max_client_streams, show_default=True,
              help="Streamed puts one client connection may have open at once.")
@click.option("--max-client-bytes", default=D.max_client_bytes // MIB, show_default=True,
              help="MiB of replies a client has not read that the broker holds for it; past it, "
                   "its replies are refused (UNAVAILABLE) until it reads.")
@click.option("--grace", default=D.grace, show_default=True,
              help="Seconds a dead worker keeps its slots before they get new replicas.")
@click.option("--initial-workers", default=D.initial_workers, show_default=True,
              help="Workers to wait for before the cluster forms (at least RF).")
@click.option("--auto-rebalance/--no-auto-rebalance", default=D.auto_rebalance, show_default=True,
              help="Move slots to joining workers without waiting for `zkv rebalance`.")
@click.option("--move-concurrency", default=D.move_concurrency, show_default=True, help="Slot moves in flight at once.")
@click.option("--copy-rate", default=D.copy_rate // MIB, show_default=True,
              help="MiB/s of snapshot data relayed for moves and repairs (the throttle).")
@click.option("--read-cache", default=D.read_cache // MIB, show_default=True,
              help="MiB of recently read values the leader keeps to answer reads without a replica "
                   "(linearizable: every write drops what it changes); 0: none.")
@click.option("--read-lease", default=D.read_lease, show_default=True,
              help="Seconds of a read lease: one replica of each slot (a worker started with --reads) "
                   "answers its reads without the broker, and writes of the slot wait for it; 0: off. "
                   "Not with --keys or --groups.")
@click.option("--etcd", default="",
              help="etcd client URLs, comma-separated: etcd mode (standby brokers, leader by lease, "
                   "metadata in etcd). Empty: the embedded default (one broker, metadata in --data).")
@click.option("--etcd-prefix", default="/zkv/", show_default=True, help="etcd key prefix of this cluster.")
@click.option("--name", default="", help="This broker's name among the brokers (default: host:frontend port).")
@click.option("--lease-ttl", default=LeaseRules().ttl, show_default=True,
              help="Seconds of the leader's etcd lease; a dead leader is replaced within about this.")
@click.option("--advertise", default="",
              help="Host that other machines reach this broker at, in the leader key (default: the bound host).")
@click.option("--metrics", default="", metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (default: none).")
@click.option("--groups", default=1, show_default=True,
              help="etcd mode: slot groups, each led by one of the live brokers (active brokers); "
                   "1: one leader, the others stand by. Every broker of a cluster gives the same.")
def broker(data: str, frontend: str, backend: str, replication: str, keys: str, insecure: bool, slots: int,
           rf: int, w: int,
           heartbeat: float, request_timeout: float, max_value: int, max_stream: int, stream_idle: float,
           max_streams: int, max_client_streams: int, max_client_bytes: int, grace: float, initial_workers: int,
           auto_rebalance: bool, move_concurrency: int, copy_rate: int, read_cache: int, read_lease: float, etcd: str,
           etcd_prefix: str,
           name: str,
           lease_ttl: int, advertise: str, metrics: str, groups: int) -> None:
    """Run the broker (the master). With --etcd, any number of brokers share one cluster: one
    leads, the others stand by and take over when its lease lapses."""
    from broker.endpoints import BindError, BrokerEndpoints
    from broker.etcd import ClusterShapeError
    from broker.server import BrokerServerConfig, run_broker
    from protocol.curve import KeysError

    if not 1 <= w <= rf:
        raise click.BadParameter("need 1 <= W <= RF", param_hint="-w")
    if not keys and not insecure:
        for role, endpoint in (("frontend", frontend), ("backend", backend), ("replication", replication)):
            if not loopback(endpoint):
                raise click.ClickException(
                    f"refusing to listen on {endpoint} ({role}) without --keys: anyone who reaches it could read, "
                    "write and administer every key; give --keys DIR (zkv keys init DIR), a loopback address, "
                    "or --insecure")
    if metrics:
        try:
            host_port(metrics)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--metrics") from None
    try:
        etcd_urls = split_urls(etcd) if etcd else []
        rules = LeaseRules(ttl=lease_ttl)
        rules.check()
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--etcd" if "endpoint" in str(e) else "--lease-ttl") from None
    if groups != 1 and not etcd_urls:
        raise click.BadParameter("slot groups need etcd mode (--etcd)", param_hint="--groups")
    if not 1 <= groups <= slots:
        raise click.BadParameter(f"need 1 <= groups <= slots ({slots})", param_hint="--groups")
    if read_lease < 0:
        raise click.BadParameter("must be >= 0", param_hint="--read-lease")
    if read_lease and read_lease >= (request_timeout or D.request_timeout):
        # A starting broker commits nothing for a lease time: every write would time out meanwhile.
        raise click.BadParameter("must be below --request-timeout", param_hint="--read-lease")
    if read_lease and (keys or groups != 1):
        # Reads endpoints have no CURVE, and each group's leader would need its own lease map.
        raise click.BadParameter("read leases work with one leader and without --keys (for now)",
                                 param_hint="--read-lease")
    adv = None
    if advertise:
        adv = BrokerEndpoints(*(with_host(u, advertise) for u in (frontend, backend, replication)))
    cfg = BrokerServerConfig(
        data_dir=data, keys=keys, etcd=etcd_urls, etcd_prefix=etcd_prefix, name=name, lease=rules, advertise=adv,
        metrics=metrics, groups=groups,
        endpoints=BrokerEndpoints(frontend, backend, replication),
        core=BrokerConfig(slots=slots, rf=rf, w=w, heartbeat=heartbeat, request_timeout=request_timeout,
                          max_value=max_value, max_stream=max_stream, stream_idle=stream_idle,
                          max_streams=max_streams, max_client_streams=max_client_streams,
                          max_client_bytes=max_client_bytes * MIB,
                          grace=grace, initial_workers=initial_workers,
                          auto_rebalance=auto_rebalance, move_concurrency=move_concurrency,
                          copy_rate=copy_rate * MIB, read_cache=read_cache * MIB,
                          read_lease=read_lease),
    )
    try:
        run_broker(cfg)
    except BindError as e:
        # One line, not a traceback: what is wrong and which option changes it.
        raise click.ClickException(f"{e}; choose another with --{e.role} (ZKV_BROKER_{e.role.upper()})") from None
    except KeysError as e:
        raise click.ClickException(f"--keys {keys}: {e}") from None
    except ClusterShapeError as e:
        raise click.ClickException(str(e)) from None


def with_host(endpoint: str, host: str) -> str:
    """``endpoint`` with its host replaced: tcp://*:5555 and host h -> tcp://h:5555."""
    parts = urlsplit(endpoint)
    return f"{parts.scheme}://{host}:{parts.port}" if parts.port else endpoint
