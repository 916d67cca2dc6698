"""How close can any replicated backend get to the local one on 4 KiB requests here?

Runs, in interleaved rounds with fio's nbd engine (as ``nbd_bench.py``):

* ``omega-memory``       Omega's local backend (the issue's "local")
* ``ceiling-local``      ``netblock_4k_ceiling.c`` serving a memfd
* ``ceiling-replicated`` ``netblock_4k_ceiling.c``'s shortest replicated
                         pipeline: every burst sealed once and sent in AES-GCM
                         frames to two peer processes over loopback TCP, which
                         copy the blocks into mapped slot files and ack
* ``omega-2replica``     Omega's replicated backend (three peers, R = 2)

``ceiling-replicated`` has nothing but the ciphers, copies and round trips
the design cannot do without, so its ratio to ``omega-memory`` bounds what a
replicated backend can reach on this box for these rows.

Usage: .venv/bin/python benchmarks/netblock_4k_ceiling.py [--rounds 3] [--runtime 3]
       [--workloads randwrite:64:1,randwrite:64:2,randread:64:1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import nbd_bench  # noqa: E402

SIZE = 128 << 20  # netblock_4k_ceiling.c's export size


def build(out: Path) -> Path:
    """Compile netblock_4k_ceiling.c (with ipsec-mb where the headers are)."""
    exe = out / "netblock_4k_ceiling"
    ipsec = Path("/usr/include/intel-ipsec-mb.h").exists()
    cmd = ["cc", "-O2", *(["-DOMEGA_HAVE_IPSEC_MB"] if ipsec else []),
           "-Inative/peerclient", "benchmarks/netblock_4k_ceiling.c",
           "native/peerclient/pc_seal.c", "native/peerclient/pc_frames.c",
           *(["-lIPSec_MB"] if ipsec else []), "-lssl", "-lcrypto", "-o", str(exe)]
    subprocess.run(cmd, cwd=REPO, check=True)
    return exe


@contextmanager
def ceiling(exe: Path, mode: str, tmp: Path) -> Iterator[str]:
    sock = tmp / f"ceiling-{mode}.sock"
    proc = subprocess.Popen([str(exe), mode, str(sock)], stdout=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"netblock_4k_ceiling {mode} did not start")
        yield f"nbd+unix:///?socket={sock}"
    finally:
        try:
            os.killpg(proc.pid, 15)  # the server, its peers and every link process
        except ProcessLookupError:
            pass
        proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", type=float, default=3.0)
    parser.add_argument("--workloads", default="randwrite:64:1,randwrite:64:2,randread:64:1")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    workloads = [(rw, int(qd), int(jobs)) for rw, qd, jobs in
                 (w.split(":") for w in args.workloads.split(","))]
    tmp = Path(tempfile.mkdtemp(prefix="omega-4k-ceiling-", dir="/var/tmp"))
    home = Path(tempfile.mkdtemp(prefix="omega-4k-ceiling-home-", dir="/dev/shm"))
    env = {**os.environ, "OMEGA_HOME": str(home)}
    exe = build(tmp)
    servers = {
        "omega-memory": lambda: nbd_bench.omega_memory(tmp, SIZE, env),
        "ceiling-local": lambda: ceiling(exe, "local", tmp),
        "ceiling-replicated": lambda: ceiling(exe, "replicated", tmp),
        "omega-2replica": lambda: nbd_bench.omega_replicated(tmp, SIZE, env),
    }
    results: dict[str, dict[str, list[float]]] = {s: {} for s in servers}
    try:
        for rnd in range(args.rounds):
            for name, make in servers.items():
                with make() as uri:
                    nbd_bench.fio(uri, "write", "1M", 8, 1, SIZE, args.runtime,
                                  time_based=False)  # every block written, as nbd_bench
                    for rw, qd, jobs in workloads:
                        key = f"{rw}-4k-qd{qd}-c{jobs}"
                        r = nbd_bench.fio(uri, rw, "4k", qd, jobs, SIZE, args.runtime)
                        results[name].setdefault(key, []).append(r["iops"])
                        print(f"round {rnd + 1} {name:19} {key:22} {r['iops']:>10,.0f} IOPS",
                              flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
    rows = []
    for key in results["omega-memory"]:
        base = statistics.median(results["omega-memory"][key])
        meds = {name: statistics.median(results[name][key]) for name in servers}
        rows.append([key, *(f"{m:,.0f}" + ("" if n == "omega-memory" else f" ({m / base:.2f}×)")
                            for n, m in meds.items())])
    nbd_bench.print_table(["workload (IOPS, median of rounds)", *servers], rows)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
