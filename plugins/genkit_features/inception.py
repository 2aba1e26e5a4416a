"""The ``inception`` feature extractor: the standard FID Inception-v3 (the TensorFlow graph of
2015-12-05 that Heusel et al. used, as ported by pytorch-fid), its 2,048 pool features.

The weights are never downloaded: they are read from ``weights=PATH`` or from pytorch-fid's
place in the torch hub cache (``<torch hub dir>/checkpoints/`` + :data:`WEIGHTS_FILE`), with
``weights_only=True``. The network is written out here (no torchvision): torchvision's
Inception3 layout and parameter names, with the FID graph's differences (the average pools in
the A, C and first E blocks exclude padding; the last E block max-pools), so pytorch-fid's
weights file loads as it is.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genkit.errors import DataError, GenkitError
from genkit.features import FeatureContext

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
    f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
)


class MissingWeightsError(GenkitError, FileNotFoundError):
    """The FID Inception weights are not on this machine."""


def default_weights_path() -> Path:
    """Where pytorch-fid keeps the weights: ``<torch hub dir>/checkpoints/`` + the file name."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def how_to_get() -> str:
    return (
        f"download {WEIGHTS_URL} to {default_weights_path()} "
        "(or anywhere, and pass weights=PATH: --feature-param weights=PATH)"
    )


class Conv(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3), ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg(x: Tensor) -> Tensor:
    """The FID graph's 3x3 average pool: padding excluded from the mean."""
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class BlockA(nn.Module):
    def __init__(self, cin: int, pool: int) -> None:
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1 = Conv(cin, 48, 1)
        self.branch5x5_2 = Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, c, self.branch_pool(_avg(x))], 1)


class BlockB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b, F.max_pool2d(x, 3, 2)], 1)


class BlockC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1 = Conv(cin, c7, 1)
        self.branch7x7_2 = Conv(c7, c7, row[0], padding=row[1])
        self.branch7x7_3 = Conv(c7, 192, col[0], padding=col[1])
        self.branch7x7dbl_1 = Conv(cin, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, col[0], padding=col[1])
        self.branch7x7dbl_3 = Conv(c7, c7, row[0], padding=row[1])
        self.branch7x7dbl_4 = Conv(c7, c7, col[0], padding=col[1])
        self.branch7x7dbl_5 = Conv(c7, 192, row[0], padding=row[1])
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for layer in (
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            c = layer(c)
        return torch.cat([self.branch1x1(x), b, c, self.branch_pool(_avg(x))], 1)


class BlockD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = Conv(cin, 192, 1)
        self.branch3x3_2 = Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = x
        for layer in (
            self.branch7x7x3_1,
            self.branch7x7x3_2,
            self.branch7x7x3_3,
            self.branch7x7x3_4,
        ):
            b = layer(b)
        return torch.cat([a, b, F.max_pool2d(x, 3, 2)], 1)


class BlockE(nn.Module):
    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Conv(cin, 448, 1)
        self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg(x)
        return torch.cat([self.branch1x1(x), b, c, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in the FID graph; :meth:`features` gives the 2,048 pool3 features of
    images in [-1, 1] (resized bilinearly to 299x299; grey repeated to three channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the graph's logits; unused by the features

    def features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1], C in {1, 3} -> (B, 2048)."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, 2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def load_weights(path: Path) -> FIDInceptionV3:
    """The network with the weights in ``path`` (a state dict; ``weights_only=True``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MissingWeightsError(f"Inception weights {path} are unreadable ({exc})") from None
    net = FIDInceptionV3()
    if not isinstance(state, dict):
        raise MissingWeightsError(f"Inception weights {path} are not a state dict")
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape that differs
        missing, unexpected = [str(exc).strip().splitlines()[-1].strip()], []
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise MissingWeightsError(
            f"{path} is not the FID Inception-v3 state dict (missing: {missing[:3]}, "
            f"unexpected: {unexpected[:3]})"
        )
    return net.eval()


class InceptionFeatures:
    def __init__(self, net: FIDInceptionV3, path: Path, device: torch.device) -> None:
        self.net = net.to(device).eval()
        self.info = {"name": "inception", "weights": str(path), "dims": 2048}

    def __call__(self, x: Tensor) -> Tensor:
        return self.net.features(x)


def inception(context: FeatureContext, weights: str | None = None) -> InceptionFeatures:
    """The FID Inception-v3 pool features (2,048); ``weights``: the weights file (default
    pytorch-fid's place in the torch hub cache). Never downloads."""
    path = Path(weights).expanduser() if weights else default_weights_path()
    if not path.is_file():
        raise MissingWeightsError(f"Inception weights not found at {path}: {how_to_get()}")
    test = context.test
    if test is not None and (len(test.data_shape) != 3 or test.data_shape[0] not in (1, 3)):
        raise DataError(
            f"inception features need grey or RGB images, this data is {tuple(test.data_shape)}"
        )
    return InceptionFeatures(load_weights(path), path, context.device)
