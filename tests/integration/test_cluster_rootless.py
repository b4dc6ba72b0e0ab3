"""The local cluster inside a user namespace (`unshare --user --map-root-user --net --mount`).

Run here as root (the interpreter of this machine's venv is not readable by other
users), so this shows the namespace-confined path: the whole cluster, API server
included, lives inside the new user, network and mount namespaces, with a private
/run, and nothing of it is visible from the host afterwards.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import trio

pytestmark = [pytest.mark.netns, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
_FETCH = ("import sys, urllib.request; "
          "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())")

SCRIPT = """
set -e
mount -t tmpfs tmpfs /run
ip link set lo up
ctl() { "$PY" -m deploy.ambientctl "$@"; }
ctl cluster up --nodes 2 --name rl >/dev/null
cat > /run/app.yaml <<END
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: web, image: ambient/echo, ports: [{containerPort: 8080}]}]}
END
AMBIENT_CLUSTER=rl ctl apply -f /run/app.yaml >/dev/null
for i in $(seq 1 150); do
  if out=$(ctl exec --cluster rl deploy/web -- "$PY" -c "$FETCH" http://localhost:8080/ 2>/dev/null)
  then echo "$out"; break; fi
  sleep 0.2
done
ctl cluster down --name rl >/dev/null
ls /run/netns | wc -l
"""


async def test_cluster_runs_inside_a_user_namespace() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    with trio.fail_after(120):
        done = await trio.run_process(
            ["unshare", "--user", "--map-root-user", "--net", "--mount", "sh", "-c", SCRIPT],
            capture_stdout=True, capture_stderr=True, check=False, cwd=REPO,
            env={"PY": sys.executable, "FETCH": _FETCH, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert '"pod":"web-' in out, out + done.stderr.decode()[-2000:]
    assert out.strip().splitlines()[-1] == "0"  # no namespace left inside either
