"""DSM benchmark: remote fault service vs the floor, prefetch, guest memtest.

Run: ``.venv/bin/python benchmarks/dsm_bench.py [--quick]`` (as root; needs
libvirtd for the memtest part). All in one run, on one machine:

1. Fault service latency for 4 KiB pages, random order, one page per fault,
   the faulting process a stand-in for QEMU (hypervisor.dsm.standin, the real
   agent preloaded the same way): (a) the floor — the same handler serving
   pages from its own memory (MemoryPageStore: no network, no sealing); (b)
   the handler fetching from one peer over loopback TCP (mutual TLS, AES-GCM,
   R=1; the peer's page data port). Floor and remote alternate over
   ``--rounds`` rounds; the ratio is remote / floor per round, reported as
   its median. Three ways: the handler as it runs guests (native fetch path),
   the same with every process pinned to CPU 0 (this VM's cross-CPU wake-ups
   cost ~23 µs each and the remote path has two more of them than the floor:
   pinned, the software paths are compared), and with ``native = false``
   (every fetch through the Python store).
2. Page-in throughput of a sequential scan (``--scan-mib``, default 256 MiB)
   evicted to that peer, with and without prefetch (native path), and with
   prefetch on the Python path.
3. The tiny guest's memtest (400 MiB of a 512 MiB guest) at 100 % local
   (no dsm: the anchor), 50 % and 25 % local, two peers, R=2.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hypervisor.config import Config  # noqa: E402
from hypervisor.dsm.settings import DsmPaths, DsmSettings  # noqa: E402

AGENT = REPO / "hypervisor" / "_native" / "libomega_agent.so"
HOST = "omega-host"
PORTS = iter(range(19480, 19499))
ALL_CPUS = f"0-{os.cpu_count() - 1}"


def omega(*args: str, env: dict[str, str] | None = None, check: bool = True,
          timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "hypervisor.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode:
        raise SystemExit(f"omega {' '.join(args)}: {proc.stderr}")
    return proc


def start_peer(config: Config, busy_poll_us: int = 100) -> tuple[str, str, subprocess.Popen[bytes]]:
    from hypervisor.security import issue_node_cert

    port = next(PORTS)
    name = f"bench-peer{port}"
    issue_node_cert(config, name, sans=[name, "127.0.0.1"])
    proc = subprocess.Popen([sys.executable, "-m", "hypervisor.cli", "node", "serve", "--name",
                             name, "--listen", f"127.0.0.1:{port}", "--memory-lend", "2G",
                             "--busy-poll-us", str(busy_poll_us)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None and b"omega-node-ready" in proc.stdout.readline()
    return name, f"127.0.0.1:{port}", proc


def standin(config: Config, vm: str, settings: DsmSettings, workload: str, size: int,
            extra: list[str] | None = None, pin: str | None = None) -> dict:
    """Run the handler for ``settings`` and the stand-in workload; return its JSON.

    ``pin``: a CPU list; the handler and the stand-in run there (``taskset``).
    """
    cpus = ["taskset", "-c", pin] if pin else []
    from hypervisor.sealing import Sealer

    vmdir = config.vms_dir / vm
    vmdir.mkdir(parents=True, exist_ok=True)
    paths = DsmPaths(vmdir)
    settings.save(paths.settings)
    paths.key.write_bytes(Sealer.generate_key())
    log = open(vmdir / "handler.log", "wb")
    handler = subprocess.Popen([*cpus, sys.executable, "-m", "hypervisor.cli", "dsm", "handler",
                                vm],
                               cwd=REPO, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while not paths.control_socket.exists():
            if time.monotonic() > deadline or handler.poll() is not None:
                raise SystemExit(f"handler did not start: {(vmdir / 'handler.log').read_text()}")
            time.sleep(0.05)
        out = subprocess.run([*cpus, sys.executable, "-m", "hypervisor.dsm.standin", "--agent",
                              str(AGENT), "--size", str(size), "--workload", workload,
                              "--control", str(paths.control_socket), *(extra or [])],
                             cwd=REPO, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "OMEGA_DSM_SOCKET": str(paths.agent_socket)})
        if out.returncode:
            raise SystemExit(f"stand-in failed: {out.stdout}{out.stderr}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        handler.terminate()
        handler.wait(timeout=20)


def memtest_vm(config: Config, name: str, local: str | None, env: dict[str, str],
               mib: int) -> float:
    cmd = base64.b64encode(f"memtest {mib}".encode()).decode()
    args = ["vm", "create", name, "--image", "tiny", "--memory", "512M",
            "--cmdline-extra", f"omega.run={cmd} omega.poweroff=1", "--start"]
    if local:
        args += ["--local-memory", local]
    omega(*args, env=env)
    try:
        serial = config.vms_dir / name / "serial.log"
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            m = re.search(r"OMEGA-MEMTEST ok=(\d) mib=\d+ errors=\d+ seconds=([\d.]+)",
                          serial.read_text(errors="replace") if serial.exists() else "")
            if m:
                if m.group(1) != "1":
                    raise SystemExit(f"memtest failed in {name}")
                return float(m.group(2))
            time.sleep(1)
        raise SystemExit(f"memtest did not finish in {name}")
    finally:
        omega("vm", "destroy", name, env=env, check=False)
        gone = omega("vm", "delete", name, "--force", env=env, check=False)
        if gone.returncode:
            print(f"warning: could not delete {name}: {gone.stderr.strip()}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the guest memtest part")
    ap.add_argument("--samples", type=int, default=3000, help="faults per latency run")
    ap.add_argument("--rounds", type=int, default=3, help="floor/remote latency rounds")
    ap.add_argument("--mib", type=int, default=400, help="memtest size in the guest")
    ap.add_argument("--scan-mib", type=int, default=256, help="size of the page-in scan")
    ap.add_argument("--only", choices=("latency", "scan", "memtest"), help="run one part only")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="omega-d-bench-", dir="/var/tmp"))
    home.chmod(0o755)
    os.environ["OMEGA_HOME"] = str(home)
    config = Config.from_env()
    config.ensure()
    from hypervisor.security import ClusterCA, ensure_node_cert

    ClusterCA.init(config, name="omega-d-bench")
    ensure_node_cert(config, HOST)
    # Two peers as shipped (data-port threads busy-poll 100 µs) and one that
    # never busy-polls, for the same-run comparison with the handler's
    # busy_poll_us = 0.
    peers = [start_peer(config), start_peer(config), start_peer(config, busy_poll_us=0)]
    results: dict = {}
    try:
        size = 64 << 20
        one = [[peers[0][0], peers[0][1]]]
        common = dict(memory=size, local_memory=size, slack=8 << 20, node=HOST, prefetch=False)

        def latency(native: bool, pin: str | None, busy_poll: bool = True) -> dict:
            """Floor and remote in alternating rounds; the ratio per round, then its median."""
            tag = ("" if native else "-py") + (f"-pin{pin}" if pin else "") + (
                "" if busy_poll else "-nopoll")
            peer = peers[0] if busy_poll else peers[2]
            spin = {} if busy_poll else {"busy_poll_us": 0}
            rounds = []
            for r in range(args.rounds):
                runs = {}
                for kind in (("floor", "remote") if r % 2 == 0 else ("remote", "floor")):
                    vm = f"lat-{kind}{tag}-{r}"
                    where = ({"store": "memory"} if kind == "floor"
                             else {"store": "peers", "peers": [[peer[0], peer[1]]], "replicas": 1})
                    runs[kind] = standin(config, vm, DsmSettings(
                        vm_name=vm, vm_id=f"vm-{vm}", native=native, **where, **common, **spin),
                        "latency", size, ["--samples", str(args.samples)], pin=pin)
                rounds.append({"floor_p50_us": runs["floor"]["p50_us"],
                               "remote_p50_us": runs["remote"]["p50_us"],
                               "floor_p99_us": runs["floor"]["p99_us"],
                               "remote_p99_us": runs["remote"]["p99_us"],
                               "verified": runs["floor"]["verified"] and runs["remote"]["verified"],
                               "p50_ratio": runs["remote"]["p50_us"] / runs["floor"]["p50_us"],
                               "p99_ratio": runs["remote"]["p99_us"] / runs["floor"]["p99_us"]})
            med = statistics.median
            return {"rounds": rounds,
                    "p50_ratio": med(r["p50_ratio"] for r in rounds),
                    "p99_ratio": med(r["p99_ratio"] for r in rounds),
                    "floor_p50_us": med(r["floor_p50_us"] for r in rounds),
                    "remote_p50_us": med(r["remote_p50_us"] for r in rounds),
                    "verified": all(r["verified"] for r in rounds)}

        if args.only in (None, "latency"):
            results["latency"] = latency(True, None)
            results["latency_no_busy_poll"] = latency(True, None, busy_poll=False)
            # Every process on one CPU: the software paths compared without this
            # VM's cross-CPU wake-ups (see BENCHMARKS.md), floor and remote alike.
            pin = "0"
            for _, _, proc in peers:
                subprocess.run(["taskset", "-a", "-p", "-c", pin, str(proc.pid)], check=True,
                               capture_output=True)
            try:
                results["latency_one_cpu"] = latency(True, pin)
            finally:
                for _, _, proc in peers:
                    subprocess.run(["taskset", "-a", "-p", "-c", ALL_CPUS, str(proc.pid)],
                                   check=True, capture_output=True)
            results["latency_python_path"] = latency(False, None)
        if args.only in (None, "scan"):
            scan_size = args.scan_mib << 20
            common.update(memory=scan_size, local_memory=scan_size)
            scans = {}
            for pf, native in ((False, True), (True, True), (True, False)):
                common["prefetch"] = pf
                vm = f"scan-{'pf' if pf else 'nopf'}{'' if native else '-py'}"
                scans[vm] = standin(config, vm, DsmSettings(vm_name=vm, vm_id=f"vm-{vm}",
                                    store="peers", peers=one, replicas=1, native=native,
                                    **common), "scan", scan_size)
            results["scan"] = scans
        print(json.dumps(results, indent=2), flush=True)
        if not args.quick and args.only in (None, "memtest"):
            from images.store import ImageStore

            ImageStore(config).build("tiny")
            env = {"OMEGA_DSM_PEERS": ",".join(f"{n}={a}" for n, a, _ in peers[:2])}
            times = {}
            for label, local in (("100%", None), ("50%", "256M"), ("25%", "128M")):
                # named per run: a VM left by an interrupted run does not clash
                name = f"omega-test-d-bench-{label[:-1]}-{home.name[-6:]}"
                times[label] = memtest_vm(config, name, local,
                                          env, args.mib)
                print(f"memtest {args.mib} MiB at {label} local: {times[label]:.1f} s", flush=True)
            results["memtest_seconds"] = times
    finally:
        for _, _, proc in peers:
            proc.terminate()
            proc.wait(timeout=10)
        import shutil

        shutil.rmtree(home, ignore_errors=True)
    print("RESULT " + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
