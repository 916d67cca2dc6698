"""NBD server benchmark: Omega's netblock against nbdkit (memory plugin) and qemu-nbd.

Every server is measured in the same run with fio's nbd engine over a unix
socket: 4k random read and write at QD64, 4k random read at QD1 (p50
completion latency), 1M sequential read (GiB/s), each with 1 and 2
connections (fio jobs, one NBD connection each). Servers:

* ``nbdkit-memory``   nbdkit's memory plugin (the anchor)
* ``qemu-nbd``        qemu-nbd on a raw file in /dev/shm
* ``omega-memory``    ``omega netblock serve --memory`` (RAM in a memfd; after the
                      Python handshake the native C fast path serves the connection)
* ``omega-memory-py`` the same with ``OMEGA_NBD_FASTPATH=0``: the pure-Python server
* ``omega-memory-nopoll`` ``omega-memory`` with ``--busy-poll-us 0`` (connections
                      sleep in recv at once, as before session 6)
* ``omega-file``      a local (sparse file) export in /dev/shm
* ``omega-2replica``  a replicated export, R=2, 64K chunks sealed as 4K blocks (the
                      default), on three ``omega node serve`` peers on loopback
                      (chunks in /dev/shm, ``--no-fsync``), served natively
* ``omega-2replica-whole`` the same with each 64K chunk sealed whole (the Python
                      backend's layout: a 4k write rewrites its chunk)
* ``omega-2replica-nocache`` the default layout without the host's 64 MiB
                      plaintext cache (every read goes to a peer)
* ``omega-2replica-openssl`` the default with blocks sealed by OpenSSL
                      (``OMEGA_SEAL_OPENSSL=1``) instead of Intel ipsec-mb
* ``omega-2replica-4k`` 4K chunks (and blocks)
* ``omega-2replica-py``, ``omega-2replica-4k-py`` whole-chunk layouts served by the
                      Python replicated backend (``OMEGA_NETBLOCK_NATIVE=0``)

Results go to stdout as a markdown table with ratios to nbdkit-memory, and
as JSON with ``--json PATH``.

Usage: .venv/bin/python benchmarks/nbd_bench.py [--runtime 5] [--size 256M]
       [--servers a,b,...] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hypervisor.config import Config  # noqa: E402
from hypervisor.units import parse_size  # noqa: E402

PEER_BASE_PORT = 19290
_EXPORTS = itertools.count(1)
WORKLOADS = [
    # name, rw, bs, iodepth, metric
    ("randread-4k-qd64", "randread", "4k", 64, "iops"),
    ("randwrite-4k-qd64", "randwrite", "4k", 64, "iops"),
    ("randread-4k-qd1", "randread", "4k", 1, "p50_us"),
    ("read-1m-qd8", "read", "1M", 8, "gib_s"),
]


def wait_socket(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def omega_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hypervisor.cli", *args]


@contextmanager
def nbdkit_memory(tmp: Path, size: int, env: dict[str, str]) -> Iterator[str]:
    sock = tmp / "nbdkit.sock"
    proc = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "memory", f"size={size}"])
    try:
        wait_socket(sock, proc, "nbdkit")
        yield f"nbd+unix:///?socket={sock}"
    finally:
        stop(proc)


@contextmanager
def qemu_nbd(tmp: Path, size: int, env: dict[str, str]) -> Iterator[str]:
    sock = tmp / "qemu-nbd.sock"
    image = Path(tempfile.mkdtemp(prefix="omega-n-bench-", dir="/dev/shm")) / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(size)
    proc = subprocess.Popen(["qemu-nbd", "-t", "-k", str(sock), "-f", "raw", "-x", "mem",
                             "--shared=8", "--cache=writeback", str(image)])
    try:
        wait_socket(sock, proc, "qemu-nbd")
        yield f"nbd+unix:///mem?socket={sock}"
    finally:
        stop(proc)
        shutil.rmtree(image.parent, ignore_errors=True)


@contextmanager
def omega_memory(tmp: Path, size: int, env: dict[str, str], *,
                 fastpath: bool = True, busy_poll_us: int = 100) -> Iterator[str]:
    sock = tmp / "omega-mem.sock"
    env = {**env, "OMEGA_NBD_FASTPATH": "1" if fastpath else "0"}
    proc = subprocess.Popen(omega_cmd("netblock", "serve", "--memory", f"mem:{size}",
                                      "--socket", str(sock), "--busy-poll-us",
                                      str(busy_poll_us)), env=env, cwd=REPO)
    try:
        wait_socket(sock, proc, "omega netblock serve")
        yield f"nbd+unix:///mem?socket={sock}"
    finally:
        stop(proc)


@contextmanager
def omega_file(tmp: Path, size: int, env: dict[str, str]) -> Iterator[str]:
    sock = tmp / "omega-file.sock"
    subprocess.run(omega_cmd("netblock", "create", "bench-file", str(size), "--local"),
                   env=env, cwd=REPO, check=True, capture_output=True)
    proc = subprocess.Popen(omega_cmd("netblock", "serve", "bench-file", "--socket", str(sock)),
                            env=env, cwd=REPO)
    try:
        wait_socket(sock, proc, "omega netblock serve")
        yield f"nbd+unix:///bench-file?socket={sock}"
    finally:
        stop(proc)


@contextmanager
def omega_replicated(tmp: Path, size: int, env: dict[str, str], *,
                     chunk_size: str = "64K", block_size: str = "4K",
                     native: bool = True, cache: str = "64M",
                     seal_openssl: bool = False) -> Iterator[str]:
    from hypervisor.security import ClusterCA, issue_node_cert

    config = Config(home=Path(env["OMEGA_HOME"]))
    if not ClusterCA.exists(config):
        ClusterCA.init(config, name="bench")
    issue_node_cert(config, "bench-host", sans=["127.0.0.1"])
    peers = []
    procs = []
    try:
        for i in range(3):
            name = f"bench-p{i}"
            issue_node_cert(config, name, sans=["127.0.0.1"])
            port = PEER_BASE_PORT + i
            data = Path(tempfile.mkdtemp(prefix=f"omega-n-{name}-", dir="/dev/shm"))
            procs.append((subprocess.Popen(omega_cmd(
                "node", "serve", "--name", name, "--listen", f"127.0.0.1:{port}",
                "--disk-lend", str(4 * size), "--data", str(data), "--no-fsync"), env=env,
                cwd=REPO), data))
            peers.append(f"--peer={name}=127.0.0.1:{port}")
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"peer {name} did not start") from None
                    time.sleep(0.1)
        export = f"bench-rep-{next(_EXPORTS)}"  # one export per server run
        subprocess.run(omega_cmd("netblock", "create", export, str(size), "--replicas",
                                 "2", "--chunk-size", chunk_size, "--block-size", block_size),
                       env=env, cwd=REPO, check=True, capture_output=True)
        sock = tmp / "omega-rep.sock"
        proc = subprocess.Popen(omega_cmd("netblock", "serve", export, "--socket",
                                          str(sock), "--node", "bench-host", "--cache", cache,
                                          *peers),
                                env={**env, "OMEGA_NETBLOCK_NATIVE": "1" if native else "0",
                                     **({"OMEGA_SEAL_OPENSSL": "1"} if seal_openssl else {})},
                                cwd=REPO)
        try:
            wait_socket(sock, proc, "omega netblock serve (replicated)")
            yield f"nbd+unix:///{export}?socket={sock}"
        finally:
            stop(proc)
    finally:
        for p, data in procs:
            stop(p)
            shutil.rmtree(data, ignore_errors=True)


SERVERS: dict[str, Callable[[Path, int, dict[str, str]], Any]] = {
    "nbdkit-memory": nbdkit_memory,
    "qemu-nbd": qemu_nbd,
    "omega-memory": omega_memory,
    "omega-memory-py": functools.partial(omega_memory, fastpath=False),
    "omega-memory-nopoll": functools.partial(omega_memory, busy_poll_us=0),
    "omega-file": omega_file,
    "omega-2replica": omega_replicated,
    "omega-2replica-whole": functools.partial(omega_replicated, block_size="64K"),
    "omega-2replica-nocache": functools.partial(omega_replicated, cache="0"),
    "omega-2replica-openssl": functools.partial(omega_replicated, seal_openssl=True),
    "omega-2replica-4k": functools.partial(omega_replicated, chunk_size="4K"),
    "omega-2replica-py": functools.partial(omega_replicated, block_size="64K", native=False),
    "omega-2replica-4k-py": functools.partial(omega_replicated, chunk_size="4K", native=False),
}


def fio(uri: str, rw: str, bs: str, iodepth: int, jobs: int, size: int, runtime: float,
        *, time_based: bool = True) -> dict[str, float]:
    args = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
            f"--bs={bs}", f"--iodepth={iodepth}", f"--numjobs={jobs}", f"--size={size}",
            "--group_reporting", "--output-format=json"]
    if time_based:
        args += ["--time_based", f"--runtime={runtime}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=runtime * 4 + 300,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed: {proc.stderr.strip()}")
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    pct = side["clat_ns"].get("percentile", {})
    return {"iops": side["iops"], "p50_us": pct.get("50.000000", 0) / 1000.0,
            "gib_s": side["bw_bytes"] / 2**30}


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Print a markdown table (as BENCHMARKS.md keeps them), after a blank line."""
    print("\n| " + " | ".join(header) + " |")
    print("|---|" + "---|" * (len(header) - 1))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def run_server(name: str, tmp: Path, size: int, runtime: float,
               env: dict[str, str]) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    with SERVERS[name](tmp, size, env) as uri:
        # prefill so reads hit written data everywhere
        fio(uri, "write", "1M", 8, 1, size, runtime, time_based=False)
        for jobs in (1, 2):
            for wname, rw, bs, depth, metric in WORKLOADS:
                r = fio(uri, rw, bs, depth, jobs, size, runtime)
                results[f"{wname}-c{jobs}"] = r
                print(f"  {name:15} {wname}-c{jobs:<3} {metric}={r[metric]:.2f}", flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=float, default=5.0)
    parser.add_argument("--size", default="256M")
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    size = parse_size(args.size)
    servers = args.servers.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="omega-n-bench-", dir="/var/tmp"))
    home = Path(tempfile.mkdtemp(prefix="omega-n-bench-home-", dir="/dev/shm"))
    env = {**os.environ, "OMEGA_HOME": str(home)}
    all_results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        for name in servers:
            print(f"== {name}", flush=True)
            all_results[name] = run_server(name, tmp, size, args.runtime, env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
    anchor = all_results.get("nbdkit-memory")
    keys = [f"{w[0]}-c{j}" for j in (1, 2) for w in WORKLOADS]
    metric = {f"{w[0]}-c{j}": w[4] for j in (1, 2) for w in WORKLOADS}
    rows = []
    for key in keys:
        cells = []
        for name in servers:
            value = all_results[name][key][metric[key]]
            cell = f"{value:,.0f}" if metric[key] == "iops" else f"{value:.2f}"
            if anchor is not None and name != "nbdkit-memory":
                base = anchor[key][metric[key]]
                if base:
                    # ratio > 1 means better than nbdkit (latency: lower is better)
                    ratio = base / value if metric[key] == "p50_us" else value / base
                    cell += f" ({ratio:.2f}×)"
            cells.append(cell)
        rows.append([f"{key} ({metric[key]})", *cells])
    print_table(["workload", *servers], rows)
    if args.json:
        args.json.write_text(json.dumps(all_results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
