"""The ``omega`` command.

Each command group lives in its own module and is registered here. Modules
import heavy dependencies (libvirt, aiortc, numba) inside the commands, so
``omega --help`` stays fast.

Exit status: 0 success, 1 the operation failed, 2 the request was malformed.
"""

from __future__ import annotations

import sys

import typer

from hypervisor._version import __version__
from hypervisor.cli import (
    cluster,
    demo,
    display,
    dsm,
    host,
    images,
    metrics,
    netblock,
    node,
    tui,
    vm,
)
from hypervisor.cli._output import fail
from hypervisor.errors import OmegaError

app = typer.Typer(
    name="omega",
    help="Omega: VMs whose RAM and disk are lent by peer PCs, streamed to a browser.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(host.app, name="host")
app.add_typer(images.app, name="images")
app.add_typer(vm.app, name="vm")
app.add_typer(cluster.app, name="cluster")
app.add_typer(node.app, name="node")
app.add_typer(netblock.app, name="netblock")
app.add_typer(dsm.app, name="dsm")
app.add_typer(display.app, name="display")
app.add_typer(metrics.app, name="metrics")
app.command("demo")(demo.demo)
app.command("tui")(tui.tui)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"omega {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback,
                                 is_eager=True, help="Print the version and exit."),
) -> None:
    """Omega: VMs whose RAM and disk are lent by peer PCs, streamed to a browser."""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; turn any :class:`OmegaError` into one line and an exit status.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status (also passed to ``sys.exit`` when run as a script).
    """
    try:
        # Not standalone: usage errors come back here and are printed as one line.
        result = app(args=argv, prog_name="omega", standalone_mode=False)
    except OmegaError as exc:
        return fail(exc)
    except KeyboardInterrupt:
        typer.echo("omega: interrupted", err=True)
        return 130
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except Exception as exc:
        return _click_failure(exc)
    return result if isinstance(result, int) else 0


def _click_failure(exc: Exception) -> int:
    """Print one of click's exceptions (typer vendors click) as one line.

    Returns:
        Its exit status (2 for usage errors).

    Raises:
        Exception: ``exc`` itself when it is not one of click's.
    """
    name = type(exc).__name__
    if name == "Abort":
        typer.echo("omega: aborted", err=True)
        return 1
    if name == "NoArgsIsHelpError":  # a group called bare: its help is the answer
        exc.show()  # type: ignore[attr-defined]
        return 2
    if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
        raise exc
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    typer.echo(f"omega: error: {exc.format_message()}{hint}", err=True)
    return int(exc.exit_code)


if __name__ == "__main__":
    sys.exit(main())
