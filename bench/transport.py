"""The engine process's transport, measured: ZMQ (PUSH/PULL over ipc) against the stdlib's
``multiprocessing.connection`` (a Unix socket), with the real messages of ``adapters/wire.py``.

    python -m bench.transport

Two figures each, between two processes: the round trip of a small command and its reply (what a
``/health`` refresh or a cancellation costs), and a turn's events (one ``wire.Batch`` of 64 token events, as at
batch 64) sent one way, per second. Both are encoded and decoded with the same msgspec code, so the difference
is the transport alone.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import tempfile
import time
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

import zmq

from adapters import wire
from adapters.base import TokenEvent
from bench.harness import bench_parser, write_result

ROUNDS = 2000
BATCHES = 5000


def _batch() -> bytes:
    return wire.encode(wire.Batch(events=[(i, TokenEvent(0, " word", (1234,))) for i in range(64)]))


def _zmq_peer(folder: str) -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"ipc://{folder}/engine")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"ipc://{folder}/front")
    while True:
        data = pull.recv()
        if data == b"stop":
            break
        wire.decode_command(data)
        push.send(data if len(data) < 100 else b"")
    ctx.destroy(linger=1000)


def _zmq(folder: str) -> dict[str, float]:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"ipc://{folder}/front")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"ipc://{folder}/engine")
    peer = mp.get_context("spawn").Process(target=_zmq_peer, args=(folder,))
    peer.start()
    command = wire.encode(wire.ReportWanted(0))
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        push.send(command)
        pull.recv()
        times.append(time.perf_counter() - start)
    batch = _batch()
    sender = ctx.socket(zmq.PUSH)
    sender.connect(f"ipc://{folder}/front")  # events one way: this process to itself's PULL, as engine -> front
    start = time.perf_counter()
    for _ in range(BATCHES):
        sender.send(batch)
        wire.decode_message(pull.recv())
    per_second = BATCHES / (time.perf_counter() - start)
    push.send(b"stop")
    peer.join()
    ctx.destroy(linger=0)
    return {"round_trip_us_median": statistics.median(times) * 1e6, "batches_per_s": per_second}


def _pipe_peer(address: str) -> None:
    with Client(address) as conn:
        while True:
            data = conn.recv_bytes()
            if data == b"stop":
                break
            wire.decode_command(data)
            conn.send_bytes(data)


def _pipe(folder: str) -> dict[str, float]:
    address = f"{folder}/pipe"
    with Listener(address) as listener:
        peer = mp.get_context("spawn").Process(target=_pipe_peer, args=(address,))
        peer.start()
        with listener.accept() as conn:
            command = wire.encode(wire.ReportWanted(0))
            times = []
            for _ in range(ROUNDS):
                start = time.perf_counter()
                conn.send_bytes(command)
                conn.recv_bytes()
                times.append(time.perf_counter() - start)
            conn.send_bytes(b"stop")
        peer.join()
    batch = _batch()
    a, b = mp.Pipe()
    start = time.perf_counter()
    for _ in range(BATCHES):
        a.send_bytes(batch)
        wire.decode_message(b.recv_bytes())
    per_second = BATCHES / (time.perf_counter() - start)
    return {"round_trip_us_median": statistics.median(times) * 1e6, "batches_per_s": per_second}


def main() -> None:
    parser = bench_parser(__doc__)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("zmq ipc (pyzmq)", _zmq), ("multiprocessing.connection", _pipe)):
            folder = Path(tmp) / name.split()[0]
            folder.mkdir()
            row = {"transport": name, **fn(str(folder))}
            print(
                f"{name:28} round trip {row['round_trip_us_median']:7.1f} us, "
                f"{row['batches_per_s']:9.0f} batches of 64 events/s",
                flush=True,
            )
            rows.append(row)
    write_result("transport", args.device, "-", rows, notes=f"{ROUNDS} round trips, {BATCHES} batches", out=args.out)


if __name__ == "__main__":
    main()
