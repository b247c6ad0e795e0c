"""The ``qvlm-export`` command: a thin Typer layer over the Python API.

Each stage registers its subcommands from its own module (``cli/<stage>_cmd.py``); the options
several commands share are declared once in :mod:`.options`.

Exit codes (the contract a release pipeline gates on, see the README):
0 success; 1 the check ran and the artifact failed it (validate, verify, check-trt); 2 usage
error, bad input, missing or unreadable path, OS error or terminated run; 130 interrupted (SIGINT).
Every non-zero exit prints one line ``error: <what>; <what to do>`` on stderr; ``--debug``
(or ``QVLM_DEBUG=1``) also prints the traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Annotated

import typer

from ..errors import QvlmError

app = typer.Typer(
    name="qvlm-export",
    help="Quantize a vision-language model with Q-VLM, export QDQ ONNX, build engines, validate parity.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_COMMAND_MODULES = ("data_cmd", "eval_cmd", "quantize_cmd", "export_cmd", "build_cmd", "validate_cmd", "run_cmd",
                    "verify_cmd")
_debug = False
INTERRUPTED = "interrupted; nothing was written to --out, re-run the command"


@app.callback()
def _global_options(
    debug: Annotated[bool, typer.Option("--debug", help="print the traceback of an error, not only its line")] = False,
) -> None:
    global _debug
    _debug = _debug or debug


def _register() -> None:
    import importlib

    for name in _COMMAND_MODULES:  # each module adds its commands to ``app``
        importlib.import_module(f"{__name__}.{name}")


def _classes(name: str) -> tuple[type, ...]:
    """``name`` from typer's vendored click (typer >= 0.2x) and from click itself (older typer), where present."""
    found = []
    for module in ("typer._click.exceptions", "click.exceptions", "typer"):
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


class Terminated(QvlmError):
    """SIGTERM: the run stopped before it finished (temporaries are removed on the way out)."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated("terminated by SIGTERM before finishing; nothing was written to --out, re-run the command")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error(message: str, code: int, exc: BaseException | None = None) -> int:
    if _debug and exc is not None:
        import traceback

        traceback.print_exception(exc)
    typer.echo(f"error: {_one_line(message)}", err=True)
    return code


def _usage_error(exc) -> int:
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "qvlm-export"
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
        typer.echo(ctx.get_help())
        return _error(f"{command} needs a command; pick one from the list above", 2)
    return _error(f"{exc.format_message().rstrip('.')}; see '{command} --help'", 2, exc)


def _os_error(exc: OSError) -> str:
    where = f" {exc.filename!r}" if exc.filename else ""
    return f"{exc.strerror or type(exc).__name__}:{where}; check that the path exists and this user may read/write it"


def main(argv: list[str] | None = None) -> int:
    from ..manifest import verification, verification_enabled

    global _debug
    _debug = os.environ.get("QVLM_DEBUG", "") not in ("", "0")
    _register()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        # without standalone mode click returns a command's ``typer.Exit`` code instead of raising it;
        # ``verification`` restores what --no-verify changed (tests call main() many times per process)
        with verification(verification_enabled()):
            code = app(args=argv, prog_name="qvlm-export", standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C (KeyboardInterrupt/Abort) into a returned 130 itself
            return _error(INTERRUPTED, 130)
        return code if isinstance(code, int) else 0
    except QvlmError as exc:
        return _error(str(exc), exc.exit_code, exc)
    except _classes("Exit") as exc:
        return exc.exit_code
    except (*_classes("Abort"), KeyboardInterrupt) as exc:
        return _error(INTERRUPTED, 130, exc)
    except _classes("ClickException") as exc:  # usage errors: missing/unknown option, bad value
        return _usage_error(exc)
    except OSError as exc:
        return _error(_os_error(exc), 2, exc)
    except MemoryError as exc:
        return _error("out of memory; use a machine with more memory or a smaller model/batch", 2, exc)
    except Exception as exc:  # a bug: one line by default, the traceback with --debug
        return _error(f"internal error {type(exc).__name__}: {_one_line(exc)[:300]}; re-run with --debug and "
                      "report the traceback", 2, exc)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
