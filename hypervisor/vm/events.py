"""libvirt's event loop on asyncio, and waiting for domain lifecycle events.

libvirt allows one event implementation per process, so Omega runs one: an
asyncio loop in a daemon thread with ``libvirtaio`` registered on it
(:class:`LibvirtEventLoop`). Every libvirt call of a :class:`VMController` runs
on that thread (libvirt's client dispatches events from the same loop), so
nothing else in the process touches a connection concurrently.

Threads: the caller's thread submits work and blocks on its result; the
``omega-libvirt-events`` thread runs the loop, the libvirt calls and the event
callbacks. Waiting for a state change is a future resolved by a lifecycle
callback, never a poll of the domain state.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, TypeVar

T = TypeVar("T")

# libvirt's lifecycle event kinds (virDomainEventType), by name for messages.
EVENT_NAMES = {0: "defined", 1: "undefined", 2: "started", 3: "suspended", 4: "resumed",
               5: "stopped", 6: "shutdown", 7: "pmsuspended", 8: "crashed"}


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    # libvirt's default handler prints every error on stderr; Omega reports
    # errors itself, as one line.
    return None


class LibvirtEventLoop:
    """The process's libvirt event loop, running in its own thread.

    Use :meth:`get`; the first call starts the thread and registers
    ``libvirtaio`` (libvirt allows that once per process).
    """

    _instance: ClassVar[LibvirtEventLoop | None] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="omega-libvirt-events",
                                        daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    @classmethod
    def get(cls) -> LibvirtEventLoop:
        """Return the process's event loop, starting it on first use."""
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _run(self) -> None:
        try:
            import libvirt
            import libvirtaio

            asyncio.set_event_loop(self.loop)
            libvirt.registerErrorHandler(_ignore_libvirt_error, None)
            libvirtaio.virEventRegisterAsyncIOImpl(loop=self.loop)
        except BaseException as exc:  # reported to the thread that started us
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def in_loop_thread(self) -> bool:
        """True when called from the event loop's own thread."""
        return threading.current_thread() is self._thread

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking function on the loop thread and return its result.

        Args:
            fn: the function (it may call libvirt).
            *args: its positional arguments.
            **kwargs: its keyword arguments.

        Returns:
            What ``fn`` returned; its exception is re-raised here.
        """
        if self.in_loop_thread():
            return fn(*args, **kwargs)

        async def _wrapped() -> T:
            return fn(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(_wrapped(), self.loop).result()

    def run_off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking function where no event loop is running, and wait for it.

        From the loop thread it runs in a short-lived thread of its own (the
        loop waits, as it would for any blocking call); elsewhere it runs in
        place. VM hooks go through here, so a hook may use ``asyncio.run``.

        Args:
            fn: the function.
            *args: its arguments.

        Returns:
            What ``fn`` returned; its exception is re-raised here.
        """
        if not self.in_loop_thread():
            return fn(*args)
        result: list[T] = []
        error: list[BaseException] = []

        def runner() -> None:
            try:
                result.append(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                error.append(exc)

        thread = threading.Thread(target=runner, name=f"off-loop-{getattr(fn, '__name__', 'fn')}")
        thread.start()
        thread.join()
        if error:
            raise error[0]
        return result[0]

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the loop thread and wait for its result.

        Args:
            coro: the coroutine; it may call libvirt and await events.

        Returns:
            The coroutine's result; its exception is re-raised here.
        """
        if self.in_loop_thread():
            raise RuntimeError("LibvirtEventLoop.run() called from the loop thread")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


class LifecycleEvents:
    """Lifecycle events of every domain on one connection, as futures.

    Register interest with :meth:`expect` BEFORE acting on the domain, then act,
    then await the future: an event that fires in between is not lost.
    Must be created and used on the :class:`LibvirtEventLoop` thread.
    """

    def __init__(self, conn: Any) -> None:
        import libvirt

        self._waiters: dict[str, list[tuple[frozenset[int], asyncio.Future[tuple[int, int]]]]] = {}
        self._conn = conn
        self._callback_id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_event, None)

    def _on_event(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        name = dom.name()
        remaining = []
        for kinds, fut in self._waiters.get(name, []):
            if fut.done():
                continue
            if event in kinds:
                fut.set_result((event, detail))
            else:
                remaining.append((kinds, fut))
        if remaining:
            self._waiters[name] = remaining
        else:
            self._waiters.pop(name, None)

    def expect(self, name: str, kinds: set[int]) -> asyncio.Future[tuple[int, int]]:
        """Return a future that resolves with ``(event, detail)`` of the next matching event.

        Args:
            name: the domain's name.
            kinds: the lifecycle event kinds (``libvirt.VIR_DOMAIN_EVENT_*``) to wait for.

        Returns:
            A future on the event loop.
        """
        fut: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(name, []).append((frozenset(kinds), fut))
        return fut

    @staticmethod
    async def wait(fut: asyncio.Future[tuple[int, int]], timeout: float) -> tuple[int, int] | None:
        """Wait for an expected event.

        Args:
            fut: a future from :meth:`expect`.
            timeout: seconds to wait.

        Returns:
            ``(event, detail)``, or None when the timeout passed first.
        """
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            fut.cancel()
            return None

    def close(self) -> None:
        """Deregister the callback (cancels pending waits)."""
        for waiters in self._waiters.values():
            for _, fut in waiters:
                fut.cancel()
        self._waiters.clear()
        try:
            self._conn.domainEventDeregisterAny(self._callback_id)
        except Exception:  # noqa: BLE001 - the connection may already be gone
            pass
