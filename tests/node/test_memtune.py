"""The allocator settings of the data-path daemons take effect in a real process."""

from __future__ import annotations

import subprocess
import sys

CHECK = r"""
import resource, sys
if sys.argv[1] == "tuned":
    from hypervisor.memtune import keep_large_buffers
    assert keep_large_buffers()
def cycle():
    data = bytes(512 << 10)   # an answer built and dropped, as per request
    return b"".join((b"x", data))
for _ in range(10):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHECK, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip())


def test_large_buffers_are_reused_instead_of_faulted_in_each_time():
    # glibc's defaults: every 512 KiB buffer is a fresh mapping, faulted in page
    # by page (≈ 256 faults per cycle); tuned, the heap's pages are reused.
    default, tuned = faults("default"), faults("tuned")
    assert default > 100 * 100, default
    assert tuned < default / 50, (tuned, default)
