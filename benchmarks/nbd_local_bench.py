"""Local-backend NBD benchmark: Omega's native fast path and Python path vs nbdkit and qemu-nbd.

Built on benchmarks/nbd_bench.py (same servers, same fio workloads: 4k
randread / randwrite QD64 IOPS, 4k randread QD1 p50 latency, 1M sequential
read GiB/s, each with 1 and 2 connections), but interleaved, because this
machine's two cores are shared with other work and its speed drifts: every
server runs at once (idle while not measured), and for each round and each
workload the servers are measured back to back, in an order reversed on odd
rounds. Reported: the median over rounds of each figure, and the median of
the per-round ratios to nbdkit-memory, each taken from measurements seconds
apart (> 1 is better than nbdkit, for latency too).

Servers:

* ``nbdkit-memory``  nbdkit's memory plugin (the anchor)
* ``qemu-nbd``       qemu-nbd on a raw file in /dev/shm
* ``omega-python``   ``omega netblock serve --memory`` with OMEGA_NBD_FASTPATH=0
* ``omega-fast``     ``omega netblock serve --memory`` (memfd, native fast path)
* ``omega-file``     a local sparse-file export in /dev/shm (native fast path)

Usage: .venv/bin/python benchmarks/nbd_local_bench.py [--rounds 5] [--runtime 2]
       [--size 256M] [--servers a,b,...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import nbd_bench  # noqa: E402

from hypervisor.units import parse_size  # noqa: E402

SERVERS = {
    # name: (server in nbd_bench.SERVERS, extra environment)
    "nbdkit-memory": ("nbdkit-memory", {}),
    "qemu-nbd": ("qemu-nbd", {}),
    "omega-python": ("omega-memory-py", {}),  # nbd_bench sets OMEGA_NBD_FASTPATH=0
    "omega-fast": ("omega-memory", {}),       # nbd_bench sets OMEGA_NBD_FASTPATH=1
    "omega-file": ("omega-file", {"OMEGA_NBD_FASTPATH": "1"}),
}
ANCHOR = "nbdkit-memory"


@contextmanager
def running(name: str, size: int, runtime: float) -> Iterator[str]:
    """Start one server in its own directories, prefill it, yield its URI."""
    server, extra = SERVERS[name]
    tmp = Path(tempfile.mkdtemp(prefix="omega-f-bench-", dir="/var/tmp"))
    home = Path(tempfile.mkdtemp(prefix="omega-f-bench-home-", dir="/dev/shm"))
    env = {**os.environ, "OMEGA_HOME": str(home), **extra}
    try:
        with nbd_bench.SERVERS[server](tmp, size, env) as uri:
            # prefill so reads hit written data everywhere
            nbd_bench.fio(uri, "write", "1M", 8, 1, size, runtime, time_based=False)
            yield uri
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def main() -> int:
    """Run the rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runtime", type=float, default=2.0)
    parser.add_argument("--size", default="256M")
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    size = parse_size(args.size)
    names = args.servers.split(",")
    if ANCHOR not in names:
        names.insert(0, ANCHOR)
    rounds: list[dict[str, dict[str, dict[str, float]]]] = [
        {name: {} for name in names} for _ in range(args.rounds)]
    with ExitStack() as stack:
        uris = {name: stack.enter_context(running(name, size, args.runtime)) for name in names}
        for r, results in enumerate(rounds):
            order = names if r % 2 == 0 else names[::-1]
            for jobs in (1, 2):
                for wname, rw, bs, depth, metric in nbd_bench.WORKLOADS:
                    for name in order:
                        value = nbd_bench.fio(uris[name], rw, bs, depth, jobs, size,
                                              args.runtime)
                        results[name][f"{wname}-c{jobs}"] = value
                        print(f"  round {r + 1} {name:14} {wname}-c{jobs} "
                              f"{metric}={value[metric]:.2f}", flush=True)
    keys = [(f"{w[0]}-c{j}", w[4]) for j in (1, 2) for w in nbd_bench.WORKLOADS]
    print(f"\n{args.rounds} rounds, {args.runtime:g} s per workload, export {args.size}; "
          "median over rounds (median per-round ratio to nbdkit-memory, > 1 = better)\n")
    print("| workload | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for key, metric in keys:
        cells = []
        for name in names:
            values = [rnd[name][key][metric] for rnd in rounds]
            median = statistics.median(values)
            cell = f"{median:,.0f}" if metric == "iops" else f"{median:.2f}"
            ratios = []
            for rnd in rounds:
                base, value = rnd[ANCHOR][key][metric], rnd[name][key][metric]
                if base and value:
                    ratios.append(base / value if metric == "p50_us" else value / base)
            ratio = statistics.median(ratios) if ratios else float("nan")
            if name != ANCHOR:
                cell += f" ({ratio:.2f}×)"
            cells.append(cell)
            summary.setdefault(name, {})[key] = {"metric": metric, "median": median,
                                                 "ratio": ratio, "values": values}
        print(f"| {key} ({metric}) | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
