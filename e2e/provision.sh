#!/usr/bin/env bash
# Installs what the test bed needs on a Debian bookworm machine and builds kube-apiserver and
# kube-controller-manager from Debian's `kubernetes` source package, once, into a cache outside the
# repository keyed by the source version. Safe to run again: a warm cache returns in well under a second.
#
# Output: the cache directory holding bin/kube-apiserver and bin/kube-controller-manager, on stdout (last line).
# Every failure ends with one line starting "provision: " that says why.
set -euo pipefail

K8S_SRC_VERSION="${K8S_SRC_VERSION:-1.20.5+really1.20.2-1.1+deb12u1}"
K8S_GIT_VERSION="v1.20.2"
CACHE_ROOT="${PROPELLER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/propeller-operator}"
CACHE="$CACHE_ROOT/k8s-${K8S_SRC_VERSION//[^A-Za-z0-9.]/_}"
APT_TIMEOUT="${APT_TIMEOUT:-600}"

die() { echo "provision: $*" >&2; exit 1; }
log() { echo "provision: $*" >&2; }

need_pkgs=(etcd-server golang-go mosquitto mosquitto-clients openssl
           golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev
           curl ca-certificates dpkg-dev
           clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32)

missing=()
for p in "${need_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing Debian packages (${missing[*]}) and not root: install them with apt-get"
  log "installing ${missing[*]}"
  # Bounded so an unreachable archive ends with a reason instead of a hang.
  timeout "$APT_TIMEOUT" apt-get -o Acquire::Retries=2 -o Acquire::http::Timeout=30 update -qq >/dev/null 2>&1 \
    || die "apt-get update failed or timed out: is Debian's package archive reachable?"
  # mosquitto's package starts a system broker on port 1883; the test bed runs its own, so keep it off.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive timeout "$APT_TIMEOUT" apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null 2>&1 \
    || { rm -f /usr/sbin/policy-rc.d; die "apt-get install ${missing[*]} failed or timed out"; }
  rm -f /usr/sbin/policy-rc.d
fi

if [ -x "$CACHE/bin/kube-apiserver" ] && [ -x "$CACHE/bin/kube-controller-manager" ]; then
  echo "$CACHE"; exit 0
fi

mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.build.lock"
flock 9   # a second run waits for the first build instead of racing it
if [ -x "$CACHE/bin/kube-apiserver" ] && [ -x "$CACHE/bin/kube-controller-manager" ]; then
  echo "$CACHE"; exit 0
fi

WORK="$CACHE_ROOT/build-$$"
rm -rf "$WORK"; mkdir -p "$WORK/apt/lists/partial" "$WORK/src"
trap 'rm -rf "$WORK"' EXIT

# A private sources list keeps the system's apt configuration untouched.
echo "deb-src http://deb.debian.org/debian bookworm main" > "$WORK/apt/sources.list"
APT_OPTS=(-o "Dir::Etc::SourceList=$WORK/apt/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
          -o "Dir::State::Lists=$WORK/apt/lists" -o Acquire::Retries=2 -o Acquire::http::Timeout=30)
log "fetching the kubernetes $K8S_SRC_VERSION source package"
timeout "$APT_TIMEOUT" apt-get "${APT_OPTS[@]}" update -qq >/dev/null 2>&1 \
  || die "could not read Debian's source index (deb-src bookworm): archive unreachable?"
( cd "$WORK/src" && timeout "$APT_TIMEOUT" apt-get "${APT_OPTS[@]}" source --download-only -qq \
    "kubernetes=$K8S_SRC_VERSION" >/dev/null 2>&1 ) \
  || die "apt-get source kubernetes=$K8S_SRC_VERSION failed (version gone from the archive?)"
orig=$(ls "$WORK"/src/kubernetes_*.orig.tar.* 2>/dev/null | head -n1)
[ -n "$orig" ] || die "no orig tarball in the kubernetes source package"
mkdir -p "$WORK/tree"
tar -xf "$orig" -C "$WORK/tree" --strip-components=1 || die "could not unpack $orig"
TREE="$WORK/tree"

# Kubernetes 1.20 vendors reflect2 1.0.1, which crashes kube-apiserver on Go >= 1.18 at the first custom
# resource request; Debian ships the fixed reflect2 and json-iterator.
for pkg in github.com/modern-go/reflect2 github.com/json-iterator/go; do
  [ -d "/usr/share/gocode/src/$pkg" ] || die "/usr/share/gocode/src/$pkg missing (Debian golang dev package)"
  rm -rf "$TREE/vendor/$pkg"; cp -r "/usr/share/gocode/src/$pkg" "$TREE/vendor/$pkg"
done

# Module mode refuses the tree; GOPATH mode builds it.
export GOPATH="$WORK/gopath" GO111MODULE=off CGO_ENABLED=0 GOFLAGS= GOCACHE="$CACHE_ROOT/go-build-cache"
mkdir -p "$GOPATH/src/k8s.io"
ln -s "$TREE" "$GOPATH/src/k8s.io/kubernetes"
cd "$GOPATH/src/k8s.io/kubernetes"

log "generating the OpenAPI definitions"
go build -o "$WORK/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen \
  || die "building openapi-gen failed"
inputs=$(grep -Rl --include='*.go' -e '+k8s:openapi-gen=' pkg cmd vendor 2>/dev/null \
  | xargs -r -n1 dirname | sort -u \
  | grep -v -e '^vendor/k8s.io/code-generator/' -e '^vendor/k8s.io/sample-apiserver/' \
  | sed 's#^vendor/##; s#^\(pkg\|cmd\)/#k8s.io/kubernetes/\1/#' | paste -sd, -)
[ -n "$inputs" ] || die "found no packages tagged for openapi-gen"
"$WORK/openapi-gen" --input-dirs "$inputs" -p k8s.io/kubernetes/pkg/generated/openapi \
  -O zz_generated.openapi -h hack/boilerplate/boilerplate.generatego.txt -r "$WORK/openapi-report.txt" \
  >/dev/null 2>"$WORK/openapi-gen.log" || { tail -5 "$WORK/openapi-gen.log" >&2; die "openapi-gen failed"; }

V=k8s.io/kubernetes/vendor/k8s.io/component-base/version
LDFLAGS="-s -w -X $V.gitMajor=1 -X $V.gitMinor=20 -X $V.gitVersion=$K8S_GIT_VERSION -X $V.gitTreeState=clean"
mkdir -p "$WORK/bin"
for cmd in kube-apiserver kube-controller-manager; do
  log "building $cmd (minutes on a cold cache)"
  go build -ldflags "$LDFLAGS" -o "$WORK/bin/$cmd" "./cmd/$cmd" 2>"$WORK/$cmd.log" \
    || { tail -20 "$WORK/$cmd.log" >&2; die "building $cmd failed"; }
done
mkdir -p "$CACHE"
mv "$WORK/bin" "$CACHE/bin.tmp" && mv "$CACHE/bin.tmp" "$CACHE/bin"
echo "$CACHE"
