"""The ``qvlm-export`` command: a thin Typer layer over the Python API.

Each stage registers its subcommands from its own module (``cli/<stage>.py``), so a
stage's options live beside each other and the Python API stays the source of truth.
User errors (:class:`qvlm_export.errors.QvlmError`) print one line and exit non-zero.
"""

from __future__ import annotations

import sys

import typer

from ..errors import QvlmError

app = typer.Typer(
    name="qvlm-export",
    help="Quantize a vision-language model with Q-VLM, export QDQ ONNX, build engines, validate parity.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


NO_VERIFY_HELP = "load artifacts without checking their files against the SHA-256 hashes in manifest.json"


def apply_verify(no_verify: bool) -> None:
    """``--no-verify``: switch off hash checks on load for this command (main restores the setting)."""
    from ..manifest import set_verification

    set_verification(not no_verify)


def _register() -> None:
    from . import data_cmd, eval_cmd  # noqa: F401  (each module adds its commands to ``app``)

    for name in ("quantize_cmd", "search_cmd", "export_cmd", "build_cmd", "validate_cmd", "run_cmd", "verify_cmd"):
        try:
            __import__(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise


def main(argv: list[str] | None = None) -> int:
    from ..manifest import verification, verification_enabled

    _register()
    try:
        # without standalone mode click returns a command's ``typer.Exit`` code instead of raising it;
        # ``verification`` restores what --no-verify changed (tests call main() many times per process)
        with verification(verification_enabled()):
            code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:
            return code
    except QvlmError as exc:
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        return 130
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
