#!/usr/bin/env bash
# End-to-end run of pyambient on a kind cluster, from nothing to a verdict:
#
#   1. create a 3-node, 2-zone kind cluster (deploy/kind/cluster.yaml)
#   2. build the project image and load it into the cluster's nodes
#   3. install the Gateway API and Istio CRDs (pinned releases) and the mesh
#   4. deploy the test apps (tests/kind/manifests/apps.yaml) and a waypoint
#   5. run tests/kind
#   6. on failure, collect logs into $ARTIFACTS; always delete the cluster
#
# Needs docker (with a running engine), kind and kubectl on PATH; the project's
# virtual environment is made by scripts/bootstrap.sh when missing.
#
# Environment:
#   KIND_CLUSTER_NAME  cluster name (default pyambient-e2e)
#   PYAMBIENT_IMAGE    image tag to build and test (default pyambient:e2e)
#   KEEP_CLUSTER=1     keep the cluster afterwards (then: kind delete cluster --name ...)
#   ARTIFACTS          where logs go on failure (default build/kind-logs)
#   PYTEST_ARGS        extra pytest arguments, e.g. "-k split"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

CLUSTER="${KIND_CLUSTER_NAME:-pyambient-e2e}"
IMAGE="${PYAMBIENT_IMAGE:-pyambient:e2e}"
KEEP="${KEEP_CLUSTER:-0}"
ARTIFACTS="${ARTIFACTS:-$ROOT/build/kind-logs}"
export KIND_CLUSTER_NAME="$CLUSTER" PYAMBIENT_IMAGE="$IMAGE"
TEST_NAMESPACE=mesh-e2e
WAYPOINT=waypoint

log() { printf '\n=== %s\n' "$*" >&2; }
die() { printf 'e2e: %s\n' "$*" >&2; exit 2; }

for tool in docker kind kubectl; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is not on PATH (needed: docker, kind, kubectl)"
done
docker info >/dev/null 2>&1 || die "no Docker engine answers 'docker info': start Docker first"
if [ ! -x .venv/bin/python ]; then
    # shellcheck source=scripts/bootstrap.sh
    source scripts/bootstrap.sh
fi
PYTHON="$ROOT/.venv/bin/python"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    die "a kind cluster named $CLUSTER exists already: delete it or set KIND_CLUSTER_NAME"
fi
WORKDIR="$(mktemp -d "${TMPDIR:-/tmp}/pyambient-e2e.XXXXXX")"
export KUBECONFIG="$WORKDIR/kubeconfig"  # never touches the user's own kubeconfig

collect_logs() {
    log "collecting logs into $ARTIFACTS"
    mkdir -p "$ARTIFACTS"
    kind export logs "$ARTIFACTS/kind" --name "$CLUSTER" >/dev/null 2>&1 || true
    kubectl get nodes,pods,services,endpointslices,gateways,httproutes -A -o wide \
        >"$ARTIFACTS/objects.txt" 2>&1 || true
    kubectl get events -A --sort-by=.lastTimestamp >"$ARTIFACTS/events.txt" 2>&1 || true
    for ns in ambient-system "$TEST_NAMESPACE" mesh-e2e-late; do
        kubectl -n "$ns" describe pods >"$ARTIFACTS/describe-$ns.txt" 2>&1 || true
        kubectl -n "$ns" logs --all-containers --prefix --tail=-1 -l 'app' \
            >"$ARTIFACTS/logs-$ns.txt" 2>&1 || true
    done
    kubectl -n "$TEST_NAMESPACE" logs --all-containers --prefix --tail=-1 \
        -l "gateway.networking.k8s.io/gateway-name=$WAYPOINT" \
        >"$ARTIFACTS/logs-waypoint.txt" 2>&1 || true
    echo "e2e: logs are in $ARTIFACTS" >&2
}

finish() {
    local rc=$?
    trap - EXIT
    if [ "$rc" -ne 0 ]; then
        collect_logs
    fi
    if [ "$KEEP" = 1 ]; then
        echo "e2e: cluster kept: KUBECONFIG=$KUBECONFIG; remove it with:" \
            "kind delete cluster --name $CLUSTER" >&2
    else
        log "deleting cluster $CLUSTER"
        kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
        rm -rf "$WORKDIR"
    fi
    exit "$rc"
}
trap finish EXIT

log "creating kind cluster $CLUSTER"
kind create cluster --name "$CLUSTER" --config deploy/kind/cluster.yaml \
    --kubeconfig "$KUBECONFIG" --wait 180s

log "building $IMAGE and loading it into the nodes"
docker build -f deploy/docker/Dockerfile -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

log "installing the CRDs the mesh reads (pinned releases)"
mapfile -t crd_urls < <("$PYTHON" -c \
    'from deploy.install import CRD_SOURCES; print("\n".join(u for _, u in CRD_SOURCES))')
for url in "${crd_urls[@]}"; do
    kubectl apply --server-side -f "$url"
done
kubectl wait --for=condition=Established crd --all --timeout=120s

log "checking the kustomize base against the API server"
kubectl apply -k deploy/k8s --dry-run=server >/dev/null

log "installing the mesh"
"$PYTHON" -m deploy.ambientctl install --image "$IMAGE" --wait-timeout 300

log "deploying the test apps"
sed "s|pyambient:e2e|$IMAGE|g" tests/kind/manifests/apps.yaml | kubectl apply -f -
for ns in "$TEST_NAMESPACE" mesh-e2e-late; do
    kubectl -n "$ns" rollout status deployment --timeout=300s
done

log "adding the waypoint of $TEST_NAMESPACE"
# On Kubernetes this also binds the waypoint's ServiceAccount to pyambient-waypoint.
# --wait returns once the waypoint itself has written Programmed=True for the Gateway's
# current generation and one of its pods is Ready (there is no istiod to write it).
"$PYTHON" -m deploy.ambientctl waypoint apply -n "$TEST_NAMESPACE" --name "$WAYPOINT" \
    --image "$IMAGE" --kubeconfig "$KUBECONFIG" --wait --wait-timeout 300
kubectl get clusterrolebinding "pyambient-waypoint-$TEST_NAMESPACE-$WAYPOINT" >/dev/null
programmed_jsonpath='{.metadata.generation} {.status.conditions[?(@.type=="Programmed")].status} {.status.conditions[?(@.type=="Programmed")].observedGeneration}'
# The echo ends the line, so that read succeeds; a missing condition leaves both empty.
read -r generation programmed observed < <(
    kubectl -n "$TEST_NAMESPACE" get gateway "$WAYPOINT" -o jsonpath="$programmed_jsonpath"
    echo)
if [ "${programmed:-}" != True ] || [ "${observed:-}" != "$generation" ]; then
    kubectl -n "$TEST_NAMESPACE" get gateway "$WAYPOINT" -o yaml >&2 || true
    die "gateway $TEST_NAMESPACE/$WAYPOINT: Programmed=${programmed:-unset} for generation" \
        "${observed:-unset}, want True for generation $generation (see the waypoint's logs)"
fi
echo "e2e: gateway $TEST_NAMESPACE/$WAYPOINT Programmed=True (generation $generation)" >&2

log "running tests/kind"
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of words on purpose
"$PYTHON" -m pytest -m kind tests/kind -v -rs ${PYTEST_ARGS:-}
log "e2e passed"
