"""NVIDIA Jetson detection: board, L4T release, power mode and clocks, best effort.

``detect()`` never fails: on anything that is not a Jetson it returns None, and a
missing or unreadable tool (``nvpmodel``, ``jetson_clocks``) leaves its field None.
The file paths and the command runner are parameters so tests can fake a board.

Why it matters to the runtime: a Jetson's GPU shares the board's memory with the
CPU, so the ONNX Runtime backend grows its CUDA memory arena by exactly what is
requested (``kSameAsRequested``) and caps it (``gpu_mem_limit``) there; and the
power mode and clocks decide the speed a benchmark measures, so ``fewstep info``
prints them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

TEGRA_RELEASE: Final = Path("/etc/nv_tegra_release")
DEVICE_TREE_MODEL: Final = Path("/proc/device-tree/model")

# Runs a command, returns its stdout, or None when it is missing, fails or hangs.
Runner = Callable[[Sequence[str]], "str | None"]


@dataclass(frozen=True)
class JetsonInfo:
    model: str                 # board, e.g. "NVIDIA Jetson AGX Orin Developer Kit"
    l4t_release: str           # e.g. "36.4.3" (R36, REVISION 4.3), or "" if unknown
    power_mode: str | None     # nvpmodel mode name and id, e.g. "MAXN (0)"
    clocks: str | None         # "pinned to maximum (jetson_clocks on)" / "dynamic ..."

    def to_dict(self) -> dict[str, str | None]:
        return {"model": self.model, "l4t_release": self.l4t_release,
                "power_mode": self.power_mode, "clocks": self.clocks}


def run_command(argv: Sequence[str], timeout: float = 5.0) -> str | None:
    """stdout of ``argv``, or None when the tool is missing, fails or takes too long."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              check=False)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return done.stdout if done.returncode == 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", "replace").replace("\x00", "").strip()
    except OSError:
        return None


def parse_l4t_release(text: str) -> str:
    """``# R36 (release), REVISION: 4.3, ...`` → ``36.4.3``; "" when unrecognised."""
    major = re.search(r"\bR(\d+)\b", text)
    revision = re.search(r"REVISION:\s*([0-9][0-9.]*)", text)
    if not major:
        return ""
    return major.group(1) + (f".{revision.group(1).rstrip('.')}" if revision else "")


def parse_power_mode(text: str) -> str | None:
    """``nvpmodel -q`` output (``NV Power Mode: MAXN`` then the mode id) → ``MAXN (0)``."""
    m = re.search(r"NV Power Mode:\s*(.+)", text)
    if not m:
        return None
    name = m.group(1).strip()
    ids = [line.strip() for line in text[m.end():].splitlines() if line.strip().isdigit()]
    return f"{name} ({ids[0]})" if ids else name


def parse_clocks(text: str) -> str | None:
    """``jetson_clocks --show`` → whether the clocks are pinned at their maximum.

    jetson_clocks pins each CPU and the GPU by raising its minimum frequency to the
    maximum, and the memory clock (EMC) with an override (``FreqOverride=1``); the
    report has one ``MinFreq=… MaxFreq=…`` line per clock.
    """
    states = []
    for line in text.splitlines():
        m = re.search(r"MinFreq=(\d+)\s+MaxFreq=(\d+)", line)
        if m:
            states.append(m.group(1) == m.group(2) or "FreqOverride=1" in line)
    if not states:
        return None
    if all(states):
        return "pinned to maximum (jetson_clocks on)"
    return "dynamic frequency scaling (jetson_clocks off)"


def is_jetson(tegra_release: Path = TEGRA_RELEASE,
              device_tree_model: Path = DEVICE_TREE_MODEL) -> bool:
    """Cheap check (two file reads, no subprocess)."""
    if tegra_release.is_file():
        return True
    model = _read(device_tree_model)
    return bool(model) and "jetson" in (model or "").lower()


def detect(
    tegra_release: Path = TEGRA_RELEASE,
    device_tree_model: Path = DEVICE_TREE_MODEL,
    run: Runner = run_command,
) -> JetsonInfo | None:
    """The Jetson this runs on, or None when this is not a Jetson. Never raises."""
    if not is_jetson(tegra_release, device_tree_model):
        return None
    model = _read(device_tree_model) or "NVIDIA Jetson (unknown board)"
    release = parse_l4t_release(_read(tegra_release) or "")
    try:
        mode_text = run(["nvpmodel", "-q"])
        clocks_text = run(["jetson_clocks", "--show"])
    except Exception:  # an injected runner must not break `fewstep info`
        mode_text = clocks_text = None
    return JetsonInfo(
        model=model,
        l4t_release=release,
        power_mode=parse_power_mode(mode_text) if mode_text else None,
        clocks=parse_clocks(clocks_text) if clocks_text else None,
    )


def physical_memory_bytes() -> int | None:
    """Total RAM (on a Jetson: the memory the CPU and the GPU share), or None."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None
