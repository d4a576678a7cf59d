"""The browser front end: a web page and its gateway to StreamComposite.

`python -m lipsync.web` serves it (port 8080 by default). Modules: `app` (the HTTP
application and its routes), `ws_protocol` / `ws_session` (the WebSocket protocol and one
session of it), `origin_checks` (who may connect, which key a page sent),
`gateway_metrics` (/metrics), `upstream` (the compositing service's refusals), `cli`
(the command line). The protocols: docs/DELIVERY.md.
"""

from lipsync.web.app import DEFAULT_SERVER, create_app
from lipsync.web.cli import main

__all__ = ["DEFAULT_SERVER", "create_app", "main"]
