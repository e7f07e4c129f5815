"""The `dynres` command line: one module per command group maps flags to the library's dataclasses (reading their
defaults) and functions, nothing more. :func:`main` turns a library error (``DynresError``) into one red line and
exit code 2; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from dynres._ui import console
from dynres.cli import bench, data, layout, policy, runtime, study, train
from dynres.cli import eval as evaluation
from dynres.errors import DynresError
from dynres.version import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Dynamic-resolution CNN inference.")


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


# the order of `dynres --help`: single commands, then the groups
app.command()(study.demo)
app.command()(data.ingest)
app.command()(layout.layout)
app.command()(study.run)
app.command()(study.report)
app.command()(runtime.infer)
app.command()(runtime.serve)
app.command()(policy.calibrate)
app.command()(runtime.tune)
app.add_typer(data.app, name="data")
app.add_typer(bench.app, name="bench")
app.add_typer(train.app, name="train")
app.add_typer(evaluation.app, name="eval")
app.add_typer(policy.index_app, name="index")

ERROR_EXIT = 2


def error_line(err: DynresError) -> str:
    """A library error as the one line the CLI prints (markup-free: messages may hold ``[section]`` names)."""
    return "[red]error:[/red] " + escape(" ".join(str(err).split()))


def is_usage_error(err: Exception) -> bool:
    """click's usage errors (no command, an unknown flag, a bad value): recognised by ``show()`` and ``exit_code``
    rather than by class, because typer vendors its own copy of click from 0.2x on."""
    return callable(getattr(err, "show", None)) and isinstance(getattr(err, "exit_code", None), int)


def main() -> None:
    """The ``dynres`` entry point: usage errors as click shows them, library errors as one line, Ctrl-C as 130."""
    try:
        app(standalone_mode=False)
    except DynresError as err:
        console.print(error_line(err), markup=True)
        sys.exit(ERROR_EXIT)
    except typer.Exit as ex:
        sys.exit(ex.exit_code)
    except typer.Abort:
        console.print("[red]aborted[/red]", markup=True)
        sys.exit(130)
    except Exception as err:
        if not is_usage_error(err):
            raise
        err.show()
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
