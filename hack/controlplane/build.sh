#!/usr/bin/env bash
# Builds kube-apiserver and etcd from the Go module proxy, once, into a cache outside the clone.
#
# Why: no Debian or PyPI package ships kube-apiserver, Debian's etcd (3.4) is too old, and no
# Docker engine runs here. The Go module proxy does ship the sources, so a tiny throw-away Go
# module that requires k8s.io/kubernetes (with replace lines for its staging modules) builds the
# real binaries. Output: $KUBEHV_CACHE/controlplane/<key>/{kube-apiserver,etcd}; prints that dir.
# Honours KUBEBUILDER_ASSETS first: if it holds both binaries, nothing is built.
set -euo pipefail
K8S_VERSION="${KUBEHV_K8S_VERSION:-v1.32.4}"
ETCD_VERSION="${KUBEHV_ETCD_VERSION:-v3.5.17}"
CACHE="${KUBEHV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubehv}"
OUT="$CACHE/controlplane/k8s-${K8S_VERSION}-etcd-${ETCD_VERSION}"

if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/kube-apiserver" ] && [ -x "$KUBEBUILDER_ASSETS/etcd" ]; then
  echo "$KUBEBUILDER_ASSETS"; exit 0
fi
if [ -x "$OUT/kube-apiserver" ] && [ -x "$OUT/etcd" ]; then echo "$OUT"; exit 0; fi

GO="${GO:-$(command -v go || true)}"
[ -n "$GO" ] || { [ -x /usr/local/go/bin/go ] && GO=/usr/local/go/bin/go; }
[ -n "$GO" ] || { [ -x /usr/lib/go/bin/go ] && GO=/usr/lib/go/bin/go; }
if [ -z "$GO" ]; then
  echo "kubehv: Go is needed to build kube-apiserver and etcd; installing Debian's golang-go" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq golang-go >/dev/null
  GO=$(command -v go)
fi
export GOSUMDB=off GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=local
mkdir -p "$OUT.tmp"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "kubehv: building etcd $ETCD_VERSION (one time, cached in $OUT)" >&2
mkdir -p "$WORK/etcd" && cd "$WORK/etcd"
cat > go.mod <<GOMOD
module kubehv.local/etcdbuild

go 1.22

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GOMOD
cat > tools.go <<'GOSRC'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GOSRC
"$GO" mod tidy >&2
"$GO" build -trimpath -ldflags "-s -w" -o "$OUT.tmp/etcd" go.etcd.io/etcd/server/v3 >&2

echo "kubehv: building kube-apiserver $K8S_VERSION (one time, ~10-20 min on 2 cores)" >&2
mkdir -p "$WORK/apiserver" && cd "$WORK/apiserver"
STAGING_VERSION="v0.${K8S_VERSION#v1.}"
"$GO" mod download -json "k8s.io/kubernetes@$K8S_VERSION" >/dev/null
MODFILE="$("$GO" env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$K8S_VERSION.mod"
{
  echo "module kubehv.local/apiserverbuild"; echo; echo "go 1.23"; echo
  echo "require k8s.io/kubernetes $K8S_VERSION"; echo
  grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging' "$MODFILE" | awk -v v="$STAGING_VERSION" '{print "replace " $1 " => " $1 " " v}'
} > go.mod
cat > tools.go <<'GOSRC'
//go:build tools

package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
GOSRC
"$GO" mod tidy >&2
MINOR="${K8S_VERSION#v1.}"; MINOR="${MINOR%%.*}"
LDF="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$MINOR -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
"$GO" build -trimpath -ldflags "$LDF" -o "$OUT.tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver >&2
rm -rf "$OUT"; mv "$OUT.tmp" "$OUT"
echo "$OUT"
