"""Serve a Triton model repository fewstep wrote, with the Triton server of nvidia-pytriton.

``fewstep serve REPO`` starts ``tritonserver`` 2.51 as bundled in the ``nvidia-pytriton``
0.7.0 wheel (Linux x86-64, glibc >= 2.35) on the Python-backend models of REPO (the
``*_ddim`` models: fewstep's DDIM loop at any step count, on ONNX Runtime's CPU
provider), prints the HTTP and gRPC endpoints and runs until Ctrl-C or SIGTERM, which
stop the server and its backend processes. The bundle has no ONNX Runtime or TensorRT
backend: the ``onnxruntime_onnx`` (fused sampler) and ``tensorrt_plan`` models of the
repository are left out with the reason; they need NVIDIA's full ``tritonserver`` image
(see the README).

What is arranged for the server: a backend folder holding the bundle's Python backend
and the stub built for this interpreter's Python version, the bundle's libraries and
this interpreter's libpython on the library path, and this interpreter's ``bin`` first
on PATH, so the stub's embedded Python is this environment (numpy, onnxruntime and
fewstep import from here). The server listens on loopback unless ``--host`` says
otherwise; models load explicitly (``--model-control-mode=explicit``), so clients can
reload one (``POST /v2/repository/models/NAME/load``).

Install: ``pip install 'fewstep[serve]'`` and ``pip install --no-deps
nvidia-pytriton==0.7.0`` (its own Python API, which fewstep does not use, pins
numpy < 2; the server and stub need none of its Python dependencies).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

from fewstep.runtime import clitools

MARKER: Final = "fewstep-triton.json"  # the file export/triton.py writes in a model folder
BUNDLE: Final = "nvidia-pytriton==0.7.0"
INSTALL: Final = f"pip install --no-deps {BUNDLE}"
MIN_GLIBC: Final = (2, 35)
MAX_MODELS: Final = 64
MAX_CONFIG_BYTES: Final = 1 << 20
BACKEND_FILES: Final = ("libtriton_python.so", "triton_python_backend_utils.py")
NOT_BUNDLED: Final = {
    "onnxruntime": "needs Triton's onnxruntime backend, which the bundled server lacks",
    "tensorrt": "needs Triton's tensorrt backend and a GPU, which the bundled server lacks",
}


class BundleUnavailable(Exception):
    """The bundled server cannot run on this machine (the message says why)."""


@dataclass(frozen=True)
class Bundle:
    """Where the wheel's server, Python backend, stubs and libraries are."""

    server: Path  # bin/tritonserver
    backend: Path  # backends/python
    stub: Path  # python_backend_stubs/<X.Y>/triton_python_backend_stub
    libs: Path  # nvidia_pytriton.libs


@dataclass(frozen=True)
class RepoModel:
    """One model folder of the repository and whether the bundle can serve it."""

    name: str
    backend: str  # python, onnxruntime, tensorrt (as fewstep-triton.json records it)
    refusal: str | None  # why it is not served; None: served


def platform_problem() -> str | None:
    """Why the bundled server cannot run here, or None."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return (f"the bundled tritonserver is built for Linux x86-64; this is {sys.platform} "
                f"{platform.machine()}")
    libc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None
    parts = (libc or "").split()
    if len(parts) != 2 or parts[0] != "glibc":
        return f"the bundled tritonserver needs glibc >= 2.35; this C library is {libc!r}"
    try:
        found = tuple(int(x) for x in parts[1].split(".")[:2])
    except ValueError:
        return f"could not read the glibc version {parts[1]!r}"
    if found < MIN_GLIBC:
        return f"the bundled tritonserver needs glibc >= 2.35; this system has {parts[1]}"
    return None


def find_bundle() -> Bundle:
    """The bundled server's files, or BundleUnavailable saying why and what to do."""
    problem = platform_problem()
    if problem:
        raise BundleUnavailable(problem)
    spec = importlib.util.find_spec("pytriton")  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        raise BundleUnavailable(f"the Triton server comes from the {BUNDLE} wheel, which is "
                                f"not installed; {INSTALL}")
    root = Path(next(iter(spec.submodule_search_locations)))
    dist = root / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    bundle = Bundle(server=dist / "bin" / "tritonserver", backend=dist / "backends" / "python",
                    stub=dist / "python_backend_stubs" / version / "triton_python_backend_stub",
                    libs=root.parent / "nvidia_pytriton.libs")
    for path in (bundle.server, *(bundle.backend / f for f in BACKEND_FILES), bundle.libs):
        if not path.exists():
            raise BundleUnavailable(f"{path} is missing: the installed nvidia-pytriton is not "
                                    f"the expected one; pip install --no-deps "
                                    f"--force-reinstall {BUNDLE}")
    if not bundle.stub.is_file():
        raise BundleUnavailable(f"the bundle has no Python backend stub for Python {version}; "
                                "run fewstep serve with Python 3.9-3.13")
    return bundle


def read_repository(repo: str | os.PathLike[str]) -> list[RepoModel]:
    """The fewstep models of ``repo`` (folders with fewstep-triton.json), by name."""
    folder = Path(repo)
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"repository {str(folder)!r} {problem}; pass the folder that "
                         "`fewstep export ... --triton DIR` or `python -m fewstep.export.triton "
                         "MODEL.onnx --out DIR` wrote")
    models = []
    for entry in sorted(folder.iterdir())[:10 * MAX_MODELS]:
        marker = entry / MARKER
        if entry.is_symlink() or not entry.is_dir() or not marker.is_file():
            continue
        if marker.stat().st_size > MAX_CONFIG_BYTES:
            continue
        try:
            data = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        backend = str(data.get("backend", "")) if isinstance(data, dict) else ""
        if backend == "python":
            ok = (entry / "config.pbtxt").is_file() and (entry / "1" / "model.py").is_file()
            refusal = None if ok else "lacks its config.pbtxt or 1/model.py (re-export it)"
        else:
            refusal = NOT_BUNDLED.get(backend, f"has an unknown backend {backend[:40]!r}")
        models.append(RepoModel(entry.name, backend, refusal))
        if len(models) >= MAX_MODELS:
            break
    return models


def choose_models(models: Sequence[RepoModel], names: Sequence[str] | None,
                  repo: str | os.PathLike[str]) -> list[str]:
    """The models to load: ``names`` (each must be servable), else every servable one."""
    by_name = {m.name: m for m in models}
    if names:
        for name in names:
            model = by_name.get(name)
            if model is None:
                raise ValueError(f"--models {name!r} is not a fewstep model of {str(repo)!r}; "
                                 f"it has {sorted(by_name) or 'none'}")
            if model.refusal:
                raise ValueError(f"{name} ({model.backend} model) {model.refusal}; serve it "
                                 "with NVIDIA's tritonserver image (README: Serving with "
                                 "Triton)")
        return list(dict.fromkeys(names))
    chosen = [m.name for m in models if m.refusal is None]
    if not chosen:
        raise ValueError(f"{str(repo)!r} has no model the bundled server can run (Python "
                         "backend, *_ddim); its models: "
                         + (", ".join(f"{m.name} ({m.backend})" for m in models) or "none"))
    return chosen


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at the moment (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def child_pids(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    found = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(p) for p in (task / "children").read_text().split()]
    return found


def rss_mib(pid: int) -> float | None:
    """Resident memory of process ``pid`` in MiB (VmRSS), or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class Server:
    """One bundled tritonserver process on a repository; a context manager.

    ``start()`` arranges the backend folder (in a temporary folder removed by ``stop()``),
    starts the server in its own process group and returns at once; ``wait_ready()``
    polls ``/v2/health/ready`` with a deadline; ``stop()`` sends SIGTERM, waits, then
    SIGKILLs the group: nothing it started is left running.
    """

    def __init__(self, repo: str | os.PathLike[str], models: Sequence[str],
                 host: str = "127.0.0.1", http_port: int | None = None,
                 grpc_port: int | None = None, log: str | os.PathLike[str] | None = None,
                 bundle: Bundle | None = None) -> None:
        self.repo = Path(repo).resolve()
        self.models = list(models)
        self.host = host
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.bundle = bundle or find_bundle()
        self.log_path = Path(log) if log else None
        self.process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._log: TextIO | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stub_pids(self) -> dict[str, list[int]]:
        """The Python backend stub processes of each model (model name -> pids)."""
        found: dict[str, list[int]] = {}
        for child in child_pids(self.pid) if self.pid else []:
            argv = _cmdline(child)
            if len(argv) > 1 and argv[0].endswith("triton_python_backend_stub"):
                found.setdefault(Path(argv[1]).parent.parent.name, []).append(child)
        return found

    def _arrange(self) -> Path:
        work = Path(tempfile.mkdtemp(prefix="fewstep-serve-"))
        backend = work / "backends" / "python"
        backend.mkdir(parents=True)
        for name in BACKEND_FILES:
            shutil.copyfile(self.bundle.backend / name, backend / name)
        stub = backend / "triton_python_backend_stub"
        shutil.copyfile(self.bundle.stub, stub)
        stub.chmod(0o755)
        return work

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        libdir = str(sysconfig.get_config_var("LIBDIR") or "")
        paths = [str(self.bundle.libs), libdir, env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = ":".join(p for p in paths if p)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def command(self, backend_dir: Path) -> list[str]:
        return [str(self.bundle.server), f"--model-repository={self.repo}",
                f"--backend-directory={backend_dir}", "--model-control-mode=explicit",
                *(f"--load-model={m}" for m in self.models),
                f"--http-address={self.host}", f"--http-port={self.http_port}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                "--allow-metrics=false", "--exit-timeout-secs=10", "--strict-readiness=true"]

    def start(self) -> Server:
        if self.process is not None:
            raise RuntimeError("this server was started already")
        self._workdir = self._arrange()
        log = self.log_path or self._workdir / "tritonserver.log"
        self._log = open(log, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.command(self._workdir / "backends"), stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT, env=self._env(),
            start_new_session=True)
        return self

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log, printable (control characters escaped)."""
        path = self.log_path or (self._workdir / "tritonserver.log" if self._workdir else None)
        if path is None or not path.is_file():
            return ""
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 64 * 1024))
            text = f.read().decode(errors="replace")
        kept = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("+", "|"))]
        return "\n".join(ln.encode("unicode_escape").decode()[:400] for ln in kept[-lines:])

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """HTTP GET on the server (status, body); status 0 when it does not answer."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}",
                                        timeout=timeout) as r:
                return int(r.status), r.read(1 << 22)
        except urllib.error.HTTPError as e:
            return int(e.code), e.read(1 << 16)
        except (OSError, ValueError):
            return 0, b""

    def post(self, path: str, timeout: float = 60.0) -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://{self.http_url}{path}", data=b"{}",
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return int(r.status), r.read(1 << 16)
        except urllib.error.HTTPError as e:
            return int(e.code), e.read(1 << 16)
        except (OSError, ValueError):
            return 0, b""

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Return when the server and its models are ready; RuntimeError when it exits
        or the deadline passes (with the server's last log lines)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise RuntimeError(f"tritonserver exited (code {code}) before it was ready; "
                                   f"its log ends:\n{self.log_tail()}")
            if self.get("/v2/health/ready", timeout=2.0)[0] == 200:
                return
            time.sleep(0.2)
        raise RuntimeError(f"tritonserver was not ready after {timeout:g} s; its log ends:\n"
                           f"{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> int | None:
        """Stop the server (SIGTERM, then SIGKILL to its process group after ``timeout``);
        returns its exit code. Safe to call twice."""
        code = None
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # stubs left by a killed server
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5.0)
            code = process.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return code

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------
# fewstep serve REPO
# ---------------------------------------------------------------------------------


def build_parser(prog: str) -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")[1] if __doc__ else None
    p = clitools.parser(prog, doc)
    p.add_argument("repo", type=Path, help="a Triton model repository fewstep wrote "
                   "(fewstep export --triton DIR; python -m fewstep.export.triton ... --out DIR)")
    p.add_argument("--models", nargs="+", metavar="NAME", default=None,
                   help="the models to load (default: every Python-backend model of REPO)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--http-port", type=clitools.bounded_int(1, 65535, "the largest port"),
                   default=8000, help="HTTP/REST port")
    p.add_argument("--grpc-port", type=clitools.bounded_int(1, 65535, "the largest port"),
                   default=8001, help="gRPC port")
    p.add_argument("--ready-timeout", type=clitools.positive_int, default=120,
                   help="seconds to wait for the models to load")
    p.add_argument("--log", type=Path, default=None,
                   help="write the server's log here (default: a temporary file, whose last "
                        "lines are shown if the server fails)")
    return p


def body(args: argparse.Namespace) -> int:
    models = read_repository(args.repo)
    chosen = choose_models(models, args.models, args.repo)
    if args.http_port == args.grpc_port:
        raise ValueError(f"--http-port and --grpc-port are both {args.http_port}; pass two "
                         "different ports")
    try:
        bundle = find_bundle()
    except BundleUnavailable as e:
        raise ValueError(str(e)) from None
    for m in models:
        if m.refusal and m.name not in chosen:
            print(f"not served: {m.name} ({m.backend} model) {m.refusal}; serve it with "
                  "NVIDIA's tritonserver image", file=sys.stderr)
    server = Server(args.repo, chosen, args.host, args.http_port, args.grpc_port, args.log,
                    bundle)
    try:
        server.start()
        server.wait_ready(args.ready_timeout)
        print(f"serving {', '.join(chosen)} (Triton Python backend, CPU)")
        print(f"  HTTP  http://{server.http_url}  (e.g. curl http://{server.http_url}"
              "/v2/health/ready)")
        print(f"  gRPC  {server.grpc_url}")
        print(f"  server pid {server.pid}; Ctrl-C or SIGTERM stops it", flush=True)
        assert server.process is not None
        while server.process.poll() is None:
            time.sleep(0.5)
        raise RuntimeError(f"tritonserver exited (code {server.process.returncode}); its "
                           f"log ends:\n{server.log_tail()}")
    except KeyboardInterrupt:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut stop()
            signal.signal(sig, signal.SIG_IGN)
        code = server.stop()
        print(f"stopped (tritonserver exit code {code})", flush=True)
        return clitools.EXIT_OK
    except RuntimeError as e:
        server.stop()
        print(f"error: {e}", file=sys.stderr)
        return clitools.EXIT_FAILED_CHECK
    finally:
        server.stop()


main = clitools.main_of(build_parser, body)


@contextlib.contextmanager
def serving(repo: str | os.PathLike[str], models: Sequence[str] | None = None,
            ready_timeout: float = 120.0, **kwargs: Any) -> Iterator[Server]:
    """A started, ready server on ``repo`` (every servable model unless ``models``);
    stopped on leaving the block, also on an error."""
    chosen = choose_models(read_repository(repo), models, repo)
    server = Server(repo, chosen, **kwargs)
    try:
        server.start()
        server.wait_ready(ready_timeout)
        yield server
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main(prog="python -m fewstep.export.serve"))
