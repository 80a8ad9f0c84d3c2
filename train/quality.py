"""Sample quality without Inception: a classifier of our own and metrics in its features.

No Inception weights can be fetched here, so ``fewstep eval`` trains a small CNN on the
same data the generator learnt (the built-in landscapes, or an image folder with class
sub-folders) and measures in the space of its penultimate features:

* **FD-cls**, the Fréchet distance in fewstep-classifier features (the FID formula,
  ‖μ₁-μ₂‖² + tr(Σ₁ + Σ₂ - 2(Σ₁Σ₂)^½), in another feature space: not comparable to FID);
* **conditional accuracy**: the fraction of samples of class k that the classifier
  calls k (the classifier's own held-out accuracy on real images is its ceiling);
* **precision / recall**: k-NN manifold estimates (Kynkäänniemi et al. 2019).

``RealData`` keeps real images in disjoint splits: the classifier's training images,
its held-out images, and per seed two reference sets (generated vs. set A; set B vs.
set A is the real-vs-real noise floor of FD-cls at the same n).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from fewstep.runtime import clitools
from fewstep.runtime.errors import ArtifactError
from fewstep.runtime.fileio import atomic_path

from .data import DataError, ImageFolder, Landscapes, to_model_range

FD_NAME = "Fréchet distance in fewstep-classifier features (FD-cls)"
FORMAT = "fewstep-classifier"
VERSION = 1

F64 = NDArray[np.float64]
U8 = NDArray[np.uint8]
I64 = NDArray[np.int64]

# Disjoint index ranges of the (infinite) landscapes for each use; the generator was
# trained on indices 0 .. steps * batch, far below all of these.
_CLASSIFIER_BASE, _HELDOUT_BASE, _REFERENCE_BASE = 1 << 40, 1 << 41, 1 << 42
_SET_STRIDE = 1 << 24


# ---------------------------------------------------------------------------------
# Real images
# ---------------------------------------------------------------------------------


class _Fetch(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    def __init__(self, fetch: Callable[[int], tuple[U8, int]], indices: Sequence[int]) -> None:
        self.fetch, self.indices = fetch, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.fetch(int(self.indices[i]))
        return torch.from_numpy(np.ascontiguousarray(image)), int(label)


def _load(fetch: Callable[[int], tuple[U8, int]], indices: Sequence[int],
          workers: int) -> tuple[U8, I64]:
    """Images (n, H, W, 3) uint8 and labels (n,) for ``indices``, with loader processes."""
    loader = torch.utils.data.DataLoader(_Fetch(fetch, indices), batch_size=256,
                                         num_workers=workers, shuffle=False)
    images, labels = [], []
    for x, y in loader:
        images.append(x.numpy())
        labels.append(y.numpy())
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


class RealData:
    """Real labelled images of a data spec at one size, in disjoint splits."""

    def __init__(self, spec: str, size: int, seed: int = 0, workers: int = 0) -> None:
        self.spec, self.size, self.seed, self.workers = spec, size, seed, workers
        self.folder: ImageFolder | None = None
        try:
            if spec == "landscapes":
                self.landscapes = Landscapes(seed, size)
                self.class_names: tuple[str, ...] = self.landscapes.class_names
            else:
                self.folder = ImageFolder.scan(spec, size)
                self.class_names = self.folder.class_names
        except DataError as e:
            raise ValueError(str(e)) from None
        if not self.class_names:
            raise ValueError(
                f"{spec!r} has no class sub-folders: fewstep eval trains its feature "
                "classifier on class labels; put the images into one folder per class")
        if self.folder is not None:
            n = len(self.folder)
            if n < 4:
                raise ValueError(f"{spec!r} has {n} images; fewstep eval needs at least 4")
            perm = np.random.default_rng([seed, 0xC1A5]).permutation(n)
            cut = max(1, n // 5)
            self._heldout, self._train = perm[:cut], perm[cut:]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _get(self, indices: Sequence[int]) -> tuple[U8, I64]:
        fetch = self.landscapes.image if self.folder is None else self.folder.load
        return _load(fetch, indices, self.workers)

    def classifier_images(self, n: int) -> tuple[U8, I64]:
        """Up to n training images for the classifier (a folder gives its training split)."""
        if self.folder is None:
            return self._get(range(_CLASSIFIER_BASE, _CLASSIFIER_BASE + n))
        return self._get(self._train[:n].tolist())

    def heldout_images(self, n: int) -> tuple[U8, I64]:
        """Up to n images the classifier never trains on (for its accuracy)."""
        if self.folder is None:
            return self._get(range(_HELDOUT_BASE, _HELDOUT_BASE + n))
        return self._get(self._heldout[:n].tolist())

    def reference_sets(self, seed: int, n: int) -> tuple[tuple[U8, I64], tuple[U8, I64]]:
        """Two disjoint real sets (A, B) of up to n images for one evaluation seed."""
        if self.folder is None:
            a = _REFERENCE_BASE + 2 * seed * _SET_STRIDE
            return (self._get(range(a, a + n)),
                    self._get(range(a + _SET_STRIDE, a + _SET_STRIDE + n)))
        perm = np.random.default_rng([self.seed, 1000 + seed]).permutation(len(self.folder))
        m = min(n, len(perm) // 2)
        return self._get(perm[:m].tolist()), self._get(perm[m: 2 * m].tolist())


# ---------------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassifierConfig:
    """What decides the classifier (recorded in its file)."""

    data: str = "landscapes"
    image_size: int = 32
    data_seed: int = 0
    steps: int = 3000
    batch_size: int = 256
    images: int = 30_000
    heldout: int = 2000
    lr: float = 2e-3
    width: int = 32
    feature_dim: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("image_size", "steps", "batch_size", "images", "heldout", "width",
                     "feature_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"classifier {name}={getattr(self, name)} must be at least 1")
        if self.image_size < 8:
            raise ValueError(f"image_size={self.image_size}: the classifier needs >= 8 px")


class Classifier(nn.Module):
    """A small CNN: 3 stride-2 stages, a feature layer (the FD-cls space), a linear head."""

    def __init__(self, num_classes: int, image_size: int, width: int = 32,
                 feature_dim: int = 128) -> None:
        super().__init__()
        w = width
        layers: list[nn.Module] = []
        for cin, cout, stride in ((3, w, 1), (w, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1),
                                  (2 * w, 4 * w, 2), (4 * w, 4 * w, 1), (4 * w, 4 * w, 2)):
            layers += [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        pool = max(1, min(4, image_size // 8))  # keep a coarse layout (sky above ground)
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.proj = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * pool * pool, feature_dim),
                                  nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, feature_dim): the penultimate layer."""
        out: torch.Tensor = self.proj(self.pool(self.body(x)))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


@dataclass
class TrainedClassifier:
    model: Classifier
    config: ClassifierConfig
    class_names: tuple[str, ...]
    accuracy: float  # on held-out real images
    heldout: int  # how many

    def describe(self, path: Path | None = None) -> dict[str, Any]:
        return {"path": str(path) if path else None, "data": self.config.data,
                "image_size": self.config.image_size, "steps": self.config.steps,
                "feature_dim": self.config.feature_dim, "heldout_accuracy": self.accuracy,
                "heldout_images": self.heldout, "classes": list(self.class_names)}


@torch.no_grad()
def embed(model: Classifier, images: U8 | NDArray[np.float32], device: torch.device,
          batch: int = 1000) -> tuple[F64, I64]:
    """(features (n, D) float64, predicted class (n,)) of uint8 NHWC or float NCHW images."""
    model = model.to(device).eval()
    feats, preds = [], []
    for lo in range(0, len(images), batch):
        chunk = images[lo: lo + batch]
        x = to_model_range(chunk.astype(np.uint8, copy=False)) if chunk.dtype == np.uint8 \
            else chunk
        f = model.features(torch.from_numpy(np.ascontiguousarray(x)).to(device))
        feats.append(f.double().cpu().numpy())
        preds.append(model.head(f).argmax(1).cpu().numpy())
    return np.concatenate(feats), np.concatenate(preds).astype(np.int64)


def train_classifier(config: ClassifierConfig, real: RealData, device: torch.device,
                     progress: bool = True, log: Callable[[str], None] | None = None
                     ) -> TrainedClassifier:
    """Train on ``config.images`` real images (random flips), measure held-out accuracy."""
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    images, labels = real.classifier_images(config.images)
    say(f"classifier: {len(images)} training images of {real.spec!r} ({real.num_classes} "
        f"classes, {config.image_size} px), {config.steps} steps of batch {config.batch_size} "
        f"on {device}")
    torch.manual_seed(config.seed)
    model = Classifier(real.num_classes, config.image_size, config.width,
                       config.feature_dim).to(device)
    optim = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.05)
    x_all = torch.from_numpy(images).to(device)  # (N, H, W, 3) uint8, kept compact
    y_all = torch.from_numpy(labels).to(device)
    gen = torch.Generator(device=device).manual_seed(config.seed)
    bar = None
    if progress:
        bar = clitools.terminal_bar(total=config.steps, desc="classifier", unit="step")
    warm = min(100, config.steps // 10)
    model.train()
    for step in range(config.steps):
        scale = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(
            math.pi * (step - warm) / max(1, config.steps - warm)))
        for group in optim.param_groups:
            group["lr"] = config.lr * scale
        idx = torch.randint(0, len(x_all), (config.batch_size,), device=device, generator=gen)
        x = x_all[idx].permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)
        flip = torch.rand((len(idx), 1, 1, 1), device=device, generator=gen) < 0.5
        x = torch.where(flip, x.flip(3), x)
        loss = F.cross_entropy(model(x), y_all[idx])
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
    if bar is not None:
        bar.close()
    held, held_labels = real.heldout_images(config.heldout)
    _, pred = embed(model, held, device)
    accuracy = float((pred == held_labels).mean())
    say(f"classifier: held-out accuracy {accuracy:.4f} on {len(held)} real images")
    return TrainedClassifier(model.eval(), config, real.class_names, accuracy, len(held))


def save_classifier(path: str | Path, clf: TrainedClassifier) -> Path:
    """Atomically write a ``torch.load(weights_only=True)``-loadable classifier file."""
    payload = {
        "format": FORMAT, "version": VERSION, "config": dataclasses.asdict(clf.config),
        "class_names": list(clf.class_names), "accuracy": clf.accuracy,
        "heldout": clf.heldout,
        "state": {k: v.detach().cpu().clone() for k, v in clf.model.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_classifier(path: str | Path) -> TrainedClassifier:
    p = Path(path)
    try:
        raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, ... : one message
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ArtifactError(f"{str(p)!r} is not a readable classifier file ({first}); delete "
                            "it to retrain, or pass another --classifier") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ArtifactError(f"{str(p)!r} is not a fewstep classifier file; delete it to "
                            "retrain, or pass another --classifier")
    if raw.get("version") != VERSION:
        raise ArtifactError(f"{str(p)!r} has classifier version {raw.get('version')!r}; this "
                            f"fewstep reads version {VERSION}: delete it to retrain")
    try:
        config = ClassifierConfig(**raw["config"])
        names = tuple(raw["class_names"])
        model = Classifier(len(names), config.image_size, config.width, config.feature_dim)
        model.load_state_dict(raw["state"])
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        first = str(e).splitlines()[0][:160]
        raise ArtifactError(f"{str(p)!r}: damaged classifier file ({first}); delete it to "
                            "retrain") from None
    return TrainedClassifier(model.eval(), config, names, float(raw["accuracy"]),
                             int(raw["heldout"]))


def obtain_classifier(path: Path, config: ClassifierConfig, real: RealData,
                      device: torch.device, progress: bool = True,
                      log: Callable[[str], None] | None = None) -> TrainedClassifier:
    """Load the classifier at ``path`` if it fits this data, else train and save it there."""
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if path.exists():
        clf = load_classifier(path)
        c = clf.config
        if (c.data, c.image_size, c.data_seed) != (config.data, config.image_size,
                                                   config.data_seed) \
                or clf.class_names != real.class_names:
            raise ValueError(
                f"classifier {str(path)!r} was trained on {c.data!r} at {c.image_size} px "
                f"(classes {', '.join(clf.class_names)}), not on {config.data!r} at "
                f"{config.image_size} px; pass another --classifier path, or delete it to "
                "retrain")
        say(f"classifier: {str(path)!r} (held-out accuracy {clf.accuracy:.4f})")
        return clf
    clf = train_classifier(config, real, device, progress, say)
    save_classifier(path, clf)
    say(f"classifier saved to {str(path)!r}")
    return clf


# ---------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------


def feature_stats(features: NDArray[Any]) -> tuple[F64, F64]:
    """(mean (D,), covariance (D, D)) in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need (n >= 2, D) features, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(m: F64) -> F64:
    w, v = np.linalg.eigh((m + m.T) / 2)
    out: F64 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    return out


def frechet_distance(mu1: F64, sigma1: F64, mu2: F64, sigma2: F64) -> float:
    """‖μ₁-μ₂‖² + tr Σ₁ + tr Σ₂ - 2 tr (Σ₁Σ₂)^½, with tr (Σ₁Σ₂)^½ from the symmetric
    PSD matrix Σ₁^½ Σ₂ Σ₁^½ (same eigenvalues as Σ₁Σ₂; stable, no complex parts)."""
    root1 = _sqrt_psd(sigma1)
    eig = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    cross = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * cross)
    return max(value, 0.0)


def fd(a: NDArray[Any], b: NDArray[Any]) -> float:
    """FD-cls between two feature sets (n, D)."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    out = []
    for lo in range(0, len(x), chunk):
        d = torch.cdist(x[lo: lo + chunk], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at 0
    return torch.cat(out)


def _covered(manifold: torch.Tensor, radii: torch.Tensor, query: torch.Tensor,
             chunk: int) -> float:
    hit = []
    for lo in range(0, len(query), chunk):
        d = torch.cdist(query[lo: lo + chunk], manifold)
        hit.append((d <= radii[None, :]).any(dim=1))
    return float(torch.cat(hit).float().mean())


def precision_recall(real: NDArray[Any], fake: NDArray[Any], k: int = 3,
                     device: torch.device | str = "cpu", chunk: int = 1024
                     ) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls.

    Precision: the fraction of generated points inside some real point's k-NN ball;
    recall: the fraction of real points inside some generated point's k-NN ball.
    """
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set")
    r = torch.as_tensor(np.asarray(real), dtype=torch.float32, device=device)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float32, device=device)
    precision = _covered(r, _knn_radii(r, k, chunk), f, chunk)
    recall = _covered(f, _knn_radii(f, k, chunk), r, chunk)
    return precision, recall


def conditional_accuracy(pred: NDArray[Any], labels: NDArray[Any], num_classes: int
                         ) -> tuple[float, list[float | None]]:
    """(overall, per class) fraction of samples of class k classified as k."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    per = [float((pred[labels == k] == k).mean()) if np.any(labels == k) else None
           for k in range(num_classes)]
    return float((pred == labels).mean()), per


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """{"mean", "std" (sample std, 0 for one value), "per_seed"}."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "per_seed": [float(x) for x in v]}
