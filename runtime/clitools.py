"""What every ``fewstep`` subcommand shares: parser style, error → exit code mapping.

Exit codes: 0 ok, 1 a failed check, 2 bad usage or input, 130 interrupted, 141 stdout
closed early (``fewstep info | head -3``: like a Unix tool killed by SIGPIPE, quietly).
A user's mistake prints one line starting ``error:`` (every command, whether argparse or
the command found it) and no traceback unless ``--debug`` is given; the line is printed
inert (unprintable characters escaped), whatever text it carries from a file.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Final, NoReturn, TextIO

from .errors import ArtifactError, BackendUnavailable, NumericalError, inert, quote

MAX_MESSAGE: Final = 2000  # characters of one error line (untrusted parts elided first)

EXIT_OK, EXIT_FAILED_CHECK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_BROKEN_PIPE = 128 + 13  # 128 + SIGPIPE, what a shell reports for `yes | head -1`


class CheckFailed(Exception):
    """A check ran and its result is 'no' (parity gate, sidecar mismatch): exit 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other error (the usage block is what --help is for).
        self.exit(EXIT_USAGE, f"error: {message}; see {self.prog} --help\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` unless the help already explains the default or X is None
    (a default computed at run time, e.g. from the model, is described in the help)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=doc, formatter_class=_HelpFormatter)
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
        code = main(args) or EXIT_OK
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        return broken_pipe()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CheckFailed as e:
        if debug:
            raise
        print(f"check failed: {inert(e, MAX_MESSAGE)}", file=sys.stderr)
        return EXIT_FAILED_CHECK
    except NumericalError as e:
        if debug:
            raise
        print(f"error: {inert(e, MAX_MESSAGE)}", file=sys.stderr)
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
    except MemoryError as e:
        if debug:
            raise
        detail = f" ({e})" if str(e) else ""
        print(f"error: out of memory{detail}; ask for less at once (fewer images, a smaller "
              "batch or grid)", file=sys.stderr)
        return EXIT_USAGE
    except (ArtifactError, BackendUnavailable, ValueError, OSError) as e:
        if debug:
            raise
        msg = os_error_message(e) if isinstance(e, OSError) else str(e)
        print(f"error: {inert(msg, MAX_MESSAGE)}", file=sys.stderr)
        return EXIT_USAGE


# What to do about an OSError, by errno (the message names the file and the error).
_OS_FIXES: Final = {
    errno.ENAMETOOLONG: "a name in that path is longer than the file system allows (usually "
                        "255 bytes a name, 4096 a path); pass a shorter path",
    errno.ENOSPC: "the disk is full; free some space or write to another disk",
    errno.EDQUOT: "the disk quota is used up; free some space or write to another disk",
    errno.EROFS: "that file system is mounted read-only; write to a writable folder",
    errno.EFBIG: "the file is larger than that file system allows; write to another disk",
    errno.EACCES: "check the permissions or pass another path",
    errno.EPERM: "check the permissions or pass another path",
    errno.EIO: "the disk or file system reported an I/O error; check the device",
    errno.EMFILE: "too many files are open; raise the limit (ulimit -n)",
    errno.ELOOP: "the path has a symbolic link loop; pass a path without it",
    errno.EXDEV: "the path crosses file systems; write inside one folder",
}


def os_error_message(e: OSError) -> str:
    """One line for an OSError: what failed, on which file, and what to do about it."""
    what = e.strerror or type(e).__name__
    if e.filename is not None:
        what += f": {quote(os.fsdecode(e.filename))}"
    fix = _OS_FIXES.get(e.errno) if e.errno is not None else None
    return f"{what}; {fix}" if fix else what


def broken_pipe() -> int:
    """The reader of stdout went away (``| head``): stop quietly, exit 141 like SIGPIPE.

    stdout is pointed at /dev/null so the interpreter's final flush of what is still
    buffered cannot raise a second BrokenPipeError ("Exception ignored ...").
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (captured in tests)
        pass
    return EXIT_BROKEN_PIPE


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 image``, ``2 images`` (``many`` for irregular plurals)."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stderr) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def terminal_bar(**options: Any) -> Any:
    """A tqdm bar (``options`` go to tqdm; ``file`` defaults to stderr) when that stream is
    an interactive terminal and tqdm is installed, else None: a log file or pipe gets no
    carriage-return redraws."""
    options.setdefault("file", sys.stderr)
    if not is_terminal(options["file"]):
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # a minimal runtime install
        return None
    options.setdefault("dynamic_ncols", True)
    options.setdefault("mininterval", 0.5)
    return tqdm(**options)


class Progress:
    """A progress bar on stderr when it is a terminal, nothing elsewhere.

    On a terminal (and with tqdm installed) a tqdm bar of ``total`` ``unit``s, shown once
    the work has taken ``delay`` seconds; in a log file or pipe no bar at all, so no
    carriage-return redraws pile up there. ``line(text)`` prints a line either way (above
    the bar on a terminal). ``stage(label)`` names what runs now; ``advance(k)`` counts
    finished work. Use it as a context manager: the bar is closed on exit.
    """

    def __init__(self, total: int, desc: str, unit: str = "it", delay: float = 0.0,
                 initial: int = 0, stream: TextIO | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.bar: Any = terminal_bar(total=total, initial=initial, desc=desc, unit=unit,
                                     file=self.stream, delay=delay, leave=False)

    @property
    def drawing(self) -> bool:
        """Whether a bar is shown (stderr is a terminal and tqdm is installed)."""
        return self.bar is not None

    def stage(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=True)

    def advance(self, k: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(k)

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Throttle:
    """True at most once every ``seconds`` (and on the first call): for log lines of long
    work that has no terminal to draw a bar on."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.last = -float("inf")

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True


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


def bounded_int(low: int, high: int, what: str) -> Callable[[str], int]:
    """An argparse type: a whole number in ``low..high``; ``what`` names the limit
    (``"the most images one grid holds"``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
        if value > high:
            raise argparse.ArgumentTypeError(
                f"{value} is more than {high}, {what}; pass at most {high}")
        return value

    return parse


def key_values(text: str) -> dict[str, str]:
    """argparse type of ``K=V[,K=V...]`` (e.g. CUDA EP options): a dict of str; keys are
    identifiers, values printable, each at most 200 characters."""
    out: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = (x.strip() for x in part.partition("="))
        if not sep or not key.isidentifier() or not value or not value.isprintable() or max(
                len(key), len(value)) > 200:
            raise argparse.ArgumentTypeError(
                f"{inert(part)} is not KEY=VALUE (an identifier, '=', a value); e.g. "
                "fuse_conv_bias=1")
        out[key] = value
    return out


def main_of(build: Callable[[str], argparse.ArgumentParser],
            body: Callable[[argparse.Namespace], int | None]) -> Callable[..., int]:
    """A subcommand's ``main(argv, prog)`` from its parser builder and body."""

    def main(argv: Sequence[str] | None = None, prog: str = "fewstep") -> int:
        try:
            args = build(prog).parse_args(argv)
            sys.stdout.flush()
        except BrokenPipeError:  # `fewstep sample --help | head -3`
            return broken_pipe()
        except SystemExit as e:  # --help (0) or a usage error (2), already printed
            try:
                sys.stdout.flush()
            except BrokenPipeError:
                return broken_pipe()
            return e.code if isinstance(e.code, int) else EXIT_USAGE
        return run(body, args)

    return main
