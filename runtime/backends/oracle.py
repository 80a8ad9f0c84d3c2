"""The ``oracle`` backend: graphs that return the exact model output for a known x0.

An oracle "network" knows the clean sample x0 (one per class, or one for an
unconditional model; an image or a sample of any shape) and answers what a perfect
denoiser would, whatever its named conditioning: from x_t and the timestep t it
recovers ε = (x_t - √α_t x0) / √(1-α_t) and returns the target of the model's
prediction type (``ddim.target_for``). With it DDIM returns x0 at any step
count and any η, so tests check the whole sampling machinery without a trained
model, and benchmarks measure pure pipeline overhead.

All three graph kinds are provided, with the same inputs and outputs as exported
ONNX graphs (``meta.graph.inputs`` → ``meta.graph.outputs``):

* ``denoiser``: the oracle network; with ``meta.graph.guidance`` it does
  classifier-free guidance itself (cond = x0[label], uncond = x0[null label]).
* ``step``: the network, then one ``ddim.step`` with the given coefficients.
* ``sampler``: ``sampling.run_loop`` over the baked steps/spacing/eta, then
  ``images.to_uint8_nhwc_marked`` when the output format is uint8 (an image with
  NaN/Inf becomes ``images.nonfinite_marker``, as in an exported graph).

``make_oracle(meta, x0)`` builds one in memory. ``open_graph(path, "oracle")`` reads
a small ``.oracle.json`` file: ``{"meta": <ModelMeta JSON object>, "x0_seed": int}``
(x0 = uniform(-1, 1) from ``numpy.random.default_rng(x0_seed)``, one row per class,
or one row for an unconditional model).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from .. import ddim, sampling
from ..checks import whole_number
from ..errors import ArtifactError
from ..images import to_uint8_nhwc_marked
from ..meta import ModelMeta
from . import Array, Feeds, NetworkRun, as_float32, check_launches, host_loop

ORACLE_SUFFIX: Final = ".oracle.json"
F32 = NDArray[np.float32]
F64 = NDArray[np.float64]


def unavailable_reason(name: str) -> str | None:
    """The oracle needs nothing but numpy: always usable."""
    return None


class OracleGraph:
    """One graph of any kind whose network is the exact oracle for ``x0``."""

    def __init__(self, meta: ModelMeta, x0: Any, path: str = "<oracle>") -> None:
        table = np.asarray(x0, dtype=np.float64)
        rows = 1 if not meta.conditional else meta.num_classes
        shape = tuple(meta.sample_shape)
        if table.ndim == len(shape):
            table = table[None]
        if table.ndim != len(shape) + 1 or table.shape[1:] != shape:
            raise ValueError(
                f"x0 of shape {table.shape} does not fit samples of shape {shape}; "
                f"pass x0 of shape (K, {', '.join(map(str, shape))})"
            )
        allowed = {1, rows, rows + 1} if meta.conditional else {1}
        if table.shape[0] not in allowed:
            raise ValueError(
                f"x0 has {table.shape[0]} rows; pass 1 row, one per class ({rows})"
                + (f" or {rows + 1} (the last one for the null label)" if meta.conditional else "")
            )
        if meta.conditional and table.shape[0] == rows and rows > 1:
            # No explicit x0 for the null label: the mean image, what an
            # unconditional model would aim for.
            table = np.concatenate([table, table.mean(axis=0, keepdims=True)])
        self.meta = meta
        self.path = path
        self.backend = "oracle"
        self.max_batch: int | None = None
        self.x0: F64 = np.ascontiguousarray(table)
        self._ones = (1,) * len(shape)  # a per-sample value against (B, *sample_shape)
        self._alphas_cumprod: F64 = meta.schedule.alphas_cumprod()

    def __repr__(self) -> str:
        return f"OracleGraph({self.meta.graph.kind}, {self.path!r})"

    # -- the oracle network --------------------------------------------------------

    def _rows(self, labels: NDArray[np.int64] | None, n: int) -> F64:
        if labels is None or self.x0.shape[0] == 1:
            return np.broadcast_to(self.x0[:1], (n, *self.x0.shape[1:]))
        return self.x0[labels]

    def network(
        self,
        x: Array,  # (B, *sample_shape)
        t: Array,  # (B,)
        labels: Array | None = None,
        guidance: Array | None = None,
    ) -> F32:
        """The exact output of a perfect network of this model's prediction type."""
        x64 = np.asarray(x, dtype=np.float64)
        n = x64.shape[0]
        steps = np.rint(np.asarray(t, dtype=np.float64)).astype(np.int64).reshape(n)
        T = len(self._alphas_cumprod)
        if np.any((steps < 0) | (steps >= T)):
            raise ValueError(f"timesteps {steps.tolist()} outside 0..{T - 1}")
        a_t = self._alphas_cumprod[steps].reshape(n, *self._ones)
        lab = None if labels is None else np.asarray(labels, dtype=np.int64).reshape(n)
        if lab is not None and np.any((lab < 0) | (lab > self.meta.num_classes)):
            raise ValueError(f"labels {lab.tolist()} outside 0..{self.meta.num_classes}")

        def target(x0: F64) -> F64:
            eps = ddim.eps_from_x0(x64, x0, a_t)
            out: F64 = ddim.target_for(self.meta.prediction_type, x0, eps, a_t)
            return out

        cond = target(self._rows(lab, n))
        if guidance is None or not self.meta.graph.guidance:
            return cond.astype(np.float32)
        null = np.full(n, self.meta.null_label, dtype=np.int64)
        uncond = target(self._rows(null, n))
        g = np.asarray(guidance, dtype=np.float64).reshape(n, *self._ones)
        guided: F64 = sampling.guided(cond, uncond, g)
        return guided.astype(np.float32)

    # -- the Graph protocol ----------------------------------------------------------

    def _check(self, feeds: Feeds) -> None:
        expected = set(self.meta.graph.inputs)
        if set(feeds) != expected:
            raise ValueError(
                f"feeds {sorted(feeds)} do not match the inputs of {self.path}; "
                f"pass exactly {list(self.meta.graph.inputs)}"
            )

    def run(self, feeds: Feeds) -> Array:
        self._check(feeds)
        kind = self.meta.graph.kind
        x = as_float32(feeds["x"])
        labels = feeds.get("label")
        guidance = feeds.get("guidance")
        if kind == "denoiser":
            return self.network(x, feeds["t"], labels, guidance)
        if kind == "step":
            return self._step(x, feeds, labels, guidance)
        return self._sampler(x, feeds, labels, guidance)

    def network_run(self, feeds: Feeds, launches: int = 1) -> NetworkRun:
        """The oracle has no network: ``call()`` is ``run(feeds)`` ``launches`` times."""
        check_launches(launches)
        self._check(feeds)
        prepared = dict(feeds)

        def call() -> None:
            for _ in range(launches):
                self.run(prepared)

        return NetworkRun(call, f"{launches} × the oracle's host computation (no network)")

    def run_loop(self, x: Array, fixed: Feeds, per_step: Sequence[Feeds]) -> Array:
        if self.meta.graph.kind != "step":
            raise ValueError(
                f"run_loop needs a step graph; {self.path} is a {self.meta.graph.kind} graph"
            )
        return host_loop(self, x, fixed, per_step)

    def _step(self, x: F32, feeds: Feeds, labels: Array | None, guidance: Array | None) -> F32:
        n = x.shape[0]

        def col(name: str) -> F32:
            return as_float32(feeds[name]).reshape(n, *self._ones)

        out = self.network(x, feeds["t"], labels, guidance)
        x_prev: F32 = ddim.step(
            out, x, col("a_t"), col("a_prev"),
            prediction_type=self.meta.prediction_type,
            eta=col("eta"),
            noise=as_float32(feeds["noise"]),
            clip_sample_range=self.meta.schedule.clip_sample_range,
        )
        return x_prev.astype(np.float32)

    def _sampler(self, x: F32, feeds: Feeds, labels: Array | None,
                 guidance: Array | None) -> Array:
        g = self.meta.graph
        plan = sampling.SamplingPlan.create(self.meta, g.steps, g.spacing, g.eta)
        n = x.shape[0]

        def denoise(x_t: F32, i: int) -> F32:
            t = np.full(n, float(plan.timesteps[i]), dtype=np.float32)
            return self.network(x_t, t, labels, guidance)

        noise = as_float32(feeds["noise"]) if plan.stochastic else None
        x0: F32 = sampling.run_loop(plan, denoise, x, noise)
        if g.output_format == "uint8":
            return to_uint8_nhwc_marked(x0)
        return x0.astype(np.float32)


def make_oracle(meta: ModelMeta, x0: Any, path: str = "<oracle>") -> OracleGraph:
    """An oracle graph of ``meta.graph.kind`` for the clean samples ``x0`` (K or 1,
    *sample_shape).

    For a class-conditional model pass one row per class (row k is class k's image),
    optionally one more row for the null label (else the mean of the classes), or a
    single row shared by all.
    """
    return OracleGraph(meta, x0, path)


def oracle_x0(meta: ModelMeta, seed: int) -> F64:
    """The x0 table of an ``.oracle.json`` file: uniform(-1, 1), one row per class."""
    rows = meta.num_classes if meta.conditional else 1
    return np.random.default_rng(seed).uniform(-1.0, 1.0, (rows, *meta.sample_shape))


MAX_ORACLE_BYTES = 16 * 1024**2  # a ModelMeta (at most 8 MiB in an ONNX file) and a seed


def read_oracle_file(path: str | Path) -> tuple[ModelMeta, int]:
    """(meta, x0_seed) of an ``.oracle.json`` file, or an ArtifactError saying why not."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"oracle file {str(p)!r} does not exist")
    if p.stat().st_size > MAX_ORACLE_BYTES:
        raise ArtifactError(f"{str(p)!r} is larger than an oracle file can be "
                            f"({MAX_ORACLE_BYTES} bytes); pass an .oracle.json made by fewstep")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{str(p)!r} is not a readable oracle JSON file ({e})") from None
    if not isinstance(data, dict) or set(data) != {"meta", "x0_seed"}:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ArtifactError(
            f"{str(p)!r} has {keys}; an oracle file is a JSON object with exactly the keys "
            "'meta' (a ModelMeta object) and 'x0_seed' (an int)"
        )
    try:
        seed = whole_number("x0_seed", data["x0_seed"], 0)
    except ValueError as e:
        raise ArtifactError(f"{str(p)!r}: {e}") from None
    return ModelMeta.from_dict(data["meta"], source=str(p)), seed


def write_oracle_file(path: str | Path, meta: ModelMeta, x0_seed: int = 0) -> Path:
    """Write an ``.oracle.json`` file (atomically) for benchmarks and tests."""
    from ..fileio import write_text

    text = json.dumps({"meta": meta.to_dict(), "x0_seed": int(x0_seed)}, sort_keys=True)
    return write_text(path, text + "\n")


def open_graph(path: str, name: str = "oracle", **options: Any) -> OracleGraph:
    """Open an ``.oracle.json`` file."""
    if options:
        raise ValueError(
            f"backend 'oracle' takes no options; drop {', '.join(sorted(options))}"
        )
    meta, seed = read_oracle_file(path)
    return OracleGraph(meta, oracle_x0(meta, seed), str(path))
