"""Describe a model, the backends that can run it here, and the device.

Prints the model's metadata (prediction type, schedule, image shape, classes,
precision, source hash, training highlights, distilled steps), every graph of the
artifact (kind, precision, baked steps, size on disk), which backends are usable
and why not, and the device: ONNX Runtime providers, the GPU (nvidia-smi, when
present) and on a Jetson the board, L4T release, power mode and clocks. Reads the
files' metadata only: no session is created. --json for machine-readable output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import artifact, clitools
from .errors import inert
from .meta import graph_summary, meta_summary
from .plan import ENGINE_NAMES

MAX_LINE = 4000  # characters of one line of the report (a long class list is elided)
TRAIN_HIGHLIGHTS = ("data", "preset", "image_size", "steps", "batch_size", "lr",
                    "ema_decay", "cfg_dropout", "seed")


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = clitools.parser(prog, __doc__)
    p.add_argument("path", nargs="?", type=Path, default=None,
                   help="model.onnx, a .plan or an .oracle.json (default: the shipped model)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def graphs_of(art: artifact.Artifact) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every graph file of the artifact with its summary, and the shared data files."""
    rows: list[dict[str, Any]] = []
    for f in art.files:
        row: dict[str, Any] = {"file": f.path.name, "size_bytes": f.path.stat().st_size}
        if f.meta is not None:
            row.update(graph_summary(f.meta))
        else:
            row["error"] = f.problem
        if f.sidecar is not None:
            sc = f.sidecar
            row["plan"] = {"engine": sc.engine, "version": sc.tensorrt_version,
                           "targets": list(sc.targets), "built_on": sc.gpu_name,
                           "compute_capability": sc.compute_capability,
                           "profile": str(sc.profile), "runs_on": sc.describe_target()}
        rows.append(row)
    return rows, art.weights()


def device_info() -> dict[str, Any]:
    """ONNX Runtime version and providers, the GPU (nvidia-smi), the Jetson board."""
    from . import jetson

    d: dict[str, Any] = {}
    try:
        import onnxruntime as ort

        d["onnxruntime"] = ort.__version__
        d["providers"] = list(ort.get_available_providers())
    except ImportError as e:
        d["onnxruntime"] = None
        d["providers"] = []
        d["onnxruntime_error"] = str(e)
    smi = jetson.run_command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"])
    d["gpus"] = [line.strip() for line in smi.splitlines() if line.strip()] if smi else []
    board = jetson.detect()
    d["jetson"] = board.to_dict() if board else None
    return d


def collect(path: Path | None) -> dict[str, Any]:
    from . import backends
    from .pipeline import default_model_path

    art = artifact.Artifact.open(path if path is not None else default_model_path())
    meta = art.meta
    rows, shared = graphs_of(art)
    variant = (artifact.find_variant(art.path, "ort-cuda")
               if art.ext == ".onnx" and meta.graph.target == "portable" else None)
    if variant is not None:
        vrows, vshared = graphs_of(artifact.Artifact.open(variant))
        rows += vrows
        shared.update(vshared)
    config = meta.train_config
    return {
        "path": str(art.path),
        "model": {**meta_summary(meta), "precision": meta.graph.precision,
                  "train_config": {k: config[k] for k in TRAIN_HIGHLIGHTS if k in config}},
        "graphs": rows,
        "shared_files": shared,
        "backends": backends.availability(),
        "device": device_info(),
    }


def _size(n: int) -> str:
    if n < 0:
        return "MISSING"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def render(info: dict[str, Any]) -> str:
    m = info["model"]
    s = m["schedule"]
    shape = m["sample_shape"]
    names = ", ".join(f"{i}={n}" for i, n in enumerate(m["class_names"]))
    classes = (f"{m['num_classes']} ({names})" if names else str(m["num_classes"])) \
        if m["num_classes"] else "unconditional"
    lines = [
        f"model        {info['path']}",
        f"prediction   {m['prediction_type']}",
        f"schedule     {s['beta_schedule']}, T={s['num_train_timesteps']}, "
        f"beta {s['beta_start']:g}..{s['beta_end']:g}"
        + (", zero terminal SNR" if s["rescale_zero_terminal_snr"] else "")
        + f", clip {s['clip_sample_range']}"
        + (f", {s['trained_betas']} trained betas" if s["trained_betas"] else ""),
        f"spacing      {s['timestep_spacing']} (default)"
        + (f", steps offset {s['steps_offset']}" if s["steps_offset"] else "")
        + ("" if s["set_alpha_to_one"] else ", final alpha = alpha_bar[0]"),
        (f"image        {'x'.join(map(str, shape))} (C x H x W)" if m["images"] else
         f"sample       ({', '.join(map(str, shape))}) float32 arrays"),
        f"classes      {classes}"
        + (" (no null label: no guidance)" if m["num_classes"] and m["null_label"] is None
           else ""),
        *(f"cond         {inert(c['name'], 80)}: {c['dtype']} ({', '.join(map(str, c['shape']))})"
          + (f", null {c['null']:g}" if c["null"] is not None else ", no null")
          for c in m["cond"]),
        f"precision    {m['precision']}",
        "distilled    " + (f"{', '.join(map(str, m['distilled_steps']))} "
                            f"{'step' if m['distilled_steps'] == [1] else 'steps'} "
                            f"({m['distilled_spacing']})" if m["distilled_steps"] else "no"),
        f"source       {m['source_hash'] or '-'} (fewstep {m['fewstep_version'] or '?'})",
    ]
    if m["train_config"]:
        lines.append("training     " + ", ".join(f"{k}={v}" for k, v in m["train_config"].items()))
    lines += ["", "graphs"]
    # Columns: file, kind, precision, size (right-aligned), then the sampler's details.
    width = max([32] + [len(r["file"]) for r in info["graphs"]]
                + [len(loc) for loc in info["shared_files"]])
    for row in info["graphs"]:
        if "error" in row:
            lines.append(f"  {row['file']:<{width}}  unreadable: {row['error']}")
            continue
        detail = ""
        if row["kind"] == "sampler":
            detail = (f"  steps={row['steps']} spacing={row['spacing']} eta={row['eta']:g} "
                      f"-> {row['output_format']}")
        precision = row["precision"] + (" +guidance" if row["guidance"] else "")
        if "target" in row:
            detail += f"  {row['target']} only (ONNX Runtime's CUDA provider)"
        lines.append(f"  {row['file']:<{width}}  {row['kind']:<9} {precision:<14} "
                     f"{_size(row['size_bytes']):>10}{detail}")
        if "plan" in row:
            p = row["plan"]
            lines.append(f"    {ENGINE_NAMES[p['engine']]} {p['version']} plan, batch "
                         f"{p['profile']}, runs on {p['runs_on']}"
                         + ("" if p["engine"] == "tensorrt" else
                            f" (built {'on ' + p['built_on'] if p['built_on'] else 'without a GPU'}"
                            "; the tensorrt backend cannot load it)"))
    for loc, size in info["shared_files"].items():
        lines.append(f"  {loc:<{width}}  {'weights':<9} {'':<14} {_size(size):>10}")
    lines += ["", "backends"]
    for name, reason in info["backends"].items():
        lines.append(f"  {name:<13} " + ("available" if reason is None else f"no: {reason}"))
    d = info["device"]
    lines += ["", "device"]
    lines.append(f"  onnxruntime  {d['onnxruntime'] or 'not installed'}"
                 + (f" ({', '.join(d['providers'])})" if d["providers"] else ""))
    gpus = "; ".join(d["gpus"]) if d["gpus"] else "none found (nvidia-smi)"
    lines.append(f"  GPU          {gpus}")
    if d["jetson"]:
        j = d["jetson"]
        lines.append(f"  Jetson       {j['model']}, L4T {j['l4t_release'] or '?'}")
        lines.append(f"  power mode   {j['power_mode'] or 'unknown (nvpmodel -q failed)'}")
        lines.append(f"  clocks       {j['clocks'] or 'unknown (jetson_clocks --show needs root)'}")
    # Class names, versions, training settings and file names come from the files: shown
    # with every unprintable character escaped, so none can act on the terminal.
    return "\n".join(inert(line, limit=MAX_LINE) for line in lines)


def body(args: argparse.Namespace) -> int:
    info = collect(args.path)
    if args.json:
        json.dump(info, sys.stdout, indent=2, sort_keys=True)
        print()
    else:
        print(render(info))
    return 0


main = clitools.main_of(build_parser, body)
