"""Creating an ONNX Runtime session for one graph, and checking it against the graph
I/O contract (``ModelMeta.io``).

``create_session`` builds the ``SessionOptions`` from an ``OrtConfig``
(``graph_optimization_level``, ``execution_mode``, threads, quiet logging) and, when
``optimized_cache`` names a folder, goes through ``ort_cache.open_session``: the graph as
ONNX Runtime optimised it is saved once and loaded from there, with optimisations off,
afterwards. ``verify_session`` then compares the session's inputs and output with the
metadata: a disagreement is an ``ArtifactError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from ..errors import ArtifactError
from ..meta import ModelMeta
from . import ort_cache
from .ort_options import OrtConfig, providers_for

ORT_TYPES: Final = {"tensor(float)": np.float32, "tensor(int64)": np.int64,
                    "tensor(uint8)": np.uint8}
LEVELS: Final = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                 "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
MODES: Final = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}


def session_options(ort: Any, config: OrtConfig, level: str | None = None,
                    save_to: str | None = None) -> Any:
    """``SessionOptions`` of ``config`` (``level`` overrides its optimisation level);
    ``save_to``: write the optimised graph there, initialisers in a weights file beside."""
    so = ort.SessionOptions()
    level = level or config.graph_optimization_level
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    so.execution_mode = getattr(ort.ExecutionMode, MODES[config.execution_mode])
    so.log_severity_level = 4  # fatal only: fewstep reports errors itself, in one line
    if config.threads is not None:
        so.intra_op_num_threads = config.threads
    if save_to is not None:
        so.optimized_model_filepath = save_to
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    ort_cache.WEIGHTS)
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes",
            str(ort_cache.MIN_EXTERNAL_BYTES))
    return so


def create_session(ort: Any, path: str, meta: ModelMeta, config: OrtConfig,
                   cuda_graph: bool, fuse_conv_bias: bool = False) -> tuple[Any, str]:
    """(InferenceSession, what the optimised-graph cache did: ``ort_cache.open_session``;
    ``off`` without a cache folder)."""
    providers = providers_for(meta, config, cuda_graph, fuse_conv_bias)

    def make(graph: str | None, save_to: str | None) -> Any:
        if graph is not None:  # a cached graph: already optimised
            return ort.InferenceSession(graph, sess_options=session_options(ort, config,
                                        "disable"), providers=providers)
        return ort.InferenceSession(path, sess_options=session_options(ort, config,
                                    save_to=save_to), providers=providers)

    if not config.optimized_cache or config.backend == "ort-tensorrt":
        return make(None, None), "off"
    return ort_cache.open_session(path, config, providers, ort.__version__, make)




def _ort_shape(shape: Sequence[Any]) -> str:
    return "(" + ", ".join("?" if not isinstance(d, int) else str(d) for d in shape) + ")"


def verify_session(session: Any, meta: ModelMeta, path: str) -> None:
    """ArtifactError unless the session's inputs/outputs are what the metadata says."""
    ins, out = meta.io.inputs, meta.io.output
    fix = "re-export it with `fewstep export` (the file was edited or made by another tool)"
    got_in = [i.name for i in session.get_inputs()]
    got_out = [o.name for o in session.get_outputs()]
    if sorted(got_in) != sorted(ins):
        raise ArtifactError(
            f"{path}: metadata says inputs {list(meta.graph.inputs)} but the graph has "
            f"{got_in}; {fix}"
        )
    if got_out != [out.name]:
        raise ArtifactError(
            f"{path}: metadata says outputs {list(meta.graph.outputs)} but the graph has "
            f"{got_out}; {fix}"
        )
    for arg in [*session.get_inputs(), *session.get_outputs()]:
        spec = ins.get(arg.name, out)
        dtype = ORT_TYPES.get(arg.type)
        shape = list(arg.shape)
        bad = (
            dtype is not spec.dtype
            or len(shape) != 1 + len(spec.dims)
            or isinstance(shape[0], int)
            or any(isinstance(d, int) and d != e
                   for d, e in zip(shape[1:], spec.dims, strict=False))
        )
        if bad:
            raise ArtifactError(
                f"{path}: metadata says {arg.name!r} is {spec.describe()} (batch dynamic) but "
                f"the graph has {arg.type} {_ort_shape(shape)}; {fix}"
            )


