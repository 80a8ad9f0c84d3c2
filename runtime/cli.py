"""fewstep: train, export and run few-step diffusion models.

Each subcommand imports what it needs when it runs, so `fewstep --help`, `fewstep
sample` and `fewstep info` work without PyTorch.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "sample": ("fewstep.runtime.cli_sample", "generate images (default: the shipped model)"),
    "info": ("fewstep.runtime.cli_info", "describe a model file, the backends and the device"),
    "train": ("fewstep.train.cli", "train a UNet on landscapes or an image folder [torch]"),
    "export": ("fewstep.export.cli", "checkpoint -> ONNX (+ fused graphs), parity-gated [torch]"),
    "check": ("fewstep.export.cli_check", "parity gate: ONNX vs the PyTorch reference [torch]"),
    "build": ("fewstep.export.cli_build", "ONNX -> TensorRT plan + sidecar [tensorrt]"),
    "bench": ("fewstep.benchmarks.cli", "latency benchmark suite"),
    "serve": ("fewstep.export.serve", "run a Triton repository's Python models [serve]"),
    "distill": ("fewstep.train.cli_distill", "progressive distillation to few steps [torch]"),
    "eval": ("fewstep.train.cli_eval", "sample quality: feature-space Frechet distance [torch]"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [
        "usage: fewstep <command> [options]   (fewstep <command> --help for its options)",
        "",
        __doc__.strip().splitlines()[0] if __doc__ else "",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    if args[0] == "--version":
        from . import __version__

        print(f"fewstep {__version__}")
        return 0
    name = args[0]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; use one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    if name == "sample":
        _head_start(args[1:])
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        print(f"error: fewstep {name} needs the {top!r} package, which is not installed; "
              f"see pip install 'fewstep[...]' in the README", file=sys.stderr)
        return 2
    result: int = module.main(args[1:], prog=f"fewstep {name}")
    return result


def _option(args: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in ``args`` (``--flag V`` or ``--flag=V``; the last wins),
    read before argparse so that work can start while the command imports."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return value


def _head_start(args: Sequence[str]) -> None:
    """``fewstep sample`` on the GPU: the CUDA context is made in a background thread
    while numpy and ONNX Runtime import (``cuda_start``); a wrong argument is still
    argparse's to report."""
    if "-h" in args or "--help" in args:
        return
    from . import cuda_start

    if cuda_start.wants_cuda(_option(args, "--backend") or "auto", _option(args, "--model")):
        cuda_start.start_context()


def entry() -> None:
    """The ``fewstep`` command. An interrupt is handled inside ``main`` (temporaries
    removed, one line, exit code 130); the process then ends with ``os._exit(130)``,
    because CPython turns an exit into death by SIGINT whenever the KeyboardInterrupt
    was raised inside code a C extension ran through the C API (as the exporter's
    libraries do), even though it was caught."""
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":
    entry()
