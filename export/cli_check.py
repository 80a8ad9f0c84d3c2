"""Parity gate: run an exported model with ONNX Runtime and the PyTorch reference.

Checks every graph of the artifact (MODEL and its .step/.sampler-N siblings) on the
CPU execution provider and, when present, CUDA, with the same random inputs and noise,
against the source it was exported from: a checkpoint.pt of fewstep train, or the
diffusers folder (with --scheduler-config for a model folder, as given to export).
Exit 0 when every row meets its gate; 1 with the table when one does not, or when a
provider cannot run the graph at all (say a bf16 graph on ONNX Runtime's CPU provider:
those rows are shown as skipped; pass ``--providers cuda``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fewstep.runtime import clitools


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = clitools.parser(prog, __doc__)
    p.add_argument("model", type=Path, help="an exported .onnx file")
    p.add_argument("--against", type=Path, required=True, metavar="SOURCE",
                   help="what it was exported from: a checkpoint.pt or a diffusers folder")
    p.add_argument("--scheduler-config", type=Path, default=None, metavar="FILE",
                   help="scheduler_config.json of a diffusers model folder (a pipeline "
                        "folder's scheduler/ is used by default)")
    p.add_argument("--n", type=clitools.positive_int, default=4, help="samples per check")
    p.add_argument("--steps", type=clitools.positive_int, default=4,
                   help="step count for the denoiser and step graphs")
    p.add_argument("--eta", type=float, default=0.0, help="eta for the step graph's loop")
    p.add_argument("--seed", type=clitools.nonneg_int, default=0)
    p.add_argument("--providers", default=None,
                   help="comma-separated subset of cpu,cuda (default: all available)")
    p.add_argument("--min-psnr-fp32", type=float, default=40.0)
    p.add_argument("--min-psnr-fp16", type=float, default=35.0)
    p.add_argument("--min-psnr-bf16", type=float, default=30.0)
    return p


def body(args: argparse.Namespace) -> int:
    from fewstep.runtime import artifact

    from . import api, check

    main_meta = artifact.read_onnx_meta(args.model)  # a foreign file: before torch work
    artifact.siblings(args.model)  # ... and for a sibling graph that lies outside the folder
    providers = None
    if args.providers:
        providers = [p.strip() for p in args.providers.split(",") if p.strip()]
        have = check.available_providers()
        for p in providers:
            if p not in check.PROVIDERS:
                raise ValueError(f"--providers {p!r} is unknown; use cpu and/or cuda")
            if p not in have:
                raise ValueError(f"--providers {p!r} is not available here (have: {have})")
    model, source_meta = api.load_source(
        args.against, args.scheduler_config,
        main_meta.sample_shape if args.against.is_dir() else None)
    graphs = len(artifact.siblings(args.model))
    with clitools.Progress(graphs, "check", unit="graph") as progress:  # a bar on a terminal
        rows = check.check_artifact(
            args.model, model, source_meta, providers=providers, n=args.n,
            steps=args.steps, eta=args.eta, seed=args.seed,
            gates={"fp32": args.min_psnr_fp32, "fp16": args.min_psnr_fp16,
                   "bf16": args.min_psnr_bf16}, progress=progress,
        )
    print(check.table(rows))
    verdict = check.summary(rows)
    if any(r.failed for r in rows) or any(r.skipped for r in rows):
        # a row that could not run is not a pass: say so (e.g. bf16 on the CPU provider)
        raise clitools.CheckFailed(verdict)
    print(verdict, file=sys.stderr)
    return 0


main = clitools.main_of(build_parser, body)
