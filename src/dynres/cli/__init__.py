"""The ``dynres`` command line: one module per command group; :func:`main` is the entry point."""

from dynres.cli.app import app, main

__all__ = ["app", "main"]
