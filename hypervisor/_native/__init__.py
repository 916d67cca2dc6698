"""Compiled cffi modules built from native/ by meson (see native/meson.build).

In a development tree ``make native`` builds them and copies them here; in a
wheel meson installs them here.

Every module ``_<job>`` exports ``omega_<job>_version()``, the project version
it was built from.  Wrappers load their module with :func:`load`, which refuses
a missing or stale build, so Python never calls into C compiled from other
sources than the ones it was written against.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from hypervisor.errors import NativeError

__all__ = ["check_version", "load"]


def check_version(module_name: str, built: str, expected: str) -> None:
    """Refuse a compiled module built for another package version.

    Args:
        module_name: the module's import name, for the message.
        built: the version compiled into the module.
        expected: the version of this Python package.

    Raises:
        NativeError: the versions differ.
    """
    if built != expected:
        raise NativeError(
            f"native module {module_name} was built for version {built}, but the "
            f"hypervisor package is {expected}; run `make native` to rebuild it"
        )


def load(job: str) -> ModuleType:
    """Import ``hypervisor._native._<job>`` and check its version.

    Args:
        job: the native job name (``uffd`` for ``_uffd``).

    Returns:
        The cffi extension module (with ``.ffi`` and ``.lib``).

    Raises:
        NativeError: the module is not built, cannot load, or is stale.
    """
    from hypervisor import _version

    name = f"hypervisor._native._{job}"
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        raise NativeError(
            f"native module {name} is not built or cannot load ({exc}); run `make native`"
        ) from exc
    version_fn = getattr(module.lib, f"omega_{job}_version", None)
    if version_fn is None:
        raise NativeError(f"native module {name} has no omega_{job}_version(); run `make native`")
    built = module.ffi.string(version_fn()).decode()
    check_version(name, built, _version.__version__)
    return module
