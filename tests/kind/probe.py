"""Runs inside a test pod (``kubectl exec -i POD -- python - ARGS < probe.py``): sends
COUNT HTTP requests, each on a new connection, and prints one JSON line per answer.

Standard library only: the pod has the project's image but the probe must not depend
on it.  Arguments: URL COUNT [METHOD [HEADER:VALUE ...]].
"""

import http.client
import json
import sys
from urllib.parse import urlsplit


def main() -> None:
    url, count = sys.argv[1], int(sys.argv[2])
    method = sys.argv[3] if len(sys.argv) > 3 else "GET"
    headers = dict(h.split(":", 1) for h in sys.argv[4:])
    parts = urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    for _ in range(count):
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=10)
        try:
            conn.request(method, target, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
            line = {"status": response.status, "body": body}
        except OSError as exc:
            line = {"status": 0, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            conn.close()
        print(json.dumps(line), flush=True)


main()
