#!/usr/bin/env bash
# The kind path: a throw-away kind cluster, the image built and loaded, kubehv deployed with
# manifests/overlays/kind (fake driver on every kind node), then the operator's apiserver
# test suite run against that cluster instead of a locally started control plane.
#
#   hack/kind/e2e.sh            # create, deploy, test, delete
#   KEEP_CLUSTER=1 hack/kind/e2e.sh   # leave the cluster up afterwards
#
# Needs: docker (a running engine), kind, kubectl, and `make venv` done.
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER="${KIND_CLUSTER_NAME:-kubehv-e2e}"
IMAGE="kubehv:dev"
KUBECONFIG_FILE="$(mktemp -t kubehv-kind-kubeconfig.XXXXXX)"
export KUBECONFIG="$KUBECONFIG_FILE"

cleanup() {
  if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
    echo "kind: cluster $CLUSTER kept; export KUBECONFIG=$KUBECONFIG_FILE"
  else
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    rm -f "$KUBECONFIG_FILE"
  fi
}
trap cleanup EXIT

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "kind e2e: $tool is required" >&2; exit 2; }
done

echo "kind: creating cluster $CLUSTER (3 nodes)"
kind create cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG_FILE" --wait 120s \
  --config hack/kind/cluster.yaml

echo "kind: building $IMAGE"
docker build -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

echo "kind: deploying manifests/overlays/kind"
# Server-side apply: the CRDs are too large for client-side apply's last-applied annotation.
kubectl apply --server-side -k manifests/overlays/kind
kubectl -n kubehv-system rollout status deployment/kubehv-controller --timeout=180s
kubectl -n kubehv-system rollout status daemonset/kubehv-agent --timeout=180s
# Each agent creates its own NodeHypervisor: wait for one per kind node, then for Ready.
nodes=$(kubectl get nodes --no-headers | wc -l)
for _ in $(seq 120); do
  [ "$(kubectl get nodehypervisors --no-headers 2>/dev/null | wc -l)" -ge "$nodes" ] && break
  sleep 1
done
kubectl wait --for=condition=Ready nodehypervisors --all --timeout=120s

echo "kind: running the portable end-to-end suite against the cluster"
# KUBEHV_USE_EXISTING_CLUSTER=1: the control_plane fixture uses $KUBECONFIG instead of starting
# etcd + kube-apiserver, and tests/e2e/test_portable.py uses the deployed controller and agents
# (their Ready fake NodeHypervisors) instead of starting processes, as envtest's
# USE_EXISTING_CLUSTER does. The same module runs locally in `make test`, and
# tests/ship/test_existing_cluster.py runs it with this flag against a local cluster.
KUBEHV_USE_EXISTING_CLUSTER=1 KUBEHV_REQUIRE_REAL=1 \
  .venv/bin/pytest tests/e2e/test_portable.py "$@"
