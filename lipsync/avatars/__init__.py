"""Avatar tools (`lipsync-avatar`, the `tools` and `convert` extras): the avatar package
format (`package.py`: reader, catalog, writer), importing a SyncTalk_2D checkpoint
(`synctalk_import.py`), checkpoint conversion to ONNX (`convert.py`), the networks
(`nets/`), int8 UNets for the CPU (`quantize/`: `build.py` makes one, `check.py` is the
check the inference service runs before serving it) and the speech-like signal their
calibration, checks, tests and benchmarks use (`speech_signal.py`). The services read
avatars through `package.py` and `quantize/check.py` only."""
