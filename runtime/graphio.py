"""The graph input/output contract: names, dtypes and shapes of every input and the
output of each graph kind, derived from a model's metadata (``ModelMeta.io``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

if TYPE_CHECKING:
    from .meta import CondSpec, GraphInfo

OUTPUT_NAME: Final = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a graph: name, dtype and the dims after the batch axis."""

    name: str
    dtype: type[np.generic]
    dims: tuple[int, ...]  # without the batch axis: () for a (B,) input

    def shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.dims)

    def describe(self) -> str:
        dims = ", ".join(["B", *map(str, self.dims)])
        return f"{np.dtype(self.dtype).name} ({dims})"


@dataclass(frozen=True)
class GraphIO:
    """The inputs (in graph order) and the single output of one graph."""

    inputs: Mapping[str, TensorSpec]
    output: TensorSpec

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.inputs)

    def shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """The shape of every input at batch size ``batch``."""
        if batch < 1:
            raise ValueError(f"batch={batch} must be at least 1")
        return {name: spec.shape(batch) for name, spec in self.inputs.items()}


def graph_io(prediction_type: str, sample_shape: tuple[int, ...], conditional: bool,
             cond: tuple[CondSpec, ...], g: GraphInfo) -> GraphIO:
    """The inputs and output a graph of kind ``g.kind`` must have (``g``'s own names are
    ignored): the one definition of names, dtypes and shapes that the backends, the
    TensorRT build, the Triton configs and the benchmarks read.

    x, out and a step graph's noise are (B, *sample_shape); t, a_t, a_prev, eta, guidance
    are (B,) float32, label (B,) int64, each conditioning input (B, *its shape) of its
    dtype; a stochastic sampler's noise is (B, S, *sample_shape); a uint8 sampler's image
    is (B, H, W, C).
    """
    shape = tuple(sample_shape)
    dims: dict[str, tuple[int, ...]] = {"x": shape}
    types: dict[str, type[np.generic]] = {"label": np.int64}
    for c in cond:
        dims[c.name], types[c.name] = tuple(c.shape), c.np_dtype
    conds = (*(("label",) if conditional else ()), *(c.name for c in cond))
    guid = ("guidance",) if g.guidance else ()
    if g.kind == "denoiser":
        names: tuple[str, ...] = ("x", "t", *conds, *guid)
        out = TensorSpec(OUTPUT_NAME[prediction_type], np.float32, shape)
    elif g.kind == "step":
        names = ("x", "t", "a_t", "a_prev", "eta", "noise", *conds, *guid)
        dims["noise"] = shape
        out = TensorSpec("x_prev", np.float32, shape)
    else:
        names = ("x", *conds, *guid, *(("noise",) if g.eta > 0 else ()))
        dims["noise"] = (g.steps, *shape)
        if g.output_format == "uint8":
            c_, h, w = shape if len(shape) == 3 else (0, 0, 0)
            out = TensorSpec("image", np.uint8, (h, w, c_))
        else:
            out = TensorSpec("x0", np.float32, shape)
    inputs = {n: TensorSpec(n, types.get(n, np.float32), dims.get(n, ())) for n in names}
    return GraphIO(inputs, out)
