"""What every ``fewstep`` subcommand shares: parser style, error → exit code mapping.

Exit codes: 0 ok, 1 a failed check, 2 bad usage or input, 130 interrupted. A user's
mistake prints one ``error:`` line and no traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import NoReturn

from .errors import ArtifactError, BackendUnavailable, NumericalError

EXIT_OK, EXIT_FAILED_CHECK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CheckFailed(Exception):
    """A check ran and its result is 'no' (parity gate, sidecar mismatch): exit 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog, description=doc, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p


_EXTRAS = {"torch": "train", "onnx": "export", "onnxscript": "export", "tqdm": "train",
           "matplotlib": "bench", "tensorrt": "tensorrt", "cuda": "tensorrt",
           "tritonclient": "triton", "google": "triton", "psutil": "bench"}


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: temporaries are removed


def run(main: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Call ``main(args)`` and turn exceptions into one line and an exit code.

    SIGTERM is handled like Ctrl-C, so ``finally`` blocks remove temporary files.
    """
    debug = getattr(args, "debug", False)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return main(args) or EXIT_OK
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CheckFailed as e:
        if debug:
            raise
        print(f"check failed: {e}", file=sys.stderr)
        return EXIT_FAILED_CHECK
    except NumericalError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED_CHECK
    except ModuleNotFoundError as e:
        if debug:
            raise
        top = (e.name or "").split(".")[0]
        extra = _EXTRAS.get(top)
        hint = f"pip install 'fewstep[{extra}]'" if extra else f"pip install {top}"
        print(f"error: this command needs the {top!r} package, which is not installed; "
              f"{hint}", file=sys.stderr)
        return EXIT_USAGE
    except (ArtifactError, BackendUnavailable, ValueError, FileNotFoundError,
            PermissionError, IsADirectoryError) as e:
        if debug:
            raise
        msg = str(e) if not isinstance(e, OSError) or not e.filename else (
            f"{e.strerror}: {e.filename!r}")
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_USAGE


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def main_of(build: Callable[[str], argparse.ArgumentParser],
            body: Callable[[argparse.Namespace], int | None]) -> Callable[..., int]:
    """A subcommand's ``main(argv, prog)`` from its parser builder and body."""

    def main(argv: Sequence[str] | None = None, prog: str = "fewstep") -> int:
        try:
            args = build(prog).parse_args(argv)
        except SystemExit as e:  # --help (0) or a usage error (2), already printed
            return e.code if isinstance(e.code, int) else EXIT_USAGE
        return run(body, args)

    return main
