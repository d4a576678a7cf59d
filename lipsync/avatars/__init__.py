"""Avatar tools (`lipsync-avatar`, the `tools` and `convert` extras): the avatar package
format (`package.py`: reader, catalog, writer), importing a SyncTalk_2D checkpoint
(`synctalk_import.py`), checkpoint conversion to ONNX (`convert.py`) and the networks
(`nets/`). The services read avatars through `package.py` only."""
