#!/usr/bin/env bash
# Builds kube-apiserver and etcd from the Go module proxy, once, into a cache outside the clone.
#
# Why: no Debian or PyPI package ships kube-apiserver, Debian's etcd (3.4) is too old, and no
# Docker engine runs here. The Go module proxy does ship the sources, so a tiny throw-away Go
# module that requires k8s.io/kubernetes (with replace lines for its staging modules) builds the
# real binaries. Output: $KUBEHV_CACHE/controlplane/<key>/{kube-apiserver,etcd}; prints that dir.
# kubectl of the same version is built there too when none is on PATH (Debian 12 ships none
# recent: its kubernetes-client is 1.20); `make demo` appends that dir to PATH.
# Honours KUBEBUILDER_ASSETS first: if it holds both binaries, nothing is built.
# `build.sh --node`: the real node's binaries instead (kubelet, kube-controller-manager,
# kube-scheduler, kube-proxy of the same version, plus a tiny static `pause` for containerd's
# sandbox image) into $KUBEHV_CACHE/node/k8s-<version>/; prints that dir. KUBEBUILDER_ASSETS
# is honoured the same way (used when it holds all four). About 4 min on top of the
# apiserver's Go build cache.
# Go: k8s 1.32 needs Go >= 1.23; an older go (Debian 12's golang-go is 1.19) only fetches the
# pinned toolchain from the Go module proxy (the module golang.org/toolchain, as `go` itself
# does), cached in $KUBEHV_CACHE/go/.
set -euo pipefail
K8S_VERSION="${KUBEHV_K8S_VERSION:-v1.32.4}"
ETCD_VERSION="${KUBEHV_ETCD_VERSION:-v3.5.17}"
CACHE="${KUBEHV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubehv}"
OUT="$CACHE/controlplane/k8s-${K8S_VERSION}-etcd-${ETCD_VERSION}"
NODE_MODE=0; [ "${1:-}" = "--node" ] && NODE_MODE=1
NODE_CMDS=(kubelet kube-controller-manager kube-scheduler kube-proxy)
NODE_OUT="$CACHE/node/k8s-${K8S_VERSION}"
has_all() { local d="$1"; shift; for b in "$@"; do [ -x "$d/$b" ] || return 1; done; }
if [ "$NODE_MODE" = 1 ]; then
  if [ -n "${KUBEBUILDER_ASSETS:-}" ] && has_all "$KUBEBUILDER_ASSETS" "${NODE_CMDS[@]}" pause; then
    echo "$KUBEBUILDER_ASSETS"; exit 0
  fi
  if has_all "$NODE_OUT" "${NODE_CMDS[@]}" pause; then echo "$NODE_OUT"; exit 0; fi
fi

if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/kube-apiserver" ] && [ -x "$KUBEBUILDER_ASSETS/etcd" ]; then
  echo "$KUBEBUILDER_ASSETS"; exit 0
fi
have() { [ -x "$OUT/$1" ]; }
want_kubectl() { ! command -v kubectl >/dev/null 2>&1 && ! have kubectl; }
if [ "$NODE_MODE" = 0 ] && have kube-apiserver && have etcd && ! want_kubectl; then echo "$OUT"; exit 0; fi

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

GO_MIN="1.23"                                      # what k8s 1.32's go.mod asks for
GO_PINNED="${KUBEHV_GO_TOOLCHAIN:-go1.23.12}"      # fetched only when the go found is older
gover="$("$GO" env GOVERSION 2>/dev/null || true)"; gover="${gover#go}"
if [ "$(printf '%s\n%s\n' "$GO_MIN" "${gover:-0}" | sort -V | head -1)" != "$GO_MIN" ]; then
  TC="$CACHE/go/$GO_PINNED"
  if [ ! -x "$TC/bin/go" ]; then
    echo "kubehv: go ${gover:-?} is older than $GO_MIN; fetching $GO_PINNED from the Go module proxy" >&2
    mod="golang.org/toolchain@v0.0.1-$GO_PINNED.$("$GO" env GOOS)-$("$GO" env GOARCH)"
    dir="$(cd / && "$GO" mod download -json "$mod" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
    [ -x "$dir/bin/go" ] || [ -f "$dir/bin/go" ] || { echo "kubehv: $mod did not download" >&2; exit 1; }
    rm -rf "$TC.tmp"; mkdir -p "$(dirname "$TC")"
    cp -r "$dir" "$TC.tmp"; chmod -R u+w "$TC.tmp"
    # Module zips carry no executable bits (the go command restores them the same way).
    chmod +x "$TC.tmp"/bin/* "$TC.tmp"/pkg/tool/*/*
    rm -rf "$TC"; mv "$TC.tmp" "$TC"
  fi
  GO="$TC/bin/go"
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# apiserver_module DIR: a module in DIR requiring k8s.io/kubernetes with its staging replaces.
apiserver_module() {
  mkdir -p "$1" && cd "$1"
  local staging="v0.${K8S_VERSION#v1.}" modfile
  "$GO" mod download -json "k8s.io/kubernetes@$K8S_VERSION" >/dev/null
  modfile="$("$GO" env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$K8S_VERSION.mod"
  {
    echo "module kubehv.local/apiserverbuild"; echo; echo "go 1.23"; echo
    echo "require k8s.io/kubernetes $K8S_VERSION"; echo
    grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging' "$modfile" | awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}'
  } > go.mod
  { echo '//go:build tools'; echo; echo 'package tools'; echo
    for cmd in "${CMDS[@]}"; do echo "import _ \"k8s.io/kubernetes/cmd/$cmd\""; done; } > tools.go
  "$GO" mod tidy >&2
}
MINOR="${K8S_VERSION#v1.}"; MINOR="${MINOR%%.*}"
LDF="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$MINOR -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$MINOR"

if [ "$NODE_MODE" = 1 ]; then
  rm -rf "$NODE_OUT.tmp"; mkdir -p "$NODE_OUT.tmp"
  # pause: PID 1 of every pod sandbox; sleeps, reaps orphans, exits on TERM/INT.
  mkdir -p "$WORK/pause" && cd "$WORK/pause"
  printf 'module kubehv.local/pause\n\ngo 1.22\n' > go.mod
  cat > main.go <<'GOSRC'
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var ws syscall.WaitStatus
			if pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil); pid <= 0 || err != nil {
				break
			}
		}
	}
}
GOSRC
  "$GO" build -trimpath -ldflags "-s -w" -o "$NODE_OUT.tmp/pause" . >&2
  echo "kubehv: building ${NODE_CMDS[*]} $K8S_VERSION (one time, about 4 min on 2 cores on top of the apiserver build)" >&2
  CMDS=("${NODE_CMDS[@]}"); apiserver_module "$WORK/node"
  "$GO" build -trimpath -ldflags "$LDF" -o "$NODE_OUT.tmp/" "${CMDS[@]/#/k8s.io/kubernetes/cmd/}" >&2
  rm -rf "$NODE_OUT"; mv "$NODE_OUT.tmp" "$NODE_OUT"
  echo "$NODE_OUT"; exit 0
fi

if have kube-apiserver && have etcd; then
  # An earlier build made before kubectl was built here, and no kubectl on PATH: add it.
  echo "kubehv: building kubectl $K8S_VERSION (one time, cached in $OUT)" >&2
  CMDS=(kubectl); apiserver_module "$WORK/apiserver"
  "$GO" build -trimpath -ldflags "$LDF" -o "$OUT/kubectl.tmp" k8s.io/kubernetes/cmd/kubectl >&2
  mv "$OUT/kubectl.tmp" "$OUT/kubectl"
  echo "$OUT"; exit 0
fi

rm -rf "$OUT.tmp"; mkdir -p "$OUT.tmp"
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

CMDS=(kube-apiserver); want_kubectl && CMDS+=(kubectl)
echo "kubehv: building ${CMDS[*]} $K8S_VERSION (one time, about 3-5 min on 2 cores)" >&2
apiserver_module "$WORK/apiserver"
"$GO" build -trimpath -ldflags "$LDF" -o "$OUT.tmp/" "${CMDS[@]/#/k8s.io/kubernetes/cmd/}" >&2
rm -rf "$OUT"; mv "$OUT.tmp" "$OUT"
echo "$OUT"
