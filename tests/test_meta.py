"""runtime/meta.py: ModelMeta round trip and strict, one-error parsing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fewstep.runtime.errors import ArtifactError
from fewstep.runtime.meta import (
    SCHEMA_VERSION,
    CondSpec,
    GraphInfo,
    ModelMeta,
    Schedule,
)


def make(**kw: object) -> ModelMeta:
    fields: dict = dict(prediction_type="v_prediction", schedule=Schedule(), channels=3,
                        height=32, width=32, num_classes=6,
                        class_names=("a", "b", "c", "d", "e", "f"))
    fields.update(kw)
    return ModelMeta.build(**fields)


def test_round_trip_every_graph_kind() -> None:
    base = make(train_config={"lr": 3e-4, "nested": {"x": [1, 2]}}, source_hash="sha256:ab")
    for meta in (
        base,
        base.for_graph(guidance=True),
        base.for_graph(kind="step", precision="fp16"),
        base.for_graph(kind="sampler", steps=4, spacing="trailing", eta=0.0,
                       output_format="uint8", guidance=True),
        base.for_graph(kind="sampler", steps=8, spacing="leading", eta=1.0),
    ):
        again = ModelMeta.from_json(meta.to_json())
        assert again == meta
        assert again.to_json() == meta.to_json()


def test_graph_io_names_follow_the_graph() -> None:
    m = make()
    assert m.graph.inputs == ("x", "t", "label") and m.graph.outputs == ("v",)
    s = m.for_graph(kind="sampler", steps=4, spacing="trailing", eta=0.5, guidance=True,
                    output_format="uint8")
    assert s.graph.inputs == ("x", "label", "guidance", "noise")
    assert s.graph.outputs == ("image",)
    st = make(num_classes=0, class_names=(), prediction_type="epsilon").for_graph(kind="step")
    assert st.graph.inputs == ("x", "t", "a_t", "a_prev", "eta", "noise")
    assert st.graph.outputs == ("x_prev",)


def test_graph_io_shapes_and_dtypes_of_every_graph_kind() -> None:
    den = make(height=8, width=8, num_classes=4, class_names=()).for_graph(guidance=True)
    assert den.io.shapes(5) == {"x": (5, 3, 8, 8), "t": (5,), "label": (5,), "guidance": (5,)}
    assert den.io.inputs["label"].dtype is np.int64
    assert den.io.inputs["guidance"].dtype is np.float32
    assert (den.io.output.name, den.io.output.dims) == ("v", (3, 8, 8))
    step = make(height=8, width=8, num_classes=0, class_names=()).for_graph(kind="step")
    assert step.io.shapes(2) == {"x": (2, 3, 8, 8), "t": (2,), "a_t": (2,), "a_prev": (2,),
                                 "eta": (2,), "noise": (2, 3, 8, 8)}
    assert all(s.dtype is np.float32 for s in step.io.inputs.values())
    sampler = make(height=8, width=6, num_classes=4, class_names=()).for_graph(
        kind="sampler", steps=4, spacing="trailing", output_format="uint8")
    assert sampler.io.shapes(3) == {"x": (3, 3, 8, 6), "label": (3,)}
    assert sampler.io.output.dtype is np.uint8 and sampler.io.output.shape(3) == (3, 8, 6, 3)
    assert sampler.io.output.describe() == "uint8 (B, 8, 6, 3)"
    noisy = make(height=8, width=8, num_classes=0, class_names=()).for_graph(
        kind="sampler", steps=6, spacing="trailing", eta=1.0)
    assert noisy.io.shapes(2) == {"x": (2, 3, 8, 8), "noise": (2, 6, 3, 8, 8)}
    assert noisy.io.output.name == "x0" and noisy.io.output.dtype is np.float32
    for meta in (den, step, sampler, noisy):  # names recorded in the meta = the contract
        assert meta.graph.inputs == meta.io.input_names
        assert meta.graph.outputs == (meta.io.output.name,)
    with pytest.raises(ValueError, match="batch=0"):
        den.io.shapes(0)


def test_derived() -> None:
    m = make()
    assert m.conditional and m.null_label == 6 and m.image_shape == (3, 32, 32)
    ts, _, a_prev = m.schedule.step_alphas(4, "trailing")
    assert ts.tolist() == [999, 749, 499, 249] and a_prev[-1] == 1.0


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(schema_version=SCHEMA_VERSION + 1),
         "newer than this fewstep supports"),
        (lambda d: d.pop("prediction_type"), "field prediction_type: missing"),
        (lambda d: d.update(prediction_type="eps"), "'eps' is not one of epsilon"),
        (lambda d: d.update(sample_shape=["3", 32, 32]), "field sample_shape: ['3', 32, 32]"),
        (lambda d: d.update(sample_shape=[3, 0, 32]), "every dim must be a whole number"),
        (lambda d: d["schedule"].update(num_train_timesteps=True), "is not int"),
        (lambda d: d["schedule"].update(beta_schedule="cosine"), "'cosine' is not one of"),
        (lambda d: d.update(surprise=1), "unknown keys ['surprise']"),
        (lambda d: d["graph"].update(kind="loop"), "'loop' is not one of denoiser"),
        (lambda d: d["graph"].update(inputs=["x", "t"]), "does not match a denoiser graph"),
        (lambda d: d["graph"].update(steps=4), "steps/spacing/eta/output_format set on a"),
        (lambda d: d.update(class_names=["a"]), "1 names for 6 classes"),
        (lambda d: d.update(graph=[]), "field graph: [] is not dict"),
    ],
)
def test_bad_metadata_is_one_artifact_error(mutate: object, message: str) -> None:
    d = json.loads(make().to_json())
    mutate(d)  # type: ignore[operator]
    with pytest.raises(ArtifactError) as e:
        ModelMeta.from_json(json.dumps(d), source="model.onnx")
    assert message in str(e.value)
    assert str(e.value).startswith("model.onnx") or "newer" in str(e.value)


@pytest.mark.parametrize("text", ["", "{", "null", "[]", "42", '"x"', "{}", "NaN"])
def test_not_metadata_at_all(text: str) -> None:
    with pytest.raises(ArtifactError):
        ModelMeta.from_json(text)


def test_epsilon_with_zero_terminal_snr_is_refused() -> None:
    with pytest.raises(ArtifactError, match="cannot recover x0 at zero terminal SNR"):
        make(prediction_type="epsilon", schedule=Schedule(rescale_zero_terminal_snr=True))


def test_guidance_needs_classes() -> None:
    with pytest.raises(ArtifactError, match="guidance needs conditioning with a null value"):
        make(num_classes=0, class_names=(), graph=GraphInfo(guidance=True))
    with pytest.raises(ArtifactError, match="guidance needs conditioning with a null value"):
        make(null_label=None).for_graph(guidance=True)  # classes, but no "no class" label


def test_schedule_round_trip_with_trained_betas_and_spacing() -> None:
    betas = tuple(float(b) for b in (0.001 * (i + 1) for i in range(100)))
    schedule = Schedule(num_train_timesteps=100, trained_betas=betas,
                        timestep_spacing="leading", steps_offset=1, clip_sample_range=None,
                        set_alpha_to_one=False, beta_start=0.0, beta_end=0.0)
    meta = make(schedule=schedule)
    again = ModelMeta.from_json(meta.to_json())
    assert again == meta and again.schedule.trained_betas == betas
    assert json.loads(meta.to_json())["schema_version"] == SCHEMA_VERSION == 3
    # trained betas replace the named schedule (whose beta range is then not checked)
    assert again.schedule.alphas_cumprod()[-1] == pytest.approx(np.prod(1 - np.array(betas)))
    ts, _, a_prev = again.schedule.step_alphas(4)  # the schedule's own spacing: leading
    assert ts.tolist() == [76, 51, 26, 1]
    assert a_prev[-1] == again.schedule.alphas_cumprod()[0]  # set_alpha_to_one=False


def version_2_document() -> dict:
    """What fewstep wrote before samples of any shape and named conditioning."""
    d = json.loads(make().to_json())
    c, h, w = d.pop("sample_shape")
    del d["images"], d["null_label"], d["cond"], d["schedule"]["prev_rule"]
    d.update(channels=c, height=h, width=w, schema_version=2)
    return d


def version_1_document() -> dict:
    """What fewstep wrote before the schedule recorded trained betas and spacing."""
    d = version_2_document()
    del d["schedule"]["trained_betas"], d["schedule"]["timestep_spacing"]
    d["schema_version"] = 1
    return d


def test_version_2_metadata_reads_as_an_image_model_with_num_classes_as_null_label() -> None:
    meta = ModelMeta.from_json(json.dumps(version_2_document()))
    assert meta == make() and meta.images and meta.sample_shape == (3, 32, 32)
    assert meta.null_label == 6 and meta.cond == ()
    late = version_2_document()
    late["sample_shape"] = [3, 32, 32]
    with pytest.raises(ArtifactError, match=r"unknown keys \['sample_shape'\]"):
        ModelMeta.from_json(json.dumps(late))


def sequence_meta(**changes: object) -> ModelMeta:
    """A diffusion-policy-like model: (16, 2) action sequences, an observation vector."""
    fields: dict = dict(prediction_type="epsilon", schedule=Schedule(num_train_timesteps=100),
                        sample_shape=(16, 2), images=False,
                        cond=(CondSpec("global_cond", "float32", (36,), null=0.0),))
    fields.update(changes)
    return ModelMeta.build(**fields)


def test_any_sample_shape_and_named_conditioning_round_trip_and_shape_the_graphs() -> None:
    meta = sequence_meta()
    assert ModelMeta.from_json(meta.to_json()) == meta
    assert meta.graph.inputs == ("x", "t", "global_cond")
    io = meta.io
    assert io.inputs["x"].dims == (16, 2) and io.inputs["global_cond"].dims == (36,)
    assert io.inputs["global_cond"].dtype == np.float32 and io.output.dims == (16, 2)
    step = meta.for_graph(kind="step", guidance=True)
    assert step.graph.inputs == ("x", "t", "a_t", "a_prev", "eta", "noise", "global_cond",
                                 "guidance")
    sampler = meta.for_graph(kind="sampler", steps=8, spacing="leading", eta=0.5)
    assert sampler.graph.inputs == ("x", "global_cond", "noise")
    assert sampler.io.inputs["noise"].dims == (8, 16, 2)
    both = sequence_meta(num_classes=3, null_label=None,
                         cond=(CondSpec("obs", "float32", (4, 5)), CondSpec("k", "int64")))
    assert both.graph.inputs == ("x", "t", "label", "obs", "k")
    assert both.io.inputs["k"].dtype == np.int64 and both.io.inputs["k"].dims == ()
    assert not both.guidable
    with pytest.raises(ValueError, match="not images"):
        _ = meta.image_shape


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(sample_shape=()), "must have 1 to 6 dims"),
        (dict(sample_shape=(0, 2)), "every dim must be a whole number"),
        (dict(sample_shape=(1 << 14, 1 << 14)), "holds more than"),
        (dict(sample_shape=(16, 2), images=True), "is not an image shape"),
        (dict(cond=[("x",)]), "'x' is a name fewstep's graphs use"),
        (dict(cond=[("a b",)]), "must be a Python identifier"),
        (dict(cond=[("o",), ("o",)]), "are not unique"),
        (dict(cond=[("o", "float64")]), "'float64' is not one of"),
        (dict(cond=[("o", "int64", (), 0.5)]), "is not a whole number"),
        (dict(num_classes=3, null_label=7), "not in 0..num_classes=3"),
    ],
)
def test_bad_sample_shapes_and_conditioning_are_one_artifact_error(changes: dict,
                                                                  message: str) -> None:
    with pytest.raises(ArtifactError, match=message):
        if "cond" in changes:  # built inside: a bad CondSpec fails on construction
            changes = {**changes, "cond": tuple(CondSpec(*c) for c in changes["cond"])}
        sequence_meta(**changes)


def test_uint8_output_needs_an_image_model() -> None:
    with pytest.raises(ArtifactError, match="uint8 images from a model whose samples are not"):
        sequence_meta().for_graph(kind="sampler", steps=4, spacing="trailing",
                                  output_format="uint8")


def test_version_1_metadata_reads_as_trailing_spacing_without_trained_betas() -> None:
    meta = ModelMeta.from_json(json.dumps(version_1_document()))
    assert meta == make()  # read as its current equivalent
    assert meta.schema_version == SCHEMA_VERSION
    assert meta.schedule.timestep_spacing == "trailing" and meta.schedule.trained_betas == ()
    late = version_1_document()
    late["schedule"]["timestep_spacing"] = "leading"
    with pytest.raises(ArtifactError, match=r"schedule: unknown keys \['timestep_spacing'\]"):
        ModelMeta.from_json(json.dumps(late))


def test_version_1_models_load_unchanged() -> None:
    # The metadata of the three graphs of the default model shipped until 2026-11-30,
    # written with schema version 1, exactly as they were in the ONNX files.
    from fewstep.runtime import sampling

    data = Path(__file__).parent / "data" / "meta-v1-landscapes.json"
    texts = json.loads(data.read_text(encoding="utf-8"))
    assert len(texts) == 3
    for name, text in texts.items():
        raw = json.loads(text)
        assert raw["schema_version"] == 1 and "timestep_spacing" not in raw["schedule"]
        meta = ModelMeta.from_json(text, source=name)
        assert meta.schedule == Schedule(**raw["schedule"])  # every recorded field as written
        assert meta.schedule.timestep_spacing == "trailing"
        plan = sampling.SamplingPlan.create(meta, 4)
        assert plan.timesteps == (999, 749, 499, 249)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"timestep_spacing": "middle"}, "schedule.timestep_spacing: 'middle' is not one of"),
        ({"timestep_spacing": 3}, "schedule.timestep_spacing: 3 is not str"),
        ({"trained_betas": [0.1] * 7}, "trained_betas has 7 values for num_train_timesteps=1000"),
        ({"trained_betas": ["0.1"]}, "schedule.trained_betas: must be a list of numbers"),
        ({"trained_betas": [True]}, "schedule.trained_betas: must be a list of numbers"),
        ({"trained_betas": 0.1}, "schedule.trained_betas: 0.1 is not list"),
        ({"num_train_timesteps": 2, "trained_betas": [0.1, 1.5]},
         "trained_betas[1]=1.5 is not in (0, 1)"),
        ({"num_train_timesteps": 1, "trained_betas": [10**400]}, "fewstep metadata is malformed"),
        ({"beta_start": 0.0}, "schedule.beta_start/beta_end: 0.0/0.02 must satisfy"),
    ],
)
def test_bad_schedules_are_one_artifact_error(changes: dict, message: str) -> None:
    d = json.loads(make().to_json())
    d["schedule"].update(changes)
    with pytest.raises(ArtifactError) as e:
        ModelMeta.from_json(json.dumps(d), source="model.onnx")
    assert str(e.value).startswith("model.onnx: ") and message in str(e.value), str(e.value)
