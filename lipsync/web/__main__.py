"""`python -m lipsync.web [--port 8080] [--server localhost:50052] [--host 0.0.0.0]`."""

from lipsync.web.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
