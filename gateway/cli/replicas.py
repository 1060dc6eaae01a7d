"""``mlx-gateway replicas``: several gateway processes behind HAProxy on this machine, one command."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType

import click

from gateway.logs import setup_logging
from gateway.replicas.supervisor import ReplicaSet, ReplicaSetError

__all__ = ["replicas"]


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("-n", "--replicas", "count", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="The address HAProxy listens on.")
@click.option("--port", type=int, default=8000, show_default=True, help="The port HAProxy listens on.")
@click.option(
    "--first-port", type=int, help="Replicas listen on 127.0.0.1, ports from this one up (default --port + 1)."
)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where haproxy.cfg, replicas.json and the logs go (default ~/.cache/mlx-gateway/replicas-PORT).",
)
@click.option("--haproxy", default="haproxy", show_default=True, help="The HAProxy binary (2.6 or newer).")
@click.option(
    "--cached-balance",
    type=click.Choice(["hash", "roundrobin"]),
    default="hash",
    show_default=True,
    help="hash: a cache's requests go to one replica (affinity); roundrobin: for comparison.",
)
@click.argument("serve_args", nargs=-1, type=click.UNPROCESSED)
def replicas(
    count: int,
    host: str,
    port: int,
    first_port: int | None,
    run_dir: Path | None,
    haproxy: str,
    cached_balance: str,
    serve_args: tuple[str, ...],
) -> int:
    """Start N `mlx-gateway serve` processes and HAProxy in front of them; SERVE_ARGS (after --) go to each.

    The replicas share one prefix-cache directory (--cache-dir or MLX_GATEWAY_CACHE_DIR, the same for all);
    a cache created, replaced or deleted through one is seen by the others within a second. A replica that
    exits is started again; SIGTERM or Ctrl-C drains them all, then stops HAProxy.
    """
    setup_logging("info", "text")
    folder = run_dir or Path.home() / ".cache" / "mlx-gateway" / f"replicas-{port}"
    balance = "roundrobin" if cached_balance == "roundrobin" else "hash"
    replica_set = ReplicaSet(
        count, host, port, first_port or port + 1, folder, list(serve_args), haproxy=haproxy, cached_balance=balance
    )

    def stop(_signum: int, _frame: FrameType | None) -> None:
        replica_set.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        replica_set.start()
    except ReplicaSetError as exc:
        click.echo(f"mlx-gateway: {exc}", err=True)
        return 2
    click.echo(f"mlx-gateway: {count} replicas behind http://{host}:{port}/v1 (logs in {folder})", err=True)
    return replica_set.supervise()
