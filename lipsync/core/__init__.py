"""The reference semantics of SyncTalk_2D inference, shared by both services, the client
and the tools (docs/SEMANTICS.md says which rule lives where and which test pins it).

Each module holds one kind of rule and imports no service, no gRPC and nothing heavier
than numpy at import time (OpenCV in `visual`, librosa and scipy inside `mel` when the
first spectrogram is computed, soxr when audio is resampled):

- `tensors`: the networks' tensor contract (names, shapes, byte sizes).
- `audio`: PCM decoding and resampling to 16 kHz, the one float <-> int16 rule, padding to
  the minimum clip length.
- `mel`: the reference mel spectrogram.
- `windows`: frame counts, encoder windows and the UNet's per-frame audio blocks.
- `lookahead`: when a frame of a still-growing clip is final (streaming).
- `visual`: face crop, visual input, mouth pixels, paste-back.
- `timeline`: which background frame each output frame is drawn on (ping-pong).
"""
