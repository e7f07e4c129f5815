"""The `dynres` command line: maps flags to the library's dataclasses and functions, nothing more.

Every library error (``DynresError``) becomes one red line and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from dynres import __version__
from dynres._ui import console
from dynres.errors import DynresError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Dynamic-resolution CNN inference.")
data_app = typer.Typer(no_args_is_help=True, help="Built-in datasets.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (JSON + Markdown records).")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


def main() -> None:
    try:
        app(standalone_mode=False)
    except DynresError as err:
        console.print(f"[red]error:[/red] {err}")
        sys.exit(2)
    except typer.Exit as ex:
        sys.exit(ex.exit_code)
    except typer.Abort:
        console.print("[red]aborted[/red]")
        sys.exit(130)
    except Exception as err:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    main()
