"""Property tests (Hypothesis): metadata parsing, the DDIM core, image-folder loading."""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fewstep.runtime import ddim
from fewstep.runtime.errors import ArtifactError
from fewstep.runtime.meta import GraphInfo, ModelMeta, Schedule

# ---------------------------------------------------------------------------------
# ModelMeta
# ---------------------------------------------------------------------------------

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
# What metadata may hold where it is shown on terminals: printable (no control, format,
# private-use, unassigned or separator characters but the space); class names not blank.
_UNPRINTABLE = ("Cs", "Cc", "Cf", "Co", "Cn", "Zl", "Zp", "Zs")
printable_names = st.text(st.characters(codec="utf-8", exclude_categories=_UNPRINTABLE,
                                        include_characters=" "), max_size=12)
class_names = st.text(st.characters(codec="utf-8", exclude_categories=_UNPRINTABLE),
                      min_size=1, max_size=12)
# Any whole number JSON can carry: unbounded, plus the edges of int64 and of float64 (a
# number beyond ~1.8e308 cannot become a float: it must be an ArtifactError, not an
# OverflowError).
whole_numbers = st.integers() | st.sampled_from(
    [2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**308, 10**309, 10**400, -(10**400)])
json_values = st.recursive(
    st.none() | st.booleans() | whole_numbers
    | st.floats(allow_nan=False, allow_infinity=False) | names,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=4),
    max_leaves=20,
)
# What json.dumps also writes: NaN and Infinity (json.loads reads them back).
wild_json_values = st.recursive(
    st.none() | st.booleans() | whole_numbers | st.floats() | names,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=4),
    max_leaves=20,
)


@st.composite
def metas(draw: st.DrawFn) -> ModelMeta:
    prediction = draw(st.sampled_from(ddim.PREDICTION_TYPES))
    t_max = draw(st.integers(1, 4000))
    start = draw(st.floats(1e-6, 0.05))
    schedule = Schedule(
        beta_schedule=draw(st.sampled_from(ddim.BETA_SCHEDULES)),
        num_train_timesteps=t_max,
        beta_start=start,
        beta_end=draw(st.floats(start, 0.5)),
        rescale_zero_terminal_snr=(prediction != "epsilon") and draw(st.booleans()),
        set_alpha_to_one=draw(st.booleans()),
        clip_sample_range=draw(st.none() | st.floats(0.1, 10)),
        steps_offset=draw(st.integers(0, t_max - 1)),
    )
    k = draw(st.integers(0, 20))
    kind = draw(st.sampled_from(("denoiser", "step", "sampler")))
    common: dict[str, Any] = dict(kind=kind, precision=draw(st.sampled_from(("fp32", "fp16"))),
                                  guidance=bool(k) and draw(st.booleans()))
    if kind == "sampler":
        common.update(steps=draw(st.integers(1, t_max)),
                      spacing=draw(st.sampled_from(ddim.SPACINGS)), eta=draw(st.floats(0, 1)),
                      output_format=draw(st.sampled_from(("float", "uint8"))))
    graph = GraphInfo(**common)
    distilled = tuple(draw(st.lists(st.integers(1, t_max), max_size=3)))
    return ModelMeta.build(
        graph=graph, prediction_type=prediction, schedule=schedule,
        channels=draw(st.integers(1, 4)), height=draw(st.integers(1, 512)),
        width=draw(st.integers(1, 512)), num_classes=k,
        class_names=tuple(draw(st.lists(class_names, min_size=k, max_size=k))) if draw(
            st.booleans()) else (),
        distilled_steps=distilled,
        distilled_spacing=draw(st.sampled_from(ddim.SPACINGS)) if distilled else "",
        train_config=draw(st.dictionaries(names, json_values, max_size=4)),
        source_hash=draw(printable_names),
    )


@given(metas())
def test_meta_round_trip(meta: ModelMeta) -> None:
    again = ModelMeta.from_json(meta.to_json())
    assert again == meta
    assert again.to_json() == meta.to_json()


@given(st.lists(names, min_size=2, max_size=2), names)
def test_metadata_strings_are_printable_or_refused(labels: list[str], version: str) -> None:
    """Class names and free text in metadata: either printable (and class names not
    blank), or one ArtifactError naming the field; nothing unprintable gets through."""
    try:
        meta = ModelMeta.build(prediction_type="epsilon", schedule=Schedule(), channels=3,
                               height=8, width=8, num_classes=2, class_names=tuple(labels),
                               fewstep_version=version)
    except ArtifactError as e:
        assert "class_names[" in str(e) or "fewstep_version" in str(e)
        assert any(not s.isprintable() or not s.strip() for s in labels) or (
            not version.isprintable())
        return
    assert all(s.isprintable() and s.strip() for s in meta.class_names)
    assert meta.fewstep_version.isprintable()


@given(wild_json_values)
def test_arbitrary_json_is_artifact_error_or_valid(value: Any) -> None:
    with contextlib.suppress(ArtifactError):  # anything else escapes and fails the test
        ModelMeta.from_json(json.dumps(value))


@given(st.binary(max_size=200) | names)
def test_arbitrary_bytes_are_artifact_error(raw: bytes | str) -> None:
    with contextlib.suppress(ArtifactError):
        ModelMeta.from_json(raw)


@given(metas(), st.data())
def test_mutated_metadata_is_artifact_error_or_valid(meta: ModelMeta, data: st.DataObject
                                                     ) -> None:
    d = json.loads(meta.to_json())
    # Replace, delete or add one key somewhere in the object tree.
    target = d
    path = data.draw(st.lists(st.sampled_from(["schedule", "graph"]), max_size=1))
    for key in path:
        target = target[key]
    key = data.draw(st.sampled_from(sorted(target)) | names)
    action = data.draw(st.sampled_from(["replace", "delete"]))
    if action == "delete":
        target.pop(key, None)
    else:
        target[key] = data.draw(wild_json_values)
    with contextlib.suppress(ArtifactError):
        ModelMeta.from_json(json.dumps(d))


json_numbers = whole_numbers | st.floats()


@given(metas(), st.data())
def test_any_number_in_a_number_field_is_artifact_error_or_valid(meta: ModelMeta,
                                                                 data: st.DataObject) -> None:
    """Every number-valued field, given any number JSON can carry (huge, negative, NaN)."""
    d = json.loads(meta.to_json())
    slots = [(section, key) for section, obj in (("", d), ("schedule", d["schedule"]),
                                                 ("graph", d["graph"]))
             for key, v in obj.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    section, key = data.draw(st.sampled_from(slots))
    (d[section] if section else d)[key] = data.draw(json_numbers)
    with contextlib.suppress(ArtifactError):
        ModelMeta.from_json(json.dumps(d))


def _meta_dict() -> dict[str, Any]:
    meta = ModelMeta.build(prediction_type="epsilon", schedule=Schedule(), channels=3,
                           height=8, width=8, num_classes=2,
                           graph=GraphInfo(kind="sampler", steps=4, spacing="trailing"))
    d: dict[str, Any] = json.loads(meta.to_json())
    return d


FIELD_PATHS = [("schedule", "beta_start"), ("schedule", "beta_end"),
               ("schedule", "clip_sample_range"), ("graph", "eta"),
               ("schedule", "num_train_timesteps"), ("schedule", "steps_offset"),
               ("graph", "steps"), ("", "channels"), ("", "height"), ("", "num_classes"),
               ("", "schema_version")]


@pytest.mark.parametrize("value", [10**400, -(10**400), 10**309], ids=["1e400", "-1e400", "1e309"])
@pytest.mark.parametrize(("section", "key"), FIELD_PATHS)
def test_huge_whole_number_in_any_number_field_is_artifact_error(section: str, key: str,
                                                                 value: int) -> None:
    """Regression: 10**400 in a float field raised OverflowError (a traceback in the CLI)."""
    d = _meta_dict()
    (d[section] if section else d)[key] = value
    with pytest.raises(ArtifactError) as e:
        ModelMeta.from_json(json.dumps(d), source="model.onnx")
    message = str(e.value)
    assert message.startswith("model.onnx: ") and "\n" not in message
    assert len(message) < 300  # the number is elided, not printed in full


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_json_constants_are_artifact_error(constant: str) -> None:
    text = json.dumps(_meta_dict()).replace('"train_config": {}',
                                            f'"train_config": {{"lr": {constant}}}')
    assert constant in text
    with pytest.raises(ArtifactError, match="not valid JSON"):
        ModelMeta.from_json(text)


# ---------------------------------------------------------------------------------
# ddim
# ---------------------------------------------------------------------------------


@given(st.integers(1, 3000), st.data())
def test_timesteps_properties(t_max: int, data: st.DataObject) -> None:
    steps = data.draw(st.integers(1, t_max))
    spacing = data.draw(st.sampled_from(ddim.SPACINGS))
    offset = data.draw(st.integers(0, t_max - 1)) if spacing == "leading" else 0
    try:
        ts = ddim.timesteps(t_max, steps, spacing, offset)
    except ValueError as e:
        # Only an offset that pushes the leading grid past T-1 may be refused.
        assert spacing == "leading" and "steps_offset" in str(e)
        assert (steps - 1) * (t_max // steps) + offset > t_max - 1
        return
    assert len(ts) == steps and ts.dtype == np.int64
    assert np.all(np.diff(ts) < 0)
    assert ts[-1] >= 0 and ts[0] <= t_max - 1
    if spacing == "trailing":
        assert ts[0] == t_max - 1


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    schedule=st.sampled_from(ddim.BETA_SCHEDULES),
    t_max=st.integers(2, 2000),
    prediction=st.sampled_from(ddim.PREDICTION_TYPES),
    eta=st.floats(0, 1),
    alpha_one=st.booleans(),
    data=st.data(),
)
def test_step_is_oracle_exact_and_finite(schedule: str, t_max: int, prediction: str,
                                         eta: float, alpha_one: bool, data: st.DataObject
                                         ) -> None:
    steps = data.draw(st.integers(1, min(t_max, 60)))
    spacing = data.draw(st.sampled_from(ddim.SPACINGS))
    ac = ddim.alphas_cumprod(schedule, t_max)
    ts = ddim.timesteps(t_max, steps, spacing)
    a_t, a_prev = ddim.step_alphas(ac, ts, alpha_one)
    # Epsilon prediction divides by sqrt(a_t): skip near-zero-SNR starts (ill-posed).
    assume(prediction != "epsilon" or a_t[0] > 1e-6)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x0 = rng.uniform(-1, 1, (2, 3, 4, 4))
    x = rng.standard_normal(x0.shape)
    for i in range(steps):
        eps = ddim.eps_from_x0(x, x0, a_t[i])
        out = ddim.target_for(prediction, x0, eps, a_t[i])
        noise = rng.standard_normal(x0.shape)
        x = ddim.step(out, x, float(a_t[i]), float(a_prev[i]), prediction_type=prediction,
                      eta=eta, noise=noise)
        assert np.all(np.isfinite(x))
        # Eq. (12) with the exact x0: the predicted x0 is the true one at every step.
        sigma = ddim.sigma(a_t[i], a_prev[i], eta)
        expect = (math.sqrt(a_prev[i]) * x0
                  + math.sqrt(max(1 - a_prev[i] - sigma**2, 0.0)) * eps + sigma * noise)
        np.testing.assert_allclose(x, expect, atol=1e-6 * (1 + np.max(np.abs(eps))))
    if alpha_one:
        np.testing.assert_allclose(x, x0, atol=1e-6)


# ---------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------

image_modes = st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "I;16", "1", "CMYK"])


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          deadline=None, max_examples=30)
@given(
    images=st.lists(
        st.tuples(image_modes, st.integers(1, 40), st.integers(1, 40),
                  st.sampled_from(["png", "bmp", "webp", "jpg"]), st.integers(0, 2)),
        min_size=1, max_size=6,
    ),
    corrupt=st.integers(0, 2),
    size=st.sampled_from([8, 16, 32]),
)
def test_image_folder_loads_anything_pillow_can_read(images: list[tuple[str, int, int, str, int]],
                                                     corrupt: int, size: int) -> None:
    from PIL import Image

    from fewstep.train.data import DataError, ImageFolder

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        for i, (mode, w, h, ext, cls) in enumerate(images):
            folder = root / f"class{cls}"
            folder.mkdir(exist_ok=True)
            img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
            try:
                img.save(folder / f"{i}.{ext}")
            except OSError:  # this format cannot store this mode: store it as RGB
                img.convert("RGB").save(folder / f"{i}.{ext}")
        for j in range(corrupt):
            (root / "class0").mkdir(exist_ok=True)
            (root / "class0" / f"bad{j}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * j)
        if corrupt:
            with pytest.raises(DataError) as e:
                ImageFolder.scan(root, size)
            assert f"{corrupt} unreadable" in str(e.value) and "bad0.png" in str(e.value)
            return
        folder = ImageFolder.scan(root, size)
        assert len(folder) == len(images)
        assert folder.num_classes == len({c for *_, c in images})
        for i in range(len(folder)):
            arr, label = folder.load(i)
            assert arr.shape == (size, size, 3) and arr.dtype == np.uint8
            assert 0 <= label < folder.num_classes
