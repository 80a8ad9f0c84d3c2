"""The resolution axis's rows and files: ratios and the bound rule applied to rows,
resolution.jsonl (atomic) and resolution.md (a table per path; where fewstep wins and loses,
and why, written from the rows). The run and the rule's statement: ``resolution.py``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from fewstep.runtime import clitools
from fewstep.runtime.fileio import write_text

from . import report
from .envinfo import gpu_line

RESULTS: Final = "resolution.jsonl"
REPORT: Final = "resolution.md"
SCALING_THRESHOLD: Final = 0.5  # the bound rule (resolution.py's docstring)
# Below this share of a step in the launch floor, a CUDA-graph path whose time does not
# follow the work is under-occupied rather than launch-bound (resolution.py's docstring).
LAUNCH_SHARE: Final = 0.05
BOUNDS: Final = {"launch-bound": "launch", "under-occupied": "under-occupied",
                 "compute-bound": "compute"}
ROW_KEYS: Final = (
    "record", "size", "batch", "steps", "path", "family", "precision", "device", "status",
    "reason", "p50_ms", "images_per_s", "per_step_ms", "vs_torch_compile",
    "torch_compile_ref", "vs_torch_eager", "torch_eager_ref", "flops_per_step",
    "floor_ms_per_step", "floor_fraction", "roofline_bound", "kernels_per_step", "launch_us",
    "launch_floor_ms", "launch_fraction", "scaling", "bound", "max_abs_err", "psnr_db",
    "bench",
)


# ---------------------------------------------------------------------------------
# Rows: ratios, roofline and launch fractions, bound
# ---------------------------------------------------------------------------------


def new_row(**fields: Any) -> dict[str, Any]:
    unknown = set(fields) - set(ROW_KEYS)
    assert not unknown, f"unknown row fields {sorted(unknown)}"
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
    row.update(record="result", **fields)
    return row




def _ok(r: dict[str, Any]) -> bool:
    return r["status"] == "ok" and bool(r.get("p50_ms"))


def _base(name: str) -> str | None:
    for prefix in ("torch-compile", "torch-eager"):
        if name.startswith(prefix):
            return prefix
    return None


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """vs_torch_compile / vs_torch_eager: p50 over the fastest such row of the same size,
    batch and steps."""
    refs: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:
        kind = _base(r["path"])
        if kind is None or not _ok(r):
            continue
        key = (kind, r["size"], r["batch"], r["steps"])
        if key not in refs or r["p50_ms"] < refs[key]["p50_ms"]:
            refs[key] = r
    for r in rows:
        for kind, field in (("torch-compile", "vs_torch_compile"),
                            ("torch-eager", "vs_torch_eager")):
            ref = refs.get((kind, r["size"], r["batch"], r["steps"]))
            if ref is None:
                continue
            r[field.replace("vs_", "") + "_ref"] = ref["path"]
            if _ok(r):
                r[field] = r["p50_ms"] / ref["p50_ms"]


def add_bounds(rows: list[dict[str, Any]]) -> None:
    """``scaling`` and ``bound`` of every measured row (the rule: module docstring)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        if _ok(r) and r.get("per_step_ms"):
            groups.setdefault((r["size"], r["path"], r["steps"]), []).append(r)
    for group in groups.values():
        group.sort(key=lambda r: r["batch"])
        for i, r in enumerate(group):
            if len(group) == 1:
                lf, wf = r.get("launch_floor_ms"), r.get("floor_ms_per_step")
                if lf is not None and wf is not None:
                    r["bound"] = "launch-bound" if lf >= wf else "compute-bound"
                continue
            a, b = (r, group[i + 1]) if i + 1 < len(group) else (group[i - 1], r)
            wa = a.get("flops_per_step") or a["batch"]
            wb = b.get("flops_per_step") or b["batch"]
            if wb <= wa:
                continue
            r["scaling"] = (b["per_step_ms"] / a["per_step_ms"] - 1) / (wb / wa - 1)
            if r["scaling"] >= SCALING_THRESHOLD:
                r["bound"] = "compute-bound"
            elif _replayed(r) and (r.get("launch_fraction") or 0.0) < LAUNCH_SHARE:
                r["bound"] = "under-occupied"
            else:
                r["bound"] = "launch-bound"


def _replayed(r: dict[str, Any]) -> bool:
    """A GPU path whose kernels are not launched one by one from Python: fewstep's graphs
    and torch.compile (CUDA graphs), not the eager loops."""
    return r.get("device") == "cuda" and "eager" not in str(r.get("path"))


# ---------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------


def _clean(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def write_results(path: Path, run: dict[str, Any], rows: Sequence[dict[str, Any]]) -> None:
    lines = [json.dumps(_clean({**run, "record": "run"}))]
    lines += [json.dumps(_clean(r)) for r in rows]
    write_text(path, "\n".join(lines) + "\n")


def read_results(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return report.read_results(path, "resolution run")


# ---------------------------------------------------------------------------------
# resolution.md
# ---------------------------------------------------------------------------------


def _f(v: float | None, fmt: str = ".3f") -> str:
    return "—" if v is None else format(v, fmt)


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return ""
    if not _ok(r):
        return f"{r['status']}"
    parts = [f"**{r['p50_ms']:.3f}**"]
    if r.get("vs_torch_compile") is not None:
        parts.append(f"{r['vs_torch_compile']:.2f}× c")
    if r.get("vs_torch_eager") is not None:
        parts.append(f"{r['vs_torch_eager']:.2f}× e")
    if r.get("floor_fraction") is not None:
        parts.append(f"{100 * r['floor_fraction']:.1f} % roof")
    if r.get("bound"):
        parts.append(BOUNDS.get(r["bound"], r["bound"]))
    return " · ".join(parts)


def _paths(rows: Sequence[dict[str, Any]]) -> list[str]:
    fewstep = [r["path"] for r in rows if r.get("family") == "fewstep"]
    other = [r["path"] for r in rows if r.get("family") != "fewstep"]
    return list(dict.fromkeys([*fewstep, *other]))


def render(run: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    cfg = run.get("config", {})
    sizes = sorted({r["size"] for r in rows} | set(cfg.get("sizes", [])))
    batches = sorted({r["batch"] for r in rows if r["batch"] is not None}
                     | set(cfg.get("batches", [])))
    steps = sorted({r["steps"] for r in rows if r["steps"] is not None})
    env = run.get("environment") or {}
    lines = [
        "# Latency against resolution",
        "",
        f"Run `{run.get('run_id', '?')}`: `{run.get('command', '')}`",
        "",
        f"Device: {gpu_line(env) if env else 'not recorded'}. Preset `{cfg.get('preset')}`, "
        f"{'guidance 2.0 in the graphs' if cfg.get('guidance') else 'no guidance'}, "
        f"weights: {run.get('weights', 'random init')}. Each size's bench folder "
        "(`pxNNN/`) has every row in full; ratios are within one process and one size.",
        "",
        "| size | parameters | FLOPs / step at batch 1 | kernels / step | attention at | "
        "export | status |",
        "| ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for info in run.get("sizes", []):
        s = info["size"]
        flops = next((r["flops_per_step"] for r in rows if r["size"] == s and r["batch"] == 1
                      and r.get("flops_per_step")), None)
        kernels = next((r["kernels_per_step"] for r in rows if r["size"] == s
                        and r.get("kernels_per_step")), None)
        attn = [a for a in info.get("attention_resolutions") or []
                if a in _levels(s, info.get("channel_mults") or [])]
        lines.append(
            f"| {s} px | {_f(info.get('parameters'), ',')} | "
            f"{'—' if flops is None else f'{flops / 1e9:.2f} G'} | {_f(kernels, 'd')} | "
            f"{', '.join(f'{a} px' for a in attn) or 'none'} | "
            f"{_f(info.get('export_s'), '.0f')} s | {info.get('error') or 'ok'} |")
    lines += [f"\nNote: {n}" for n in run.get("notes") or []]
    launch = run.get("launch", {})
    lines += ["", "Per-kernel time (`launch_us`): " + "; ".join(
        f"{d}: {_f(v.get('us'), '.2f')} µs ({v.get('method')})" for d, v in launch.items())
        if launch else "Per-kernel time: not measured."]
    lines += ["", "Cells: p50 ms (end to end) · × the fastest torch.compile (c) and eager (e) "
              "row of the same size and batch · roofline fraction · bound (launch = "
              "launch-bound, under-occupied, compute = compute-bound; rule in "
              "`benchmarks/resolution.py`)."]
    for st in steps:
        for path in _paths(rows):
            cells = {(r["size"], r["batch"]): r for r in rows
                     if r["path"] == path and r["steps"] == st}
            if not cells:
                continue
            lines += ["", f"## {path}, {clitools.plural(st, 'step')}", "",
                      "| size | " + " | ".join(f"batch {b}" for b in batches) + " |",
                      "| ---: |" + " --- |" * len(batches)]
            for s in sizes:
                lines.append(f"| {s} px | " + " | ".join(
                    _cell(cells.get((s, b))) for b in batches) + " |")
    lines += ["", "## Where fewstep wins and where it loses, and why", ""]
    lines += wins_and_losses(rows)
    missing = [r for r in rows if not _ok(r)]
    if missing:
        lines += ["", "## Not measured", ""]
        seen: set[tuple[Any, ...]] = set()
        for r in missing:
            key = (r["size"], r["path"], r["status"], r["reason"])
            if key in seen:
                continue
            seen.add(key)
            bs = sorted({m["batch"] for m in missing if (m["size"], m["path"], m["status"],
                                                          m["reason"]) == key})
            lines.append(f"- {r['size']} px, {r['path']}, batch {' '.join(map(str, bs))}: "
                         f"{r['status']}: {r['reason']}")
    return "\n".join(lines) + "\n"


def _levels(size: int, mults: Sequence[int]) -> list[int]:
    return [size // 2**i for i in range(len(mults))]


def best_fewstep(rows: Sequence[dict[str, Any]]) -> dict[tuple[int, int, int],
                                                         dict[str, Any]]:
    """Per (size, batch, steps): fewstep's fastest measured row."""
    best: dict[tuple[int, int, int], dict[str, Any]] = {}
    for r in rows:
        if r.get("family") == "fewstep" and _ok(r):
            key = (r["size"], r["batch"], r["steps"])
            if key not in best or r["p50_ms"] < best[key]["p50_ms"]:
                best[key] = r
    return best


def wins_and_losses(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Bullets generated from the rows: fewstep's fastest path against the fastest
    torch.compile and eager rows, per size and batch, with each side's bound."""
    best = best_fewstep(rows)
    if not best:
        return ["No fewstep row was measured: nothing to compare."]
    by_name = {(r["size"], r["batch"], r["steps"], r["path"]): r for r in rows}
    out: list[str] = []
    explained = False  # the why lines: against torch.compile, else against eager
    for kind, field in (("torch.compile", "vs_torch_compile"),
                        ("eager PyTorch", "vs_torch_eager")):
        ref_field = field.replace("vs_", "") + "_ref"
        wins: list[str] = []
        losses: list[str] = []
        bounds: list[tuple[dict[str, Any], dict[str, Any] | None, str]] = []
        for key in sorted(best):
            r = best[key]
            if r.get(field) is None:
                continue
            ref = by_name.get((*key, r[ref_field]))
            where = f"{key[0]} px batch {key[1]}" + (f" {key[2]} steps" if len(
                {k[2] for k in best}) > 1 else "")
            (wins if r[field] <= 1.0 else losses).append(f"{where} ({r[field]:.2f}×)")
            bounds.append((r, ref, where))
        if not wins and not losses:
            out.append(f"- Against {kind}: not measured in this run.")
            continue
        out.append(f"- Against {kind} (fewstep's fastest path over the fastest {kind} row; "
                   "below 1 fewstep is faster): fewstep **wins** at "
                   f"{', '.join(wins) or 'no size'}; it **loses** at "
                   f"{', '.join(losses) or 'no size'}.")
        if kind == "torch.compile" or not explained:
            out += [f"  - {why(r, ref, where, field)}" for r, ref, where in bounds]
            explained = True
    out += _by_bound(best)
    return out


def why(r: dict[str, Any], ref: dict[str, Any] | None, where: str, field: str) -> str:
    """One line: the two rows' bounds, roofline fractions and launch fractions."""
    verdict = "wins" if r[field] <= 1.0 else "loses"
    mine = (f"fewstep ({r['path']}, {r['p50_ms']:.3f} ms) is {r.get('bound') or 'of unknown bound'}"
            f"{_scaling(r)}, at {_pct(r.get('floor_fraction'))} of the roofline and "
            f"{_pct(r.get('launch_fraction'))} of its time in the launch floor "
            f"({_f(r.get('kernels_per_step'), 'd')} kernels × {_f(r.get('launch_us'), '.2f')} µs)")
    if ref is None:
        return f"{where}: {verdict}; {mine}."
    theirs = (f"{ref['path']} ({ref['p50_ms']:.3f} ms) is {ref.get('bound') or 'of unknown bound'}"
              f"{_scaling(ref)}, at {_pct(ref.get('floor_fraction'))} of the roofline")
    return f"{where}: {verdict}; {mine}; {theirs}."


def _scaling(r: dict[str, Any]) -> str:
    s = r.get("scaling")
    return "" if s is None else f" (time grows {100 * s:.0f} % as fast as the work)"


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f} %"


def _by_bound(best: dict[tuple[int, int, int], dict[str, Any]]) -> list[str]:
    """The ratio to torch.compile grouped by fewstep's bound."""
    out = []
    for bound in BOUNDS:
        got = [r for r in best.values() if r.get("bound") == bound
               and r.get("vs_torch_compile") is not None]
        if not got:
            continue
        ratios = sorted(r["vs_torch_compile"] for r in got)
        where = ", ".join(f"{r['size']} px b{r['batch']}" for r in
                          sorted(got, key=lambda r: (r["size"], r["batch"])))
        out.append(f"- Where fewstep is {bound} ({where}) it runs at {ratios[0]:.2f}–"
                   f"{ratios[-1]:.2f}× torch.compile's time.")
    return out


def _times100(v: float | None) -> float | None:
    return None if v is None else 100 * v


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """The short table printed last: fewstep's best against the baselines."""
    best = best_fewstep(rows)
    lines = [f"{'size':>5} {'batch':>5} {'steps':>5} {'fewstep ms':>11} {'x compile':>9} "
             f"{'x eager':>8} {'roof %':>7}  bound"]
    keys = sorted({(r["size"], r["batch"], r["steps"]) for r in rows
                   if r["batch"] is not None and r["steps"] is not None})
    for key in keys:
        r = best.get(key)
        if r is None:
            reasons = {x["reason"] for x in rows if (x["size"], x["batch"], x["steps"]) == key
                       and x.get("family") in ("fewstep", None)}
            lines.append(f"{key[0]:>5} {key[1]:>5} {key[2]:>5} {'—':>11}  "
                         f"{'; '.join(sorted(str(x) for x in reasons))[:80]}")
            continue
        lines.append(
            f"{key[0]:>5} {key[1]:>5} {key[2]:>5} {r['p50_ms']:>11.3f} "
            f"{_f(r.get('vs_torch_compile'), '.2f'):>9} {_f(r.get('vs_torch_eager'), '.2f'):>8} "
            f"{_f(_times100(r.get('floor_fraction')), '.1f'):>7}"
            f"  {r.get('bound') or '—'}")
    return "\n".join(lines)
