"""The local cluster's API server: a subset of the Kubernetes REST API over SQLite.

Run it as ``python -m deploy.local.apiserver --db PATH --port N [--port-file F]`` or
embed it in a trio program::

    port = await nursery.start(serve, db_path)      # port 0 by default: pick one

Modules: :mod:`.store` (SQLite objects and event history), :mod:`.handler` (URLs, verbs,
discovery, without sockets), :mod:`.server` (trio + h11 shell, watch streaming),
:mod:`.validation`, :mod:`.patch`, :mod:`.tables`, :mod:`.status`.
"""

from __future__ import annotations

from .server import ApiServer, serve
from .store import Store

__all__ = ["ApiServer", "Store", "serve"]
