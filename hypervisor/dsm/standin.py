"""A stand-in for QEMU: maps "guest RAM" through the real agent and touches it.

Run as its own process (``python -m hypervisor.dsm.standin``) with the
agent's environment, it loads ``libomega_agent.so`` exactly as QEMU does
under LD_PRELOAD, maps a shared memfd through the agent's ``mmap64`` (so the
agent registers the userfaultfd and hands it to the handler), then runs a
workload. Tests and benchmarks use it where a whole guest is not needed.

Workloads (``--workload``):
    memtest  write a pseudo-random pattern over the region, verify it twice;
    latency  fill, evict everything (via the control socket), then time
             single-page touches in random order (one line of JSON);
    scan     fill, evict everything, then time a sequential read.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

PROT_RW = 0x3
MAP_SHARED = 0x01


def map_guest_ram(agent: Path, length: int) -> np.ndarray:
    """Map a shared memfd through the agent's mmap64; return it as bytes."""
    lib = ctypes.CDLL(str(agent))
    mmap64 = lib.mmap64
    mmap64.restype = ctypes.c_void_p
    mmap64.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
    fd = os.memfd_create("omega-standin-ram", 0)
    os.ftruncate(fd, length)
    addr = mmap64(None, length, PROT_RW, MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap64")
    return np.ctypeslib.as_array((ctypes.c_uint8 * length).from_address(addr))


def pattern(n_words: int, seed: int) -> np.ndarray:
    """The pseudo-random 64-bit words written at word indices [0, n_words)."""
    x = np.arange(n_words, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)
    x ^= x >> np.uint64(31)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(29)
    return x


def _control(sock: Path, req: dict) -> dict:
    from hypervisor.dsm.control import control_request

    return control_request(sock, req, timeout=120)


def _evict_all(sock: Path, keep: int) -> None:
    _control(sock, {"op": "set_target", "bytes": keep})
    while _control(sock, {"op": "stats"})["stats"]["resident_bytes"] > keep + (2 << 20):
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    """Entry point; prints one JSON line with the results."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent", type=Path, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--workload", choices=("memtest", "latency", "scan"), default="memtest")
    ap.add_argument("--control", type=Path)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=12345)
    args = ap.parse_args(argv)
    # The agent takes mappings of at least this size (read when it loads).
    os.environ["OMEGA_DSM_MIN_BYTES"] = str(args.size)
    ram = map_guest_ram(args.agent, args.size)
    words = ram.view(np.uint64)
    ps = os.sysconf("SC_PAGESIZE")
    out: dict = {"workload": args.workload}
    if args.workload == "memtest":
        t0 = time.perf_counter()
        step = 1 << 17
        for i in range(0, len(words), step):
            words[i:i + step] = pattern(min(step, len(words) - i), args.seed + i)
        bad = 0
        for _ in range(2):
            for i in range(0, len(words), step):
                n = min(step, len(words) - i)
                bad += int(np.count_nonzero(words[i:i + n] != pattern(n, args.seed + i)))
        out.update(ok=bad == 0, bad_words=bad, seconds=time.perf_counter() - t0)
        if args.control:
            st = _control(args.control, {"op": "stats"})["stats"]
            out["served"] = bool(st["serving"])
            out["handler"] = {k: st.get(k) for k in (
                "evicted_pages", "fetched_pages", "prefetched_pages", "faults_remote",
                "faults_zero", "faults_deferred", "max_file_resident_bytes", "resident_bytes",
                "remote_fault_p50_us", "remote_fault_p99_us", "evict_cancelled", "faults_wp")}
    else:
        npages = args.size // ps
        for i in range(0, len(words), 1 << 17):
            words[i:i + (1 << 17)] = pattern(min(1 << 17, len(words) - i), args.seed + i)
        _evict_all(args.control, 0)
        # Room for everything again: no reclaim competes with the measurement.
        _control(args.control, {"op": "set_target", "bytes": args.size})
        if args.workload == "latency":
            rng = np.random.default_rng(args.seed)
            pages = rng.choice(npages, size=min(args.samples, npages), replace=False)
            lat = np.empty(len(pages))
            stride = ps // 8
            for k, p in enumerate(pages.tolist()):
                t = time.perf_counter_ns()
                words[p * stride]
                lat[k] = time.perf_counter_ns() - t
            out.update(p50_us=float(np.percentile(lat, 50)) / 1000,
                       p99_us=float(np.percentile(lat, 99)) / 1000, samples=len(pages))
        else:
            began = time.time()
            t = time.perf_counter()
            total = int(ram.view(np.uint64)[:: ps // 8].sum(dtype=np.uint64) & np.uint64(1))
            secs = time.perf_counter() - t
            out.update(seconds=secs, mb_per_s=args.size / secs / 1e6, checksum=total,
                       began=began)
        if args.control:
            st = _control(args.control, {"op": "stats"})["stats"]
            out["handler"] = {k: st.get(k) for k in (
                "faults_remote", "faults_inflight", "native_fetches", "native_prefetched",
                "prefetched_pages", "native_fallbacks")}
        ok = True
        for i in range(0, len(words), 1 << 17):
            n = min(1 << 17, len(words) - i)
            ok &= bool(np.array_equal(words[i:i + n], pattern(n, args.seed + i)))
        out["verified"] = ok
    print(json.dumps(out), flush=True)
    return 0 if out.get("ok", out.get("verified")) else 1


if __name__ == "__main__":
    sys.exit(main())
