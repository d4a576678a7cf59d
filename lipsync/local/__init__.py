"""Running the system on one machine (development, `make run`, `make demo`, tests and
benchmarks): launching both services (`launch.py`, `replica_env.py`), free ports
(`ports.py`), the demo (`demo.py`), development certificates (`devcerts.py`) and a
speech-like test signal (`speech_signal.py`). Nothing deployed imports it."""
