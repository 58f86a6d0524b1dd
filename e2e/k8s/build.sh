#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager, kubectl, kube-scheduler, kubelet,
# etcd and helm from the pinned Go modules in e2e/k8s/{kubernetes,etcd,helm} and
# cache them outside the work tree. Prints the bin directory as the LAST line of stdout:
#
#   BIN=$(e2e/k8s/build.sh | tail -1)
#
# Cache: ${CKPT_CACHE:-$HOME/.cache/ckpt}/k8s-bin/<key>/, where <key> hashes the
# go.mod/go.sum files, this script and the Go version; an unchanged checkout
# reuses it, a version bump rebuilds. The directory only appears once all seven
# binaries are built (temp dir + rename), so an interrupted build never looks done.
# Needs only Go (>= the go directive in the go.mod files) and the Go module proxy.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache_root=${CKPT_CACHE:-$HOME/.cache/ckpt}/k8s-bin
nice_level=${CKPT_BUILD_NICE:-10}

log() { echo "build.sh: $*" >&2; }

command -v go >/dev/null || { log "go not found in PATH"; exit 1; }

modver() { (cd "$here/$1" && go list -m -f '{{.Version}}' "$2"); }
k8s_version=$(modver kubernetes k8s.io/kubernetes)
etcd_version=$(modver etcd go.etcd.io/etcd/server/v3)
helm_version=$(modver helm helm.sh/helm/v3)
helm_client_go=$(modver helm k8s.io/client-go)

key_input() {
  go version
  for f in kubernetes/go.mod kubernetes/go.sum etcd/go.mod etcd/go.sum helm/go.mod helm/go.sum build.sh; do
    echo "== $f"
    cat "$here/$f"
  done
}
hash=$(key_input | sha256sum | cut -c1-16)
key=k8s-${k8s_version}-etcd-${etcd_version}-helm-${helm_version}-${hash}
bin=$cache_root/$key
binaries=(kube-apiserver kube-controller-manager kubectl kube-scheduler kubelet etcd helm)

complete() {
  local b
  for b in "${binaries[@]}"; do [[ -x $1/$b ]] || return 1; done
}

mkdir -p "$cache_root"
if complete "$bin"; then
  log "cached: $bin"
  echo "$bin"
  exit 0
fi

# Serialize concurrent builds of the same key; the second one just reuses the result.
exec 9>"$cache_root/.$key.lock"
flock 9
if complete "$bin"; then
  log "cached (built concurrently): $bin"
  echo "$bin"
  exit 0
fi

rm -rf "$cache_root/.tmp-$key".* # leftovers of an interrupted build (we hold the lock)
tmp=$(mktemp -d "$cache_root/.tmp-$key.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)

export CGO_ENABLED=0
gobuild() { nice -n "$nice_level" go build -trimpath "$@"; }

# Same tags and version stamping as upstream hack/lib/golang.sh + hack/lib/version.sh
# (without git commit / build date, which the module zip does not carry).
minor=${k8s_version#v1.}; minor=${minor%%.*}
k8s_ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
done
log "building kube-apiserver, kube-controller-manager, kubectl, kube-scheduler, kubelet $k8s_version"
(cd "$here/kubernetes" && gobuild -tags=selinux,notest,grpcnotrace -ldflags="all=$k8s_ldflags" -o "$tmp/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet)

# etcd's version string is a constant in go.etcd.io/etcd/api/v3/version.
log "kubernetes binaries done at +$(( $(date +%s) - start ))s"
log "building etcd $etcd_version"
(cd "$here/etcd" && gobuild -ldflags="-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3)

# As helm's Makefile: release version, and the default Kubernetes version that
# `helm template`/`helm lint` assume comes from the client-go it was built with.
helm_minor=${helm_client_go#v0.}; helm_minor=${helm_minor%%.*}
helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  helm_ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$helm_minor"
done
log "etcd done at +$(( $(date +%s) - start ))s"
log "building helm $helm_version"
(cd "$here/helm" && gobuild -ldflags="$helm_ldflags" -o "$tmp/helm" helm.sh/helm/v3/cmd/helm)

complete "$tmp" || { log "missing binaries in $tmp"; exit 1; }
{
  echo "kubernetes $k8s_version"
  echo "etcd $etcd_version"
  echo "helm $helm_version"
  go version
} >"$tmp/VERSIONS"
chmod 755 "$tmp"
mv -T "$tmp" "$bin"
trap - EXIT
log "built $key in $(( $(date +%s) - start ))s"
echo "$bin"
