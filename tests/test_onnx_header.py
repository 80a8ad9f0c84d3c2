"""runtime/onnx_header.py: the header reader agrees with onnx's own reading of a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import external_data_helper

from fewstep.runtime import onnx_header
from fewstep.runtime.errors import ArtifactError

MODELS = sorted((Path(__file__).resolve().parents[1] / "runtime" / "models").glob("*.onnx"))


def _onnx_locations(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    tensors = [*g.initializer, *(a.t for n in g.node for a in n.attribute if a.HasField("t"))]
    return {external_data_helper.ExternalDataInfo(t).location for t in tensors
            if external_data_helper.uses_external_data(t)}


@pytest.mark.parametrize("path", MODELS, ids=[p.name for p in MODELS])
def test_shipped_graphs_read_as_onnx_reads_them(path: Path) -> None:
    model = onnx.load(str(path), load_external_data=False)
    header = onnx_header.read(path)
    assert header.ir_version == model.ir_version
    assert header.producer == model.producer_name
    assert header.metadata == {p.key: p.value for p in model.metadata_props}
    assert set(header.external_data) == _onnx_locations(model)
    assert header.external_data  # the shipped graphs keep their weights outside


def test_location_in_a_node_without_tensors_is_not_a_location(tmp_path: Path) -> None:
    """Only a tensor's external-data entry is a location: the word in a node's name or
    a string attribute is not one, and neither is an inline tensor."""
    const = onnx.numpy_helper.from_array(np.ones(3, np.float32), "k")
    node = onnx.helper.make_node("Constant", [], ["k"], name="location", value=const)
    graph = onnx.helper.make_graph([node], "g", [], [
        onnx.helper.make_tensor_value_info("k", onnx.TensorProto.FLOAT, [3])])
    path = tmp_path / "m.onnx"
    onnx.save_model(onnx.helper.make_model(graph), str(path))
    assert onnx_header.read(path).external_data == ()


def test_truncated_graph_is_one_artifact_error(tmp_path: Path) -> None:
    data = MODELS[0].read_bytes()
    path = tmp_path / "m.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="is not an ONNX model") as e:
        onnx_header.read(path)
    assert "\n" not in str(e.value)
