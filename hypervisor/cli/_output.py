"""Shared output helpers: one-line errors, ``--json`` output, tables."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import typer

from hypervisor.errors import OmegaError

JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON.")


def fail(exc: OmegaError) -> int:
    """Print an error as one line on stderr and return its exit status."""
    msg = str(exc) or exc.__class__.__name__
    typer.echo(f"omega: error: {msg.splitlines()[0] if msg else msg}", err=True)
    return exc.exit_code


def emit_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def emit_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *,
               title: str | None = None) -> None:
    """Print rows as a table (rich) with the given columns."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, box=None, header_style="bold")
    for col in columns:
        table.add_column(col.upper())
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    Console().print(table)


def emit(data: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    """Print ``data`` as JSON when asked, else with ``render``."""
    if as_json:
        emit_json(data)
    else:
        render(data)
