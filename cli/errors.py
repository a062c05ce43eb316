"""How the CLI reports errors: one line on stderr and exit 1 for each, the traceback only with --debug."""

from __future__ import annotations

import functools
import inspect
import os
from typing import Annotated

import typer

from mixem.errors import MixEMError, describe_os_error

DEBUG_ENV = "MIXEM_DEBUG"  # MIXEM_DEBUG=1: tracebacks, as --debug
_GLOBAL = {"debug": False}  # `mixem-fast --debug COMMAND`: set by the app's callback on every invocation


def set_debug(on: bool) -> None:
    _GLOBAL["debug"] = on


Debug = Annotated[bool, typer.Option("--debug", help=f"Show the Python traceback of an error (or set {DEBUG_ENV}=1).")]


def error_line(e: BaseException) -> str:
    """What the user reads for an error: a MixEMError's own line, an OS error's file and advice, or else one
    line that says the error was not expected (the traceback then needs --debug)."""
    if isinstance(e, MixEMError):
        return str(e)
    if isinstance(e, OSError):
        return describe_os_error(e)
    if isinstance(e, MemoryError):
        return "out of memory: lower --batch-size (or the image size), or free memory"
    first = (str(e).splitlines() or [""])[0][:300]
    return f"unexpected {type(e).__name__}: {first} (rerun with --debug for the traceback, and please report it)"


def one_line_errors(fn):
    """One line on stderr and exit 1 for every error (MixEMError, OS errors, and anything unexpected); the
    traceback only with --debug or MIXEM_DEBUG=1. Adds the --debug option to the command it wraps."""

    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        debug = debug or _GLOBAL["debug"] or os.environ.get(DEBUG_ENV, "") not in ("", "0")
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except KeyboardInterrupt:
            if debug:
                raise
            typer.echo("interrupted; finished checkpoints and shards are kept (rerun with --resume)", err=True)
            raise typer.Exit(130) from None
        except Exception as e:
            if debug:
                raise
            typer.echo(f"error: {error_line(e)}", err=True)
            raise typer.Exit(1) from None

    sig = inspect.signature(fn, eval_str=True)
    extra = inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Debug)
    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), extra])
    return wrapper
