"""The SyncTalk_2D reference networks as PyTorch modules (the only module that imports torch).

`ReferenceUNet` is the 328 UNet with the "ave" audio branch and `AudioEncoder` the "ave"
audio encoder. Their ``state_dict()`` keys and shapes equal the reference tables
(``unet328_ave_state_dict.tsv``, ``audio_encoder_state_dict.tsv``) exactly, in the same
order, so a real checkpoint loads with ``strict=True``. They exist to read and verify
checkpoints (`lipsync.avatars.convert`) and to train small demo avatars; serving uses the ONNX
graphs of `lipsync.avatars.nets.onnx_builder`, which must compute the same function.

Architecture (the reference ``unet_328.py`` and the "ave" audio encoder of SyncTalk_2D).
Points the written spec leaves open, settled as the original code does:

- Inverted residual: ``conv`` = Sequential(1x1 conv (no bias) inp -> 2*inp, BN, ReLU,
  3x3 depthwise conv (stride s, padding 1, no bias), BN, ReLU, 1x1 conv (no bias) -> oup,
  BN); the residual add ``x + conv(x)`` only where marked, and no activation after it.
- Down block: ``maxpool_conv.0.double_conv`` = [IR(stride 2), IR(residual)] (despite the
  name there is no max-pooling); inc = a single IR(6 -> 32) at stride 1.
- Audio branch (``audio_model``, input [B, 32, 16, 16]): IR(32->64), IR(64->128),
  conv3 3x3 stride 1 padding 1 (with bias) + bn3 + ReLU, IR(res), conv5 3x3 stride 2
  padding 3 (with bias) + bn5 + ReLU (16x16 -> 10x10), IR(res), IR(res).
- Fusion: ``cat([visual, audio], dim=1)`` (visual first) -> 1024 channels at 10x10, then
  ``fuse_conv`` = two double-conv blocks 1024 -> 512 -> 256, stride 1.
- Up block: upsample x2 (bilinear, align_corners=True), zero-pad to the skip's size (a
  no-op at 320x320 input), ``cat([upsampled, skip], dim=1)`` (upsampled first), then the
  double conv [IR(stride 1), IR(residual)]. Channels: up1 512->128, up2 256->64,
  up3 128->32, up4 64->32, up5 64->16.
- ``outc``: 1x1 conv 16 -> 3 with bias, then sigmoid.
- Audio encoder block ``audio_encoder.<i>.conv_block`` = Sequential(conv (with bias), BN);
  forward ``relu(conv_block(x) + x)`` for residual blocks, ``relu(conv_block(x))``
  otherwise (plain ReLU, not leaky). The [B, 512, 1, 1] result is squeezed to [B, 512].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

UNET_CHANNELS = (32, 64, 128, 256, 512)


class InvertedResidual(nn.Module):
    """MobileNetV2-style block: expand 1x1, depthwise 3x3, project 1x1, each followed by BN."""

    def __init__(self, inp: int, oup: int, stride: int, use_res_connect: bool, expand_ratio: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError("stride must be 1 or 2")
        hidden = inp * expand_ratio
        self.stride = stride
        self.use_res_connect = use_res_connect
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class DoubleConvDW(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        self.double_conv = nn.Sequential(
            InvertedResidual(in_channels, out_channels, stride, False, expand_ratio=2),
            InvertedResidual(out_channels, out_channels, 1, True, expand_ratio=2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class InConvDw(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.inconv = nn.Sequential(
            InvertedResidual(in_channels, out_channels, 1, False, expand_ratio=2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inconv(x)


class Down(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.maxpool_conv = nn.Sequential(DoubleConvDW(in_channels, out_channels, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = DoubleConvDW(in_channels, out_channels, stride=1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        x1 = self.up(x1)
        dy = x2.shape[2] - x1.shape[2]
        dx = x2.shape[3] - x1.shape[3]
        if dy or dx:
            x1 = F.pad(x1, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([x1, x2], dim=1))


class OutConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class AudioConvAve(nn.Module):
    """The UNet's audio branch: [B, 32, 16, 16] -> [B, 512, 10, 10]."""

    def __init__(self) -> None:
        super().__init__()
        ch = UNET_CHANNELS
        self.conv1 = InvertedResidual(ch[0], ch[1], 1, False, expand_ratio=2)
        self.conv2 = InvertedResidual(ch[1], ch[2], 1, False, expand_ratio=2)
        self.conv3 = nn.Conv2d(ch[2], ch[3], kernel_size=3, padding=1, stride=1)
        self.bn3 = nn.BatchNorm2d(ch[3])
        self.conv4 = InvertedResidual(ch[3], ch[3], 1, True, expand_ratio=2)
        self.conv5 = nn.Conv2d(ch[3], ch[4], kernel_size=3, padding=3, stride=2)
        self.bn5 = nn.BatchNorm2d(ch[4])
        self.relu = nn.ReLU()
        self.conv6 = InvertedResidual(ch[4], ch[4], 1, True, expand_ratio=2)
        self.conv7 = InvertedResidual(ch[4], ch[4], 1, True, expand_ratio=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.conv2(x)
        x = self.relu(self.bn3(self.conv3(x)))
        x = self.conv4(x)
        x = self.relu(self.bn5(self.conv5(x)))
        x = self.conv6(x)
        return self.conv7(x)


class ReferenceUNet(nn.Module):
    """SyncTalk_2D 328 UNet, "ave" audio: ([B,6,320,320], [B,32,16,16]) -> [B,3,320,320]."""

    def __init__(self, n_channels: int = 6):
        super().__init__()
        ch = UNET_CHANNELS
        self.n_channels = n_channels
        # Registration order = state-dict order of the reference checkpoints.
        self.audio_model = AudioConvAve()
        self.fuse_conv = nn.Sequential(
            DoubleConvDW(ch[4] * 2, ch[4], stride=1),
            DoubleConvDW(ch[4], ch[3], stride=1),
        )
        self.inc = InConvDw(n_channels, ch[0])
        self.down1 = Down(ch[0], ch[0])
        self.down2 = Down(ch[0], ch[1])
        self.down3 = Down(ch[1], ch[2])
        self.down4 = Down(ch[2], ch[3])
        self.down5 = Down(ch[3], ch[4])
        self.up1 = Up(ch[4], ch[3] // 2)
        self.up2 = Up(ch[3], ch[2] // 2)
        self.up3 = Up(ch[2], ch[1] // 2)
        self.up4 = Up(ch[1], ch[0])
        self.up5 = Up(ch[1], ch[0] // 2)
        self.outc = OutConv(ch[0] // 2, 3)

    def forward(self, x: torch.Tensor, audio_feat: torch.Tensor) -> torch.Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x6 = self.down5(x5)
        audio = self.audio_model(audio_feat)
        x6 = self.fuse_conv(torch.cat([x6, audio], dim=1))
        x = self.up1(x6, x5)
        x = self.up2(x, x4)
        x = self.up3(x, x3)
        x = self.up4(x, x2)
        x = self.up5(x, x1)
        return torch.sigmoid(self.outc(x))


class Conv2dBlock(nn.Module):
    """Audio encoder block: conv (with bias) + BN, optional residual add, then ReLU."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int,
        stride: int | tuple[int, int],
        padding: int,
        residual: bool = False,
    ):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size, stride, padding),
            nn.BatchNorm2d(cout),
        )
        self.act = nn.ReLU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return self.act(out)


class AudioEncoder(nn.Module):
    """SyncTalk_2D "ave" audio encoder: mel windows [B, 1, 80, 16] -> features [B, 512]."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_encoder = nn.Sequential(
            Conv2dBlock(1, 32, 3, 1, 1),
            Conv2dBlock(32, 32, 3, 1, 1, residual=True),
            Conv2dBlock(32, 32, 3, 1, 1, residual=True),
            Conv2dBlock(32, 64, 3, (3, 1), 1),
            Conv2dBlock(64, 64, 3, 1, 1, residual=True),
            Conv2dBlock(64, 64, 3, 1, 1, residual=True),
            Conv2dBlock(64, 128, 3, 3, 1),
            Conv2dBlock(128, 128, 3, 1, 1, residual=True),
            Conv2dBlock(128, 128, 3, 1, 1, residual=True),
            Conv2dBlock(128, 256, 3, (3, 2), 1),
            Conv2dBlock(256, 256, 3, 1, 1, residual=True),
            Conv2dBlock(256, 512, 3, 1, 0),
            Conv2dBlock(512, 512, 1, 1, 0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.audio_encoder(x)
        return out.squeeze(3).squeeze(2)


def state_dict_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Ordered key -> shape of a module's state dict (to compare with the reference table)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}
