"""Round trip of a 4 KiB page GET over loopback mutual TLS, against a TLS floor.

Ours: :class:`hypervisor.node.client.PeerClient` (uvloop) fetching one 4 KiB blob
from a page namespace of a real ``omega node serve`` process, one request at a
time (QD1), then with 32 requests in flight (throughput).

Anchor, in the same run: two Python processes doing the same exchange (a
28-byte request, a 4124-byte answer) over blocking ``ssl`` sockets with the same
certificates and TLS 1.3 — the cost of Python + OpenSSL + loopback TCP with no
protocol, no event loop and no store. A raw TCP ping-pong of the same sizes is
shown too. Rounds alternate (anchor, ours, ours, anchor, ...); reported: p50/p99
per side over all rounds and the ratio of the p50s.

Usage::

    .venv/bin/python benchmarks/peer_get.py [--rounds 6] [--requests 3000] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hypervisor.config import Config  # noqa: E402
from hypervisor.node import wire  # noqa: E402
from hypervisor.node.client import PeerClient  # noqa: E402
from hypervisor.node.serve import NodeOptions, NodeProcess, new_event_loop  # noqa: E402
from hypervisor.node.wire import Namespace  # noqa: E402
from hypervisor.security import (  # noqa: E402
    ClusterCA,
    client_ssl_context,
    issue_node_cert,
    server_ssl_context,
)

PORT_NODE, PORT_TLS, PORT_TCP = 19397, 19398, 19399
NS = Namespace.page("bench-vm")
REQUEST = wire.encode_request(1, wire.Get(NS, 1))
ANSWER_SIZE = wire.HEADER_SIZE + 12 + 4096


def _echo_server(port: int, home: str, tls: bool) -> None:
    """Anchor server: answer every request with ANSWER_SIZE bytes (blocking sockets)."""
    cfg = Config(home=Path(home))
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen()
    print("ready", flush=True)
    answer = b"y" * ANSWER_SIZE
    while True:
        conn, _ = lsock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            conn = server_ssl_context(cfg, node="bench-peer").wrap_socket(conn, server_side=True)
        try:
            while True:
                got = 0
                while got < len(REQUEST):
                    data = conn.recv(65536)
                    if not data:
                        raise EOFError
                    got += len(data)
                conn.sendall(answer)
        except (EOFError, OSError):
            conn.close()


def _anchor_round(port: int, cfg: Config, n: int, tls: bool) -> tuple[list[float], float]:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        sock = client_ssl_context(cfg, node="bench-host").wrap_socket(
            sock, server_hostname="bench-peer")
    lat = []
    cpu0 = 0.0
    for i in range(n + 200):
        if i == 200:
            cpu0 = time.process_time()
        t0 = time.perf_counter()
        sock.sendall(REQUEST)
        got = 0
        while got < ANSWER_SIZE:
            got += len(sock.recv(65536))
        if i >= 200:  # warm-up excluded
            lat.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / n
    sock.close()
    return lat, cpu


async def _ours_round(address: tuple[str, int], cfg: Config,
                      n: int) -> tuple[list[float], float, float]:
    c = PeerClient(address, client_ssl_context(cfg, node="bench-host"), server_name="bench-peer")
    await c.put(NS, 1, 1, os.urandom(4096))
    for _ in range(200):
        await c.get(NS, 1)
    lat = []
    cpu0 = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        await c.get(NS, 1)
        lat.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / n
    # Throughput with 32 requests in flight.
    total = n * 4
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(32)

    async def one() -> None:
        async with sem:
            await c.get(NS, 1)

    await asyncio.gather(*(one() for _ in range(total)))
    rate = total / (time.perf_counter() - t0)
    await c.close()
    return lat, cpu, rate


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] * 1e6


def main() -> int:
    """Run the benchmark and print its table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="omega-bench-peer-", dir="/var/tmp"))
    cfg = Config(home=home)
    cfg.ensure()
    ClusterCA.init(cfg, name="bench")
    issue_node_cert(cfg, "bench-peer", sans=["127.0.0.1"])
    issue_node_cert(cfg, "bench-host", sans=["127.0.0.1"])
    procs: list[subprocess.Popen[str]] = []
    node = None
    try:
        for port, tls in ((PORT_TLS, True), (PORT_TCP, False)):
            p = subprocess.Popen([sys.executable, __file__, "--echo-server", str(port), str(home),
                                  "tls" if tls else "tcp"], stdout=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        node = NodeProcess.start(cfg, NodeOptions(
            name="bench-peer", host="127.0.0.1", port=PORT_NODE, memory_lend=64 << 20,
            disk_lend=0, data_dir=home / "chunks", fsync=False), log_path=home / "node.log")
        ours: list[float] = []
        anchor: list[float] = []
        tcp: list[float] = []
        rates: list[float] = []
        ratios: list[float] = []
        cpus: dict[str, list[float]] = {"anchor": [], "ours": []}
        for r in range(args.rounds):
            first_anchor = r % 4 in (0, 3)
            order = ("anchor", "ours") if first_anchor else ("ours", "anchor")
            this: dict[str, list[float]] = {}
            for side in order:
                if side == "anchor":
                    this["anchor"], cpu = _anchor_round(PORT_TLS, cfg, args.requests, True)
                    cpus["anchor"].append(cpu)
                else:
                    with asyncio.Runner(loop_factory=new_event_loop) as runner:
                        lat, cpu, rate = runner.run(_ours_round(node.address, cfg,
                                                                args.requests))
                    this["ours"] = lat
                    cpus["ours"].append(cpu)
                    rates.append(rate)
            tcp += _anchor_round(PORT_TCP, cfg, args.requests // 3, False)[0]
            anchor += this["anchor"]
            ours += this["ours"]
            ratios.append(statistics.median(this["ours"]) / statistics.median(this["anchor"]))
    finally:
        if node is not None:
            node.stop()
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(home, ignore_errors=True)

    rows = [
        ("raw TCP ping-pong, blocking sockets (floor)", tcp),
        ("anchor: TLS 1.3 ping-pong, blocking ssl sockets", anchor),
        ("ours: PeerClient.get 4 KiB, omega node serve, mTLS", ours),
    ]
    ratio = statistics.median(ratios)
    cpu_a, cpu_o = (statistics.median(cpus[k]) * 1e6 for k in ("anchor", "ours"))
    load = os.getloadavg()[0]
    if args.markdown:
        print(f"| path | p50 µs | p99 µs |\n|---|---|---|")
        for name, lat in rows:
            print(f"| {name} | {_pct(lat, 0.5):.1f} | {_pct(lat, 0.99):.1f} |")
        print(f"\nours/anchor p50 ratio (median of {args.rounds} rounds): **{ratio:.2f}**; "
              f"QD32 throughput: {statistics.median(rates):,.0f} GET/s; client CPU per "
              f"request: ours {cpu_o:.1f} µs, anchor {cpu_a:.1f} µs; load average {load:.1f}")
    else:
        for name, lat in rows:
            print(f"{name:55s} p50 {_pct(lat, 0.5):8.1f} µs  p99 {_pct(lat, 0.99):8.1f} µs")
        print(f"ours/anchor p50 ratio (median of rounds): {ratio:.2f}  "
              f"per round: {' '.join(f'{x:.2f}' for x in ratios)}")
        print(f"ours QD32 throughput: {statistics.median(rates):,.0f} GET/s")
        print(f"client CPU per request: ours {cpu_o:.1f} µs, anchor {cpu_a:.1f} µs "
              f"(load average {load:.1f})")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--echo-server":
        _echo_server(int(sys.argv[2]), sys.argv[3], sys.argv[4] == "tls")
    else:
        sys.exit(main())
