"""The tensor contract of the avatar networks (docs/SEMANTICS.md, "Tensors").

    UNet:          input [B, 6, 320, 320] + audio [B, 32, 16, 16] -> output [B, 3, 320, 320]
    audio encoder: mel [B, 1, 80, 16] -> features [B, 512]

All float32. The ONNX builder names its graph inputs and outputs with these names, the
inference service binds sessions by these shapes, and request sizes are checked against
the byte counts below.
"""

from __future__ import annotations

import math

CROP = 328  # side of the resized face crop
INNER = 320  # side of the network's input/output square

UNET_INPUT = "input"
UNET_AUDIO = "audio"
UNET_OUTPUT = "output"
AUDIO_ENCODER_INPUT = "mel"
AUDIO_ENCODER_OUTPUT = "features"

UNET_INPUT_SHAPE = (6, INNER, INNER)  # [real crop, masked crop] / 255, CHW, BGR
UNET_AUDIO_SHAPE = (32, 16, 16)  # 16 encoder rows of 512 features, row-major
UNET_OUTPUT_SHAPE = (3, INNER, INNER)  # mouth region in [0, 1], CHW, BGR
AUDIO_ENCODER_INPUT_SHAPE = (1, 80, 16)  # one mel window, transposed
AUDIO_ENCODER_OUTPUT_SHAPE = (512,)

FACE_CROP_SHAPE = (INNER, INNER, 3)  # uint8 HWC BGR: the inner square of a face crop
MOUTH_U8_SHAPE = (INNER, INNER, 3)  # uint8 HWC BGR: trunc(255 x) of the UNet output

F32 = 4
FACE_CROP_BYTES = math.prod(FACE_CROP_SHAPE)  # uint8, per frame
VISUAL_BYTES = math.prod(UNET_INPUT_SHAPE) * F32  # float32 visual input, per frame
BLOCK_BYTES = math.prod(UNET_AUDIO_SHAPE) * F32  # float32 audio block, per frame
