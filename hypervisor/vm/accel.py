"""Decide the accelerator (KVM or TCG) by booting the tiny guest under KVM.

The presence of ``/dev/kvm`` is not enough: under a paravirtual or nested KVM
the device opens and QEMU starts, yet an ordinary guest kernel hangs at boot.
So the probe boots the tiny image with ``-accel kvm -cpu host`` and a bounded
timeout and asks it to run ``echo`` through the ``omega.run`` contract; only a
guest that answers proves KVM usable. Anything else means TCG, with the reason.

The answer is cached in ``config.cache_dir/accel.json`` keyed by the QEMU
version, the host kernel release and whether ``/dev/kvm`` exists, so it is
measured once per host (and again after an upgrade). ``OMEGA_ACCEL``
(``config.accel``) overrides the probe entirely.
"""

from __future__ import annotations

import base64
import json
import os
import selectors
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hypervisor.config import Config
from hypervisor.errors import ImageError, NotFoundError, UsageError

ACCELS = ("kvm", "tcg")
QEMU = "qemu-system-x86_64"
KVM_DEVICE = Path("/dev/kvm")
CACHE_FILE = "accel.json"
_PROBE_WORD = "omega-accel-probe-ok"


@dataclass(frozen=True)
class AccelResult:
    """The accelerator to use and why.

    Attributes:
        accel: ``kvm`` or ``tcg``.
        reason: one line a person can act on.
        cached: True when read from the cache rather than measured now.
        probe_seconds: how long the boot probe took (None when no guest was booted).
        key: what the answer depends on (qemu version, kernel release, /dev/kvm).
    """

    accel: str
    reason: str
    cached: bool = False
    probe_seconds: float | None = None
    key: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the result as a JSON-ready dict."""
        return asdict(self)


def cache_key(*, kvm_device: Path = KVM_DEVICE) -> dict[str, Any]:
    """Return what the probe's answer depends on.

    Args:
        kvm_device: the KVM device node.

    Returns:
        ``{"qemu": <version line or None>, "kernel": <uname -r>, "kvm_device": bool}``.
    """
    qemu_version = None
    if shutil.which(QEMU):
        proc = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=30)
        if proc.returncode == 0 and proc.stdout:
            qemu_version = proc.stdout.splitlines()[0].strip()
    return {"qemu": qemu_version, "kernel": os.uname().release,
            "kvm_device": kvm_device.exists()}


def probe(config: Config, *, timeout: float = 20, force: bool = False,
          kvm_device: Path = KVM_DEVICE) -> AccelResult:
    """Return the accelerator for this host: forced, cached, or measured now.

    Args:
        config: Omega's configuration (``accel`` override, ``cache_dir``, images).
        timeout: seconds the KVM boot may take before KVM is declared unusable.
        force: ignore the cache and probe again.
        kvm_device: the KVM device node (tests may point elsewhere).

    Returns:
        The decision; ``cached`` tells whether it came from ``accel.json``.

    Raises:
        UsageError: ``OMEGA_ACCEL`` names an unknown accelerator.
    """
    if config.accel is not None:
        if config.accel not in ACCELS:
            raise UsageError(f"OMEGA_ACCEL={config.accel!r} is not one of {', '.join(ACCELS)}")
        return AccelResult(config.accel, f"forced by OMEGA_ACCEL={config.accel}")
    key = cache_key(kvm_device=kvm_device)
    cache = config.cache_dir / CACHE_FILE
    if not force:
        hit = _read_cache(cache, key)
        if hit is not None:
            return hit
    result, cacheable = _measure(config, key=key, timeout=timeout, kvm_device=kvm_device)
    if cacheable:
        _write_cache(cache, result)
    return result


def _read_cache(path: Path, key: dict[str, Any]) -> AccelResult | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key or data.get("accel") not in ACCELS:
        return None
    return AccelResult(accel=data["accel"], reason=str(data.get("reason", "")), cached=True,
                       probe_seconds=data.get("probe_seconds"), key=key)


def _write_cache(path: Path, result: AccelResult) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = result.to_dict()
    record.pop("cached")
    record["probed_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _measure(config: Config, *, key: dict[str, Any], timeout: float,
             kvm_device: Path) -> tuple[AccelResult, bool]:
    """Decide now; the flag says whether the answer may be cached."""
    if key["qemu"] is None:
        return AccelResult("tcg", f"{QEMU} not found or not runnable; "
                                  "install qemu-system-x86", key=key), True
    if not kvm_device.exists():
        return AccelResult("tcg", f"{kvm_device} does not exist (no KVM in this kernel "
                                  "or the kvm module is not loaded)", key=key), True
    if not os.access(kvm_device, os.R_OK | os.W_OK):
        return AccelResult("tcg", f"{kvm_device} is not readable and writable by this user",
                           key=key), True
    try:
        image = _probe_image(config)
    except ImageError as exc:
        # Not cached: once the image can be built, the real probe should run.
        return AccelResult("tcg", f"KVM not tested: the probe image cannot be built ({exc})",
                           key=key), False
    command = base64.b64encode(f"echo {_PROBE_WORD}".encode()).decode()
    argv = [QEMU, "-accel", "kvm", "-cpu", "host", "-m", "128", "-smp", "1",
            "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", f"console=ttyS0 panic=-1 omega.run={command} omega.poweroff=1"]
    started = time.monotonic()
    ok, detail = boot_and_watch(argv, expect=_PROBE_WORD, timeout=timeout)
    elapsed = round(time.monotonic() - started, 2)
    if ok:
        return AccelResult("kvm", f"a KVM guest booted and ran a command in {elapsed:.1f} s",
                           probe_seconds=elapsed, key=key), True
    return AccelResult("tcg", f"KVM unusable: {detail}", probe_seconds=elapsed, key=key), True


def _probe_image(config: Config) -> Any:
    from images.store import ImageStore

    store = ImageStore(config)
    try:
        return store.get("tiny")
    except (NotFoundError, ImageError):
        return store.build("tiny")


def boot_and_watch(argv: list[str], *, expect: str, timeout: float) -> tuple[bool, str]:
    """Run a QEMU command line until its serial output shows a framed result.

    The guest must print ``OMEGA-GUEST-READY``, then ``expect`` inside the
    ``OMEGA-RUN-BEGIN``/``OMEGA-RUN-END rc=0`` frame. QEMU is killed once the
    answer is known or the timeout passes; nothing is left running.

    Args:
        argv: the QEMU command (serial on stdout).
        expect: text the run command prints.
        timeout: seconds to wait for the frame.

    Returns:
        (True, summary) when the frame arrived, else (False, why not).
    """
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out = bytearray()
    err = bytearray()
    deadline = time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None and proc.stderr is not None
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    open_streams = 2
    try:
        while open_streams and time.monotonic() < deadline:
            for sk, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
                chunk = os.read(sk.fd, 65536)
                if not chunk:
                    sel.unregister(sk.fileobj)
                    open_streams -= 1
                    continue
                sk.data.extend(chunk)
            text = out.decode(errors="replace")
            if "OMEGA-RUN-END" in text and _framed(text, expect):
                return True, "guest answered"
        if proc.poll() is None and time.monotonic() >= deadline:
            seen = "the guest reached its marker" if b"OMEGA-GUEST-READY" in out else \
                "no guest output"
            return False, f"guest did not answer within {timeout:g} s ({seen}; " \
                          "typical of a paravirtual or nested KVM)"
        proc.wait(timeout=5)
        text = out.decode(errors="replace")
        if _framed(text, expect):
            return True, "guest answered"
        last = err.decode(errors="replace").strip().splitlines()
        how = (f"QEMU died of {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
               else f"QEMU exited {proc.returncode}")
        return False, how + (f": {last[-1]}" if last else " without the guest answering")
    finally:
        sel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def _framed(text: str, expect: str) -> bool:
    begin = text.find("OMEGA-RUN-BEGIN")
    end = text.find("OMEGA-RUN-END rc=0", begin + 1)
    return begin >= 0 and end > begin and expect in text[begin:end] and \
        "OMEGA-GUEST-READY" in text[:begin]
