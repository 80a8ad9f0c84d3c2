"""train/quality.py and `fewstep eval`: FD-cls against direct formulas, precision/recall,
the classifier (a trivially separable folder, its weights_only file), eval end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import quiet_options, tiny_config  # noqa: E402

from fewstep.runtime.errors import ArtifactError  # noqa: E402
from fewstep.train import cli_eval, quality  # noqa: E402
from fewstep.train.distill import DistillConfig, DistillOptions, distill  # noqa: E402
from fewstep.train.fit import train  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    return train(tiny_config(steps=20, batch_size=8), quiet_options(out))


@pytest.fixture(scope="module")
def student(teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("student")
    cfg = DistillConfig(from_steps=4, to_steps=2, steps_per_round=(2,), batch_size=2)
    return distill(teacher, cfg, DistillOptions(out=out, device="cpu", workers=0,
                                                progress=False))[-1]


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two trivially separable classes: reddish and bluish noise images."""
    from PIL import Image

    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for name, channel in (("blue", 2), ("red", 0)):
        (root / name).mkdir()
        for i in range(10):
            arr = rng.integers(0, 90, (20, 20, 3), dtype=np.uint8)
            arr[..., channel] += 160
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


# ---------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------


def _features(n: int = 400, d: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + rng.standard_normal(d)


def test_fd_is_zero_for_identical_sets_and_grows_with_a_shift() -> None:
    a = _features()
    assert abs(quality.fd(a, a)) < 1e-9
    shifts = [quality.fd(a, a + s) for s in (0.1, 0.5, 1.0, 2.0)]
    # Equal covariances: FD is exactly the squared shift of the mean, d * s².
    np.testing.assert_allclose(shifts, [6 * s**2 for s in (0.1, 0.5, 1.0, 2.0)], rtol=1e-6)
    assert shifts == sorted(shifts)
    # Scaling by 2: ‖μ‖² + tr Σ + 4 tr Σ - 2 · 2 tr Σ = ‖μ‖² + tr Σ.
    mu, sigma = quality.feature_stats(a)
    np.testing.assert_allclose(quality.fd(a, 2 * a), mu @ mu + np.trace(sigma), rtol=1e-6)


def test_fd_matches_a_direct_computation() -> None:
    a, b = _features(seed=1), _features(seed=2) * 1.3 + 0.2
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    # tr sqrt(Σ1 Σ2) = Σ sqrt(eigenvalues of Σ1 Σ2) (real, >= 0 for PSD Σ1, Σ2).
    cross = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    direct = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * cross
    np.testing.assert_allclose(quality.fd(a, b), direct, rtol=1e-8)
    try:
        from scipy import linalg
    except ImportError:
        return
    root = linalg.sqrtm(s1 @ s2).real
    scipy_fd = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * root)
    np.testing.assert_allclose(quality.fd(a, b), scipy_fd, rtol=1e-6)


def test_precision_recall() -> None:
    rng = np.random.default_rng(0)
    two_modes = np.concatenate([rng.normal(0, 0.1, (100, 2)), rng.normal(5, 0.1, (100, 2))])
    assert quality.precision_recall(two_modes, two_modes) == (1.0, 1.0)
    assert quality.precision_recall(two_modes, two_modes + 100.0) == (0.0, 0.0)
    one_mode = rng.normal(0, 0.1, (100, 2))  # mode dropping: precise, half the recall
    precision, recall = quality.precision_recall(two_modes, one_mode)
    assert precision > 0.9 and 0.4 < recall <= 0.55
    with pytest.raises(ValueError, match="needs more than 3 points"):
        quality.precision_recall(two_modes[:3], two_modes)


def test_conditional_accuracy_and_mean_std() -> None:
    overall, per = quality.conditional_accuracy(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 4)
    assert overall == 0.75 and per == [1.0, 1.0, 0.5, None]
    assert quality.mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(2**0.5),
                                             "per_seed": [1.0, 3.0]}
    assert quality.mean_std([4.0])["std"] == 0.0


# ---------------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------------


def test_classifier_on_an_easy_folder_is_perfect_and_round_trips(
        colour_folder: Path, tmp_path: Path) -> None:
    real = quality.RealData(str(colour_folder), 16)
    assert real.class_names == ("blue", "red")
    config = quality.ClassifierConfig(data=str(colour_folder), image_size=16, steps=30,
                                      batch_size=16, images=100, heldout=100)
    clf = quality.train_classifier(config, real, CPU, progress=False, log=lambda m: None)
    assert clf.accuracy == 1.0 and clf.heldout == 4  # a fifth of 20 images, never trained on
    images, labels = real.reference_sets(0, 100)[0]
    assert len(images) == 10  # half of the folder per reference set
    feats, pred = quality.embed(clf.model, images, CPU)
    assert feats.shape == (10, config.feature_dim)
    assert quality.conditional_accuracy(pred, labels, 2)[0] == 1.0
    path = quality.save_classifier(tmp_path / "clf.pt", clf)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "fewstep-classifier" and raw["class_names"] == ["blue", "red"]
    again = quality.load_classifier(path)
    np.testing.assert_array_equal(quality.embed(again.model, images, CPU)[0], feats)
    # A cached classifier of other data is refused with the fix.
    other = quality.ClassifierConfig(data=str(colour_folder), image_size=32)
    with pytest.raises(ValueError, match=r"was trained on .* at 16 px.*delete it to retrain"):
        quality.obtain_classifier(path, other, quality.RealData(str(colour_folder), 32), CPU,
                                  progress=False, log=lambda m: None)
    (tmp_path / "bad.pt").write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="is not a readable classifier file"):
        quality.load_classifier(tmp_path / "bad.pt")


def test_real_data_splits_are_disjoint(tmp_path: Path) -> None:
    real = quality.RealData("landscapes", 16)
    (a, la), (b, lb) = real.reference_sets(0, 12)
    (c, _), _ = real.reference_sets(1, 12)
    held, _ = real.heldout_images(12)
    train_imgs, _ = real.classifier_images(12)
    sets = [a, b, c, held, train_imgs]
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            assert not np.array_equal(sets[i], sets[j])
    assert sorted(la.tolist()) == sorted(lb.tolist()) == sorted([0, 1, 2, 3, 4, 5] * 2)
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
    with pytest.raises(ValueError, match="has no class sub-folders: fewstep eval trains"):
        quality.RealData(str(tmp_path), 16)


# ---------------------------------------------------------------------------------
# fewstep eval
# ---------------------------------------------------------------------------------


def run_eval(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli_eval.main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


TINY = ["--n", "12", "--seeds", "2", "--classifier-steps", "5", "--classifier-images", "48",
        "--classifier-batch-size", "16", "--classifier-heldout", "24", "--device", "cpu",
        "--no-progress"]


def test_eval_end_to_end(teacher: Path, student: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    out, grid = tmp_path / "results.jsonl", tmp_path / "grid.png"
    code, stdout, stderr = run_eval([str(teacher), str(student), "--steps", "1", "2",
                                     "--student-steps", "1", "--out", str(out),
                                     "--grid", str(grid), *TINY], capsys)
    assert code == 0, stderr
    assert stdout.split() == [str(out), str(out.with_suffix(".md")), str(grid)]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    name = teacher.parent.name  # .../teacher0/checkpoint.pt is called teacher0
    assert [(r["model"], r["steps"], r["distilled_steps"]) for r in rows] == [
        (name, 1, []), (name, 2, []), ("round_002", 2, [2]), ("round_002", 1, [2])]
    for r in rows:
        assert r["metric"] == quality.FD_NAME and "FID" not in r["metric"]
        for key in ("fd_cls", "fd_cls_real_floor", "conditional_accuracy", "precision",
                    "recall"):
            assert set(r[key]) == {"mean", "std", "per_seed"} and len(r[key]["per_seed"]) == 2
            assert np.isfinite(r[key]["mean"]) and r[key]["std"] >= 0
        assert 0 <= r["conditional_accuracy"]["mean"] <= 1
        assert len(r["conditional_accuracy_per_class"]) == 6 and r["n"] == 12
        assert r["seeds"] == [0, 1] and r["spacing"] == "trailing" and r["eta"] == 0.0
        assert r["classifier"]["heldout_images"] == 24
        assert 0 <= r["classifier"]["heldout_accuracy"] <= 1
        assert {"torch", "python", "device", "fewstep"} <= set(r["environment"])
        assert r["command"].startswith("fewstep eval ") and r["sample_seconds"] > 0
    # Same seeds: the real floor and the generated sets are paired across rows.
    assert rows[0]["fd_cls_real_floor"] == rows[2]["fd_cls_real_floor"]
    md = out.with_suffix(".md").read_text()
    assert "It is not FID" in md and f"| {name} | DDIM | 1 |" in md
    assert "| round_002 | distilled for 2 | 2 |" in md
    classifier = tmp_path / "classifier-landscapes-16px.pt"
    assert torch.load(classifier, weights_only=True)["format"] == "fewstep-classifier"
    from PIL import Image

    with Image.open(grid) as im:
        arr = np.asarray(im.convert("RGB"))
    # 2 groups (DDIM teacher, distilled) x 6 classes at 4x, rows = steps 1 and 2.
    assert arr.shape == (30 + 2 * 66 + 2, 64 + 2 * (6 * 66 + 12), 3)
    student_1_step = arr[30: 30 + 64, 64 + 408: 64 + 408 + 6 * 66]
    assert (student_1_step == 255).all()  # the 2-step student has no 1-step cell
    assert (arr[30 + 66: 30 + 66 + 64, 64: 64 + 64] != 255).any()  # DDIM, 2 steps
    # A second run reuses the cached classifier.
    code, _, stderr = run_eval([str(teacher), "--steps", "1", "--out", str(out), *TINY], capsys)
    assert code == 0 and f"classifier: {str(classifier)!r} (held-out accuracy" in stderr
    assert len(out.read_text().splitlines()) == 1


@pytest.fixture(scope="module")
def unconditional(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uncond")
    return train(tiny_config(steps=1, batch_size=2, conditional=False), quiet_options(out))


@pytest.mark.parametrize("extra, message", [
    (["--n", "0"], "argument --n: 0 must be at least 1"),
    (["--seeds", "0"], "argument --seeds: 0 must be at least 1"),
    (["--steps", "0"], "argument --steps: 0 must be at least 1"),
    (["--steps", "2000"], "error: steps=2000 exceeds num_train_timesteps=1000"),
    (["--guidance", "60"], "error: --guidance 60.0 must be in [0, 50]"),
])
def test_eval_usage_errors(teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           extra: list[str], message: str) -> None:
    code, _, err = run_eval([str(teacher), "--out", str(tmp_path / "r.jsonl"), *extra], capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())  # refused before any work


def test_eval_refuses_bad_inputs(teacher: Path, unconditional: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        ([str(unconditional), "--guidance", "2", "--out", str(tmp_path / "r.jsonl")],
         "needs a conditional model with null conditioning"),
        ([str(tmp_path / "missing.pt"), "--out", str(tmp_path / "r.jsonl")], "does not exist"),
        ([str(teacher), "--out", str(tmp_path / "r.md")], "pass a .jsonl path"),
        ([str(teacher), "--out", str(tmp_path / "no" / "r.jsonl")], "does not exist"),
        ([str(teacher), str(unconditional), "--out", str(tmp_path / "r.jsonl")],
         "do not generate the same kind of images"),
    ]
    for argv, message in cases:
        code, _, err = run_eval(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
        assert message in lines[0], err
