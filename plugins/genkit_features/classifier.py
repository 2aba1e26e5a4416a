"""The ``classifier`` feature extractor: a small CNN trained on the dataset's labelled train
split, its penultimate layer as features (the protocol of papers that report FID on MNIST with
a LeNet). LeNet-like for small grey images (8x8, 28x28), a small ResNet for RGB (32x32).

It is trained once per data file and setting, cached under
``genkit_cache(cache_dir)/classifiers/`` in a file named by the data file's content
fingerprint (:func:`genkit.data.identity.fingerprint`) and a hash of the settings, and read
back with ``weights_only=True``; its test accuracy travels with it and is reported beside
every figure.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genkit.errors import CheckpointError, DataError
from genkit.features import FeatureContext, genkit_cache

#: Bumped when the networks or the training change, so old cache files are not reused.
VERSION = 1
#: Features (penultimate layer width).
WIDTH = 128


class LeNet(nn.Module):
    """Two conv blocks (5x5 kernels for images of 16 pixels or more, else 3x3; a 2x2 max-pool
    after each, the second only for 16 pixels or more), then ``WIDTH`` features, then logits."""

    def __init__(self, shape: tuple[int, int, int], classes: int) -> None:
        super().__init__()
        c, h, w = shape
        big = min(h, w) >= 16
        k = 5 if big else 3
        self.body = nn.Sequential(
            nn.Conv2d(c, 32, k, padding=k // 2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, k, padding=k // 2),
            nn.ReLU(),
            nn.MaxPool2d(2) if big else nn.Identity(),
            nn.Flatten(),
        )
        n = 64 * (h // (4 if big else 2)) * (w // (4 if big else 2))
        self.penultimate = nn.Sequential(nn.Linear(n, WIDTH), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(WIDTH, classes))

    def features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, WIDTH)."""
        return self.penultimate(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class _Block(nn.Module):
    """A ResNet basic block: two 3x3 convs with batch norm, plus the (projected) input."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.skip(x))


class SmallResNet(nn.Module):
    """A stem and three stages (32, 64, ``WIDTH`` channels; strides 1, 2, 2) of one basic
    block each; global average pooling gives the ``WIDTH`` features."""

    def __init__(self, shape: tuple[int, int, int], classes: int) -> None:
        super().__init__()
        c = shape[0]
        self.body = nn.Sequential(
            nn.Conv2d(c, 32, 3, 1, 1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            _Block(32, 32, 1),
            _Block(32, 64, 2),
            _Block(64, WIDTH, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(WIDTH, classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def architecture(shape: tuple[int, ...]) -> str:
    """``lenet`` for grey images, ``resnet`` for colour ones."""
    if len(shape) != 3:
        raise DataError(
            f"the classifier feature extractor needs image data (C, H, W), this data is {shape}"
        )
    return "lenet" if shape[0] == 1 else "resnet"


def build(arch: str, shape: tuple[int, int, int], classes: int) -> nn.Module:
    return (LeNet if arch == "lenet" else SmallResNet)(shape, classes)


def _shift(x: Tensor, pixels: int, g: torch.Generator) -> Tensor:
    """Random translations by up to ``pixels`` in each direction (edge-padded), one per
    image: a crop of the padded batch, taken once per offset."""
    if pixels == 0:
        return x
    _, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4, mode="replicate")
    span = 2 * pixels + 1
    offset = torch.randint(0, span * span, (x.shape[0],), generator=g)
    out = torch.empty_like(x)
    for o in offset.unique().tolist():
        dy, dx = divmod(o, span)
        pick = offset == o
        out[pick] = padded[pick, :, dy : dy + h, dx : dx + w]
    return out


def accuracy(net: nn.Module, dataset: Any, batch_size: int = 512) -> float:
    """The fraction of ``dataset``'s examples (with ``labels``) that ``net`` classifies right."""
    net.eval()
    right = 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = list(range(start, min(start + batch_size, len(dataset))))
            pred = net(dataset.__getitems__(rows)).argmax(1)
            right += int((pred == torch.as_tensor(dataset.labels[rows])).sum())
    return right / len(dataset)


def train_classifier(
    train: Any, *, arch: str, steps: int, batch_size: int, lr: float, shift: int, seed: int
) -> nn.Module:
    """Adam with a cosine-decayed learning rate on cross-entropy, random shifts of up to
    ``shift`` pixels; a private RNG (the caller's is untouched)."""
    labels = torch.as_tensor(train.labels)
    classes = int(labels.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        net = build(arch, tuple(train.data_shape), classes)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
        net.train()
        n = len(train)
        order = torch.randperm(n, generator=g)
        at = 0
        for _ in range(steps):
            if at + batch_size > n:
                order, at = torch.randperm(n, generator=g), 0
            rows = order[at : at + batch_size].tolist()
            at += batch_size
            x = _shift(train.__getitems__(sorted(rows)), shift, g)
            y = labels[sorted(rows)]
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


class ClassifierFeatures:
    """The penultimate features of a trained classifier; ``info`` holds its test accuracy."""

    def __init__(self, net: nn.Module, info: dict[str, Any], device: torch.device) -> None:
        self.net = net.to(device).eval()
        self.info = info

    def __call__(self, x: Tensor) -> Tensor:
        return self.net.features(x)


def cache_path(folder: Path, data_fingerprint: str, settings: dict[str, Any]) -> Path:
    """``folder/classifiers/<fingerprint>-<settings hash>.pt``."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    key = data_fingerprint.removeprefix("sha256:")[:24]
    return folder / "classifiers" / f"{key}-{digest}.pt"


def classifier(
    context: FeatureContext,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 2e-3,
    shift: int | None = None,
    seed: int = 0,
    cache: str | None = None,
) -> ClassifierFeatures:
    """A small CNN trained on the data's labelled train split (cached per data file); features:
    its penultimate layer. ``shift``: augmentation by random translations (default 1 pixel
    for images under 16 pixels, else 2); ``cache``: the folder (default genkit's cache)."""
    from filelock import FileLock

    from genkit.data.identity import data_identity
    from genkit.training.checkpoint import write_atomic

    train, test = context.train, context.test
    if train is None or test is None:
        raise DataError(f"classifier features need the train and test splits of {context.data}")
    shape = tuple(train.data_shape)
    arch = architecture(shape)
    if train.labels is None or test.labels is None:
        from genkit_features.inception import default_weights_path, how_to_get

        split = "train" if train.labels is None else "test"
        there = default_weights_path().is_file()
        raise DataError(
            f"classifier features need labels, and the {split} split of {context.data} has none: "
            "add labels to the file (genkit data convert keeps them), or use --features "
            + (
                f"inception (its weights are at {default_weights_path()})"
                if there
                else f"inception after getting its weights: {how_to_get()}"
            )
        )
    if shift is None:
        shift = 1 if min(shape[1:]) < 16 else 2
    settings = {
        "version": VERSION,
        "arch": arch,
        "shape": list(shape),
        "steps": int(steps),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "shift": int(shift),
        "seed": int(seed),
    }
    identity = data_identity(context.data, context.cache_dir)
    folder = Path(cache).expanduser() if cache else genkit_cache(context.cache_dir)
    path = cache_path(folder, identity["fingerprint"], settings)
    classes = int(max(train.labels.max(), test.labels.max())) + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            state = _load(path)
            net = build(arch, shape, int(state["meta"]["classes"]))
            net.load_state_dict(state["weights"])
            meta = dict(state["meta"], cached=True)
        else:
            context.echo(
                f"training the feature classifier ({arch}, {steps} steps) on {context.data}; "
                f"cached in {path}"
            )
            began = time.perf_counter()
            net = train_classifier(
                train, arch=arch, steps=steps, batch_size=batch_size, lr=lr, shift=shift, seed=seed
            )
            meta = {
                "name": "classifier",
                "arch": arch,
                "classes": classes,
                "test_accuracy": accuracy(net, test),
                "test_examples": len(test),
                "train_seconds": time.perf_counter() - began,
                "data_fingerprint": identity["fingerprint"],
                "settings": settings,
            }
            state = {"weights": net.state_dict(), "meta": meta}
            write_atomic(path, lambda f: torch.save(state, f), what="feature classifier")
            meta = dict(meta, cached=False)
    info = {**meta, "file": str(path)}
    return ClassifierFeatures(net, info, context.device)


def _load(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "weights" not in state or "meta" not in state:
            raise ValueError("not a genkit feature classifier")
    except Exception as exc:
        raise CheckpointError(
            f"feature classifier {path} is unreadable ({exc}); delete it to train it again"
        ) from None
    return state
