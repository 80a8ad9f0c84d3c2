"""Result files: results.jsonl (atomic), report.md, and the PNG plots.

results.jsonl: line 1 is the run record (``"record": "run"``: environment, roofline,
configuration); every further line is one result row (``"record": "result"``) with
the same ``run_id``. Non-finite floats are written as null (JSON has no Infinity).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from fewstep.runtime.fileio import atomic_path

from .envinfo import gpu_line

RESULTS: Final = "results.jsonl"
REPORT: Final = "report.md"
PLOT_STEPS: Final = "latency_vs_steps.png"
PLOT_BATCH: Final = "throughput_vs_batch.png"
# The project's latency goals: fewstep's best path at most 0.6x torch.compile's and 0.1x
# eager PyTorch's p50, and host overhead at most 3 % of the network's own time.
TARGETS: Final = {"compile": 0.6, "eager": 0.1, "overhead_pct": 3.0}


def _clean(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and callable(v.item):  # numpy scalars
        return _clean(v.item())
    if isinstance(v, Path):
        return str(v)
    return v


def write_results(path: Path, run: dict[str, Any], rows: Sequence[dict[str, Any]]) -> Path:
    """The whole file, atomically (rewritten after every row, so a killed run keeps all
    rows finished so far)."""
    lines = [json.dumps(_clean({"record": "run", **run}), sort_keys=False)]
    lines += [json.dumps(_clean(r)) for r in rows]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_results(path: Path, run_kind: str = "bench run"
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run record and result rows of a results file written by the suite
    (``run_kind`` names the run in the messages: "bench run", "resolution run")."""
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist; pass the --out folder of a {run_kind}")
    run: dict[str, Any] = {}
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{n} is not JSON ({e}); the file is damaged") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n} is not a JSON object; the file is damaged")
        if rec.get("record") == "run":
            run = rec
        elif rec.get("record") == "result":
            rows.append(rec)
    if not run:
        raise ValueError(f"{path} has no run record (line 1); it was not written by a "
                         f"fewstep {run_kind}")
    return run, rows


# ---------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    steps: int
    batch: int
    fewstep: str
    fewstep_ms: float
    baseline: str
    baseline_ms: float
    spread_ms: float = 0.0  # the larger p90 - p50 of the two rows

    @property
    def within_spread(self) -> bool:
        """The difference is smaller than the timings' own spread: not a result."""
        return abs(self.fewstep_ms - self.baseline_ms) < self.spread_ms

    @property
    def ratio(self) -> float:
        """fewstep's time over the baseline's: < 1 means fewstep is faster."""
        return self.fewstep_ms / self.baseline_ms

    @property
    def loses(self) -> bool:
        return self.fewstep_ms > self.baseline_ms


def ok(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok" and r.get("p50_ms") is not None]


def best_fewstep(rows: Iterable[dict[str, Any]], steps: int, batch: int
                 ) -> dict[str, Any] | None:
    mine = [r for r in ok(rows) if r["family"] == "fewstep" and r["steps"] == steps
            and r["batch"] == batch]
    return min(mine, key=lambda r: r["p50_ms"]) if mine else None


def _spread(row: dict[str, Any]) -> float:
    p90 = row.get("p90_ms")
    return 0.0 if p90 is None else max(0.0, p90 - row["p50_ms"])


def comparisons(rows: Sequence[dict[str, Any]]) -> list[Comparison]:
    """fewstep's fastest path against every baseline, at every (steps, batch) with both."""
    out = []
    configs = sorted({(r["steps"], r["batch"]) for r in ok(rows)}, key=lambda c: (c[1], c[0]))
    for steps, batch in configs:
        best = best_fewstep(rows, steps, batch)
        if best is None:
            continue
        for r in ok(rows):
            if r["family"] == "baseline" and r["steps"] == steps and r["batch"] == batch:
                spread = max(_spread(best), _spread(r))
                out.append(Comparison(steps, batch, best["name"], best["p50_ms"], r["name"],
                                      r["p50_ms"], spread))
    return out


def loses_lines(comps: Sequence[Comparison]) -> list[str]:
    return [
        f"fewstep loses at steps={c.steps}, batch={c.batch}: {c.baseline} {c.baseline_ms:.3f} ms "
        f"vs fewstep's best ({c.fewstep}) {c.fewstep_ms:.3f} ms, {c.ratio:.2f}x slower"
        + (f" (within the timings' spread of {c.spread_ms:.3f} ms: noise, not a result)"
           if c.within_spread else "")
        for c in comps if c.loses
    ]


def target_lines(rows: Sequence[dict[str, Any]], steps: int = 4, batch: int = 1) -> list[str]:
    """The latency targets (``TARGETS``) at (steps, batch): met, or missed by how much."""
    best = best_fewstep(rows, steps, batch)
    if best is None:
        return [f"no fewstep row at steps={steps}, batch={batch}: targets not evaluated"]
    lines = [f"fewstep's best path: {best['name']}, p50 {best['p50_ms']:.3f} ms"]
    for family, limit in (("torch-compile", TARGETS["compile"]), ("torch-eager", TARGETS["eager"])):
        theirs = [r for r in ok(rows) if r["path"] == family and r["steps"] == steps
                  and r["batch"] == batch]
        if not theirs:
            lines.append(f"vs {family}: no {family} row at this configuration")
            continue
        fastest = min(theirs, key=lambda r: r["p50_ms"])
        ratio = best["p50_ms"] / fastest["p50_ms"]
        verdict = "met" if ratio <= limit else f"MISSED by {ratio / limit:.2f}x"
        lines.append(f"vs {fastest['name']} ({fastest['p50_ms']:.3f} ms): ratio {ratio:.3f} "
                     f"(target <= {limit}): {verdict}")
    pct = best.get("host_overhead_pct")
    if pct is None:
        lines.append("host overhead: not measured (no network-only time)")
    elif pct < 0:
        lines.append(f"host overhead {best['host_overhead_ms']:.3f} ms: the network-only p50 "
                     "is above the end-to-end p50, so the overhead is within the timing noise")
    else:
        verdict = "met" if pct <= TARGETS["overhead_pct"] else (
            f"MISSED ({pct:.1f} % > {TARGETS['overhead_pct']:g} %)")
        lines.append(f"host overhead {best['host_overhead_ms']:.3f} ms = {pct:.1f} % of network "
                     f"time {best['network_ms']:.3f} ms (target <= 3 %): {verdict}")
    return lines


# ---------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:.0f}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


def _table(header: Sequence[str], body: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in body:
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")
    return lines


def path_order(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Path names in report order: fewstep's first, then the baselines, each by name."""
    names = {r["name"]: r["family"] for r in rows if r.get("steps") is not None}
    return sorted(names, key=lambda n: (names[n] != "fewstep", n))


def _cell(rows: Sequence[dict[str, Any]], name: str, steps: int, batch: int) -> str:
    for r in rows:
        if r["name"] == name and r["steps"] == steps and r["batch"] == batch:
            status = r["status"]
            if status == "ok":
                return _f(r["p50_ms"])
            return {"skipped": "skip", "error": "err"}.get(status, status)
    return ""


def _parity_cell(rows: Sequence[dict[str, Any]], name: str, batch: int) -> str:
    mine = [r for r in ok(rows) if r["name"] == name and r["batch"] == batch
            and r.get("psnr_db") is not None]
    if not mine:
        return "-"
    return (f"{min(r['psnr_db'] for r in mine):.1f} / "
            f"{max(r['max_abs_err'] for r in mine)}")


def _env_lines(run: dict[str, Any]) -> list[str]:
    env = run.get("environment", {})
    ort = env.get("onnxruntime") or {}
    torch = env.get("torch") or {}
    trt = env.get("tensorrt") or {}
    few = env.get("fewstep") or {}
    cpu = env.get("cpu") or {}
    items: list[tuple[str, Any]] = [
        ("device", gpu_line(env)),
        ("date (UTC)", env.get("date_utc")),
        ("host", env.get("hostname")),
        ("fewstep", f"{few.get('version')} commit {few.get('commit') or '?'}"
                    + (" (uncommitted changes)" if few.get("dirty") else "")),
        ("CPU", f"{cpu.get('model')}, {cpu.get('usable_cores')} usable cores"),
        ("Python / numpy", f"{env.get('python')} / {env.get('numpy')}"),
        ("onnxruntime", f"{ort.get('version')} ({', '.join(ort.get('providers') or [])})"),
        ("torch", f"{torch.get('version')} (CUDA {torch.get('cuda')}, cudnn {torch.get('cudnn')}, "
                  f"matmul TF32 {torch.get('matmul_allow_tf32')}, cudnn TF32 "
                  f"{torch.get('cudnn_allow_tf32')})" if torch.get("imported")
         else torch.get("version")),
        ("TensorRT", trt.get("version") or f"not available ({trt.get('error')})"),
        ("CUDA API for memory", run.get("cuda_api")),
    ]
    for when in ("gpus_start", "gpus_end"):
        for g in env.get(when) or []:
            items.append((f"GPU clocks at {when[5:]}",
                          f"SM {g.get('clocks.sm')} MHz (max {g.get('clocks.max.sm')}), memory "
                          f"{g.get('clocks.mem')} MHz, {g.get('power.draw')} W of "
                          f"{g.get('power.limit')}, {g.get('temperature.gpu')} C, "
                          f"pstate {g.get('pstate')}"))
    if env.get("jetson"):
        # A field the board's tools did not give (jetson_clocks --show without root, say)
        # is written as unknown: the line is kept, since the mode decides the latency.
        j = env["jetson"]
        items.append(("Jetson", f"{j.get('model')}, L4T {j.get('l4t_release') or '?'}, "
                                f"nvpmodel {j.get('power_mode') or 'unknown'}, "
                                f"clocks {j.get('clocks') or 'unknown'}"))
    return _table(["", ""], [(k, v) for k, v in items if v is not None and "None" not in str(v)])


def _roofline_lines(run: dict[str, Any], rows: Sequence[dict[str, Any]]) -> list[str]:
    roof = run.get("roofline")
    if not roof:
        return ["Not measured (--no-roofline, or onnx is not installed)."]
    lines: list[str] = []
    for dev, c in (roof.get("ceilings") or {}).items():
        if not c:
            lines.append(f"- {dev}: ceilings not measured")
            continue
        bf16 = c.get("matmul_bf16_tflops")
        lines.append(
            f"- {dev} ceilings ({c.get('device')}, {c.get('clock')}, {c.get('method')}): "
            + (f"bf16 matrix product {bf16:.1f} TFLOP/s, " if bf16 else "")
            + f"fp32 matrix product {c['matmul_fp32_tflops']:.2f} TFLOP/s, copy "
            f"{c['copy_gbps']:.0f} GB/s (read + write)")
    lines.append("")
    lines += _table(
        ["precision", "batch", "matrix GFLOP", "elementwise MFLOP", "weights MB",
         "bytes min MB", "bytes max MB", "counted from"],
        [(c["precision"], c["batch"], _f(c["matmul_flops"] / 1e9), _f(c["elementwise_flops"] / 1e6),
          _f(c["weight_bytes"] / 1e6), _f(c["bytes_min"] / 1e6), _f(c["bytes_max"] / 1e6),
          Path(roof["sources"].get(c["precision"], "?")).name) for c in roof.get("costs", [])])
    lines.append("")
    floors = roof.get("floors_ms_per_step") or []
    if floors:
        lines.append("Floor per step = max(FLOPs / matrix rate, bytes min / copy bandwidth):")
        lines.append("")
        lines += _table(["device", "precision", "batch", "floor µs per step", "bound"],
                        [(f["device"], f["precision"], f["batch"], _f(f["floor_ms"] * 1e3),
                          f["bound"]) for f in floors])
        lines.append("")
    fr = [r for r in ok(rows) if r.get("floor_fraction") is not None]
    if fr:
        lines.append("Fraction of the floor reached (floor / measured time per step; 100 % = "
                     "at the roofline), by path, at the smallest batch:")
        lines.append("")
        b0 = min(r["batch"] for r in fr)
        steps = sorted({r["steps"] for r in fr if r["batch"] == b0})
        body = []
        for name in path_order(fr):
            cells = []
            for s in steps:
                hit = [r for r in fr if r["name"] == name and r["steps"] == s and r["batch"] == b0]
                cells.append(f"{100 * hit[0]['floor_fraction']:.2g} %" if hit else "")
            body.append([name, *cells])
        lines += _table([f"path (batch {b0})", *[f"{s} steps" for s in steps]], body)
    for n in roof.get("notes") or []:
        lines.append(f"- note: {n}")
    return lines


def render_markdown(run: dict[str, Any], rows: Sequence[dict[str, Any]],
                    plots: Sequence[str] = (), plot_note: str | None = None) -> str:
    env = run.get("environment", {})
    measured = [r for r in rows if r.get("steps") is not None]
    out = [f"# fewstep latency benchmark: {run.get('run_id')}", "",
           f"{gpu_line(env)}, {env.get('date_utc')}. Command: `{run.get('command')}`", "",
           "End to end = host noise in → (B, H, W, C) uint8 images on the host, p50 of "
           "`iterations` timed calls after warm-up (synchronised perf_counter). Same noise, "
           "labels and guidance for every path; numbers from different machines are never "
           "compared.", "",
           *[f"- note: {n}" for n in run.get("notes") or []],
           "", "## Environment", "", *_env_lines(run), ""]
    steps_all = sorted({r["steps"] for r in measured})
    out += ["## Latency, p50 ms", "",
            "Parity column: the lowest PSNR (dB) and the largest max-abs error (uint8 levels) "
            "of the path's images against the PyTorch fp32 reference over the step counts "
            f"(100 dB = identical). Reference: {run.get('reference')}.", ""]
    for batch in sorted({r["batch"] for r in measured}):
        at = [r for r in measured if r["batch"] == batch]
        out += [f"### batch {batch}", ""]
        body = [[name, *[_cell(at, name, s, batch) for s in steps_all],
                 _parity_cell(at, name, batch)] for name in path_order(at)]
        out += _table(["path", *[f"{s} steps" for s in steps_all], "parity PSNR / max err"],
                      body)
        out.append("")
    comps = comparisons(rows)
    out += ["## fewstep against the baselines", "",
            "Ratio = fewstep's fastest path / the baseline (below 1: fewstep is faster).", ""]
    if comps:
        out += _table(["steps", "batch", "fewstep best", "ms", "baseline", "ms", "ratio"],
                      [(c.steps, c.batch, c.fewstep, _f(c.fewstep_ms), c.baseline,
                        _f(c.baseline_ms), f"{c.ratio:.3f}") for c in comps])
        out.append("")
        lost = loses_lines(comps)
        out += ["### Where fewstep loses", ""]
        out += [f"- {line}" for line in lost] or [
            "- nowhere: fewstep's best path is faster than every baseline at every "
            "configuration measured here."]
        out.append("")
    else:
        out += ["No configuration has both a fewstep row and a baseline row.", ""]
    out += ["## Latency targets (batch 1, 4 steps)", ""]
    out += [f"- {line}" for line in target_lines(rows)]
    out += ["", "## Roofline", "", *_roofline_lines(run, rows), ""]
    out += ["## All rows", ""]
    body = []
    for r in sorted(ok(rows), key=lambda r: (r["batch"], r["steps"], r["family"] != "fewstep",
                                             r["name"])):
        body.append([
            r["name"], r["steps"], r["batch"], _f(r["p50_ms"]), _f(r["p90_ms"]), _f(r["p99_ms"]),
            _f(r["std_ms"]), _f(r["per_step_ms"]), _f(r["network_ms"]),
            _f(r["host_overhead_pct"], 2), _f(r["noise_ms"]), _f(r["cold_start_ms"]),
            _f(r["device_mem_mb"]), _f(r["host_rss_delta_mb"]), _f(r["images_per_s"]),
            _f(r["max_abs_err"]), _f(r["psnr_db"]), r["iterations"],
            "-" if r.get("floor_fraction") is None else f"{100 * r['floor_fraction']:.2g} %"])
    out += _table(["path", "steps", "batch", "p50 ms", "p90", "p99", "std", "ms/step",
                   "network ms", "overhead %", "noise ms", "cold start ms", "device MiB",
                   "RSS +MiB", "img/s", "max err", "PSNR", "iters", "of floor"], body)
    out.append("")
    out += ["Network-only methods:", ""]
    methods = {(r["name"], r["network_method"]) for r in ok(rows) if r.get("network_method")}
    out += [f"- {name}: {m}" for name, m in sorted(methods)]
    out.append("")
    other = [r for r in rows if r.get("status") not in ("ok", "n/a")]
    na = [r for r in rows if r.get("status") == "n/a"]
    out += ["## Not measured", ""]
    out += [f"- {r['name']}" + (f" steps={r['steps']} batch={r['batch']}" if r.get("steps")
                                else "") + f": {r['status']}: {r.get('reason')}" for r in other]
    for reason in dict.fromkeys(f"{r['name']}: {r['reason']}" for r in na):
        count = sum(f"{r['name']}: {r['reason']}" == reason for r in na)
        out.append(f"- n/a ({count} configurations): {reason}")
    if not other and not na:
        out.append("- everything asked for was measured")
    out.append("")
    out += ["## Plots", ""]
    out += [f"![{p}]({p})" for p in plots]
    if plot_note:
        out.append(plot_note)
    out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------


def write_plots(out_dir: Path, rows: Sequence[dict[str, Any]]) -> tuple[list[str], str | None]:
    """(PNG file names written, a note when some could not be)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullLocator
    except ImportError:
        return [], ("matplotlib is not installed, so no plots were drawn: "
                    "pip install 'fewstep[bench]'")
    good = ok(rows)
    written, notes = [], []
    for file, x_key, fixed_key, fixed_pref, y_key, title, ylabel in (
        (PLOT_STEPS, "steps", "batch", 1, "p50_ms", "latency vs steps", "p50 ms (end to end)"),
        (PLOT_BATCH, "batch", "steps", 4, "images_per_s", "throughput vs batch",
         "images / s (p50)"),
    ):
        values = sorted({r[fixed_key] for r in good})
        if not values:
            notes.append(f"{file}: no successful rows to plot")
            continue
        fixed = fixed_pref if fixed_pref in values else values[0]
        fig, ax = plt.subplots(figsize=(8, 5))
        drawn = 0
        for name in path_order(good):
            pts = sorted((r[x_key], r[y_key]) for r in good
                         if r["name"] == name and r[fixed_key] == fixed)
            if not pts:
                continue
            family = next(r["family"] for r in good if r["name"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    linestyle="-" if family == "fewstep" else "--", label=name)
            drawn += 1
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        xs = sorted({r[x_key] for r in good if r[fixed_key] == fixed})
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(x_key)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} ({fixed_key} {fixed}); solid: fewstep, dashed: baselines")
        ax.grid(True, which="both", alpha=0.3)
        if drawn:
            ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        with atomic_path(out_dir / file) as tmp, open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
        plt.close(fig)
        written.append(file)
    return written, ("; ".join(notes) or None)


def write_report(out_dir: Path, run: dict[str, Any], rows: Sequence[dict[str, Any]],
                 plots: bool = True) -> list[Path]:
    """report.md and the plots in ``out_dir``; returns the files written."""
    names, note = write_plots(out_dir, rows) if plots else ([], "plots not drawn (--no-plots)")
    text = render_markdown(run, rows, names, note)
    with atomic_path(out_dir / REPORT) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return [out_dir / REPORT, *(out_dir / n for n in names)]


# ---------------------------------------------------------------------------------
# The short table printed last
# ---------------------------------------------------------------------------------


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """p50 ms per path at the key configurations, then the lines where fewstep loses."""
    measured = [r for r in rows if r.get("steps") is not None]
    have = {(r["steps"], r["batch"]) for r in measured}
    keys = [k for k in ((4, 1), (4, 4), (1, 1), (8, 1), (20, 1), (50, 1), (4, 16), (4, 64))
            if k in have] or sorted(have)[:6]
    width = max([len(n) for n in path_order(measured)] + [4])
    head = f"{'path':<{width}} " + " ".join(f"{f's{s}/b{b}':>9}" for s, b in keys)
    lines = [head, "-" * len(head)]
    for name in path_order(measured):
        cells = [_cell(measured, name, s, b) or "" for s, b in keys]
        lines.append(f"{name:<{width}} " + " ".join(f"{c:>9}" for c in cells))
    unavailable = [r for r in rows if r.get("status") == "unavailable"]
    for r in unavailable:
        reason = str(r.get("reason"))
        lines.append(f"{r['name']}: unavailable: "
                     + (reason if len(reason) <= 100 else reason[:97] + "..."))
    lines += loses_lines(comparisons(rows))
    lines += target_lines(rows)
    return "\n".join(lines)
