"""Running the system on one machine (development, `make run`, `make demo`, tests and
benchmarks): launching both services (`launch.py`, `replica_env.py`), free ports
(`ports.py`), the demo (`demo.py`) and development certificates (`devcerts.py`).
Nothing deployed imports it."""
