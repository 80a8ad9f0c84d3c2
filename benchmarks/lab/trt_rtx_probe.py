"""What TensorRT-RTX's ONNX parser and builder make of fewstep's graphs: one JSON record.

    python benchmarks/lab/trt_rtx_probe.py ARTIFACT_OR_ONNX [...] --out probe.json
        [--batch 1:1:4] [--target-cc 8.6,8.9] [--opt-level 3] [--plans DIR]

Every argument is a folder (every fewstep ONNX graph in it), an artifact's main ONNX
with ``--all-graphs`` (every graph of that artifact) or one ONNX file. Each graph is
built exactly as `fewstep build --engine tensorrt-rtx` builds it (``prepare_build`` +
``build_from_request``), and the record says per graph: file, kind, precision, steps,
parsed, built, seconds, plan bytes, error; plus the device, the versions (TensorRT-RTX,
fewstep, onnxruntime, torch if installed, Python) and the date. Plans go to a temporary
folder unless ``--plans`` names one. TensorRT-RTX builds ahead of time, so this runs with
or without a GPU; it needs no torch. Exit 0 when every graph built, 1 when one did not,
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fewstep.benchmarks import envinfo
from fewstep.export import tensorrt_build as tb
from fewstep.runtime import fileio
from fewstep.runtime.artifact import Artifact, read_onnx_meta
from fewstep.runtime.errors import ArtifactError, BackendUnavailable
from fewstep.runtime.plan import BatchProfile


def graphs_of(path: Path, all_graphs: bool) -> list[Path]:
    """The ONNX graphs one argument stands for (ArtifactError when none)."""
    if path.is_dir():  # every fewstep graph in the folder
        found = sorted(f for f in path.glob("*.onnx") if f.is_file())
        for f in found:
            read_onnx_meta(f)  # not ONNX, no fewstep metadata: ArtifactError
    elif all_graphs:
        art = Artifact.open(path)
        if art.rejected:
            bad = art.rejected[0]
            raise ArtifactError(f"{bad.path}: {bad.problem}")
        found = sorted(g.path for g in art.graphs if g.path.name.endswith(".onnx"))
    else:
        read_onnx_meta(path)
        found = [path]
    if not found:
        raise ArtifactError(f"{path} holds no ONNX graph")
    return found


def probe_one(onnx: Path, plans: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Parse and build one graph; never raises for what TensorRT-RTX or the file does."""
    meta = read_onnx_meta(onnx)
    g = meta.graph
    row: dict[str, Any] = {
        "file": str(onnx), "kind": g.kind, "precision": g.precision,
        "steps": g.steps if g.kind == "sampler" else None,
        "parsed": None, "built": False, "seconds": None, "plan_bytes": None, "error": None,
    }
    out = tb.plan_name_for(onnx, plans, meta)
    started = time.perf_counter()
    try:
        request = tb.prepare_build(onnx, out, batch=args.batch, opt_level=args.opt_level,
                                   engine=tb.RTX, targets=args.target_cc)
        sidecar = tb.build_from_request(request)
    except tb.ParseFailed as e:
        row.update(parsed=False, error=str(e))
    except tb.BuildFailed as e:
        row.update(parsed=True, error=str(e))
    except Exception as e:  # recorded, not raised: the next graph is still probed
        row["error"] = f"{type(e).__name__}: {e}"
    else:
        row.update(parsed=True, built=True, plan_bytes=sidecar.plan_bytes,
                   targets=list(sidecar.targets), profile=str(sidecar.profile),
                   plan=str(out))
    row["seconds"] = round(time.perf_counter() - started, 3)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path, help="artifact folders or ONNX files")
    p.add_argument("--out", type=Path, required=True, help="the JSON record to write")
    p.add_argument("--all-graphs", action="store_true",
                   help="an ONNX argument stands for every graph of its artifact")
    p.add_argument("--batch", default="1:1:4", help="batch profile MIN:OPT:MAX")
    p.add_argument("--target-cc", default=None,
                   help="compute capabilities, e.g. 8.6,8.9 (default: TensorRT-RTX's own)")
    p.add_argument("--opt-level", type=int, default=3, help="builder optimisation level")
    p.add_argument("--plans", type=Path, default=None,
                   help="keep the plans in this folder (default: a temporary one)")
    args = p.parse_args(argv)
    try:
        fileio.check_writable_target(args.out)
        BatchProfile.parse(args.batch)
        tb.parse_targets(args.target_cc, tb.RTX)
        graphs = [(i, g) for i, path in enumerate(args.inputs)
                  for g in graphs_of(path, args.all_graphs)]
        trt = tb.import_build_module(tb.RTX)
    except (ArtifactError, ValueError, BackendUnavailable, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    started = datetime.datetime.now(datetime.timezone.utc)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.plans or Path(tmp)
        rows = []
        for i, onnx in graphs:
            plans = root / f"{i}-{args.inputs[i].name}"  # two artifacts' model.plan apart
            plans.mkdir(parents=True, exist_ok=True)
            row = probe_one(onnx, plans, args)
            if args.plans is None:
                row.pop("plan", None)  # gone with the temporary folder
            print(f"{onnx.name}: {row['kind']} {row['precision']} parsed={row['parsed']} "
                  f"built={row['built']} {row['seconds']} s"
                  + (f" {row['plan_bytes']} bytes" if row["built"] else f" ({row['error']})"),
                  file=sys.stderr, flush=True)
            rows.append(row)
    record = {
        "probe": "tensorrt-rtx parse + build of fewstep graphs",
        "date_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tensorrt_rtx": {"version": str(trt.__version__), "module": trt.__name__},
        "settings": {"batch": args.batch, "target_cc": args.target_cc,
                     "opt_level": args.opt_level},
        "summary": {"graphs": len(rows), "parsed": sum(r["parsed"] is True for r in rows),
                    "built": sum(r["built"] for r in rows)},
        "graphs": rows,
        "env": envinfo.collect("trt-rtx-probe", " ".join(sys.argv)),
    }
    fileio.write_text(args.out, json.dumps(record, indent=2, sort_keys=True) + "\n")
    s = record["summary"]
    print(f"{s['built']}/{s['graphs']} built, {s['parsed']} parsed; wrote {args.out}",
          file=sys.stderr)
    return 0 if s["built"] == s["graphs"] else 1


if __name__ == "__main__":
    sys.exit(main())
