"""The browser front end: a web page and a WebSocket gateway to StreamComposite.

`python -m lipsync.web` serves it (port 8080 by default); see `lipsync/web/gateway.py`
for the WebSocket protocol.
"""

from lipsync.web.gateway import DEFAULT_SERVER, create_app, main

__all__ = ["DEFAULT_SERVER", "create_app", "main"]
