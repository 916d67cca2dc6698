"""The guest's serial console: interactive, followed, or waited on.

Interactive mode is what ``virsh console`` does: a libvirt stream on the
domain's console pty, the local terminal in raw mode, Ctrl-] to leave. The
stream and stdin are both watched by the libvirt event loop thread (libvirt
stream callbacks, ``loop.add_reader``), so there is no busy loop and no second
thread touching the connection.

``follow`` prints the serial log libvirt writes for the VM (the same bytes the
pty carries) and optionally stops at the first line matching a regex; scripts
and ``omega demo`` use it.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import termios
import time
import tty
from typing import Any, BinaryIO, TextIO

from hypervisor.errors import LibvirtError, SpecError
from hypervisor.vm.lifecycle import SerialTimeout, VMController, follow_serial_log

#: Ctrl-] leaves the console, as in virsh and telnet.
ESCAPE_BYTE = b"\x1d"


def follow(controller: VMController, name: str, *, until: str | None = None,
           timeout: float | None = None, out: TextIO | None = None) -> str | None:
    """Print the VM's serial output as it arrives.

    Args:
        controller: the VM controller.
        name: the VM.
        until: stop at the first line matching this regex (printed too).
        timeout: give up after this many seconds (None: no limit).
        out: where to print (default stdout).

    Returns:
        The matching line when ``until`` matched, else None (the VM stopped).

    Raises:
        SpecError: ``until`` is not a valid regex.
        SerialTimeout: ``timeout`` passed first (with or without ``until``).
        NotFoundError: no such VM.
    """
    out = out or sys.stdout
    pattern = None
    if until is not None:
        try:
            pattern = re.compile(until)
        except re.error as exc:
            raise SpecError(f"bad regular expression {until!r}: {exc}") from exc
    controller.show(name)  # raises NotFoundError for an unknown VM
    log = controller.runtime_dir(name).serial_log
    deadline = None if timeout is None else time.monotonic() + timeout
    for line in follow_serial_log(log, deadline=deadline,
                                  is_running=lambda: controller.is_active(name)):
        out.write(line)
        out.flush()
        if pattern is not None and pattern.search(line):
            return line.rstrip("\r\n")
    if deadline is not None and time.monotonic() >= deadline:
        what = f"matched {until!r}" if until is not None else "ended"
        raise SerialTimeout(f"VM {name!r}: serial output not {what} within {timeout:g}s")
    if pattern is not None:
        raise SerialTimeout(f"VM {name!r} stopped before a serial line matched {until!r}")
    return None


def interactive(controller: VMController, name: str, *,
                stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> None:
    """Attach the terminal to the VM's serial console until Ctrl-] or the VM stops.

    Args:
        controller: the VM controller.
        name: the VM (must be running).
        stdin: input (default the process's stdin); raw mode if it is a tty.
        stdout: output (default the process's stdout).

    Raises:
        NotFoundError: no such VM.
        LibvirtError: the VM is not running or the console is busy.
    """
    in_fd = (stdin or sys.stdin.buffer).fileno()
    out_fd = (stdout or sys.stdout.buffer).fileno()
    saved = termios.tcgetattr(in_fd) if os.isatty(in_fd) else None
    try:
        if saved is not None:
            tty.setraw(in_fd)
        controller.run_with_domain(name, lambda conn, dom: _pump(conn, dom, in_fd, out_fd))
    finally:
        if saved is not None:
            termios.tcsetattr(in_fd, termios.TCSADRAIN, saved)


async def _pump(conn: Any, dom: Any, in_fd: int, out_fd: int) -> None:
    """Copy stream → out_fd and in_fd → stream until escape, EOF or hang-up."""
    import libvirt

    loop = asyncio.get_running_loop()
    done: asyncio.Future[str | None] = loop.create_future()

    def finish(reason: str | None) -> None:
        if not done.done():
            done.set_result(reason)

    if not dom.isActive():
        raise LibvirtError(f"VM {dom.name()!r} is not running")
    stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
    try:
        dom.openConsole(None, stream, 0)
    except libvirt.libvirtError as exc:
        stream.abort()
        raise LibvirtError(f"console of {dom.name()!r}: {exc.get_error_message()}") from exc
    sys.stderr.write(f"Connected to {dom.name()} (escape character is ^])\r\n")
    sys.stderr.flush()

    def on_stream(st: Any, events: int, _opaque: Any) -> None:
        if events & libvirt.VIR_STREAM_EVENT_READABLE:
            while True:
                try:
                    data = st.recv(65536)
                except libvirt.libvirtError as exc:
                    finish(f"console closed: {exc.get_error_message()}")
                    return
                if data == -2:  # EAGAIN: nothing more now
                    break
                if not data:
                    finish("console closed (the VM stopped)")
                    return
                os.write(out_fd, data)
        if events & (libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP):
            finish("console closed (the VM stopped)")

    def on_stdin() -> None:
        data = os.read(in_fd, 4096)
        if not data:
            finish(None)
            return
        cut = data.find(ESCAPE_BYTE)
        if cut >= 0:
            data = data[:cut]
        try:
            if data:
                stream.send(data)
        except libvirt.libvirtError as exc:
            finish(f"console closed: {exc.get_error_message()}")
            return
        if cut >= 0:
            finish(None)

    stream.eventAddCallback(libvirt.VIR_STREAM_EVENT_READABLE | libvirt.VIR_STREAM_EVENT_ERROR
                            | libvirt.VIR_STREAM_EVENT_HANGUP, on_stream, None)
    loop.add_reader(in_fd, on_stdin)
    try:
        reason = await done
    finally:
        loop.remove_reader(in_fd)
        try:
            stream.eventRemoveCallback()
            stream.finish()
        except libvirt.libvirtError:
            try:
                stream.abort()
            except libvirt.libvirtError:
                pass
    os.write(out_fd, f"\r\n[{reason}]\r\n".encode() if reason else b"\r\n")
