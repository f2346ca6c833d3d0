#!/usr/bin/env bash
# Obtains every real component the cluster and e2e test tiers start, and caches
# it outside the repository, keyed by version, so a warm machine skips all of it:
#   kube-apiserver, kube-controller-manager,
#   kube-scheduler, kubectl                           (k8s.io/kubernetes, Go module)
#   etcd                                              (go.etcd.io/etcd/server/v3)
#   kwok                                              (sigs.k8s.io/kwok)
#   helm                                              (helm.sh/helm/v3)
#   minio                                             (github.com/minio/minio)
#   prometheus-operator and its CRDs                  (github.com/prometheus-operator/...)
#   prometheus, promtool, chromium                    (Debian packages)
#   checkov                                           (PyPI, in a virtualenv of its own)
# Prints progress, names every tool it could not obtain, and exits non-zero then.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${SECTUNE_CACHE:-$HOME/.cache/sectune}
bin="$cache/bin"
mkdir -p "$bin"

KUBERNETES_VERSION=v1.37.2
ETCD_VERSION=v3.7.3
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.22.0
MINIO_VERSION=v0.0.0-20260212201848-7aac2a2c5b7c   # RELEASE.2026-02-12T20-18-48Z
PROMETHEUS_OPERATOR_VERSION=v0.88.0
CHECKOV_VERSION=3.3.30

export GOTOOLCHAIN=auto GOFLAGS=-trimpath CGO_ENABLED=0
ldflags="-s -w"
missing=()

step() { printf '[test-env] %s\n' "$*"; }

# build NAME VERSION DIR PACKAGE [LDFLAGS]: build PACKAGE inside module DIR into bin/NAME-VERSION.
build_in_module() {
  local name=$1 version=$2 dir=$3 pkg=$4 extra=${5:-} out="$bin/$1-$2"
  if [[ -x $out ]]; then step "$name $version cached"; return; fi
  step "building $name $version (first time only, minutes)"
  local start=$SECONDS
  if (cd "$dir" && go build -ldflags "$ldflags $extra" -o "$out.tmp" "$pkg") >"$cache/build-$name.log" 2>&1; then
    mv "$out.tmp" "$out"; step "built $name in $((SECONDS - start)) s"
  else
    tail -20 "$cache/build-$name.log"; missing+=("$name"); return
  fi
}

# install NAME VERSION MODULE/PATH: go install a module without replace directives.
install_module() {
  local name=$1 version=$2 pkg=$3 out="$bin/$1-$2"
  if [[ -x $out ]]; then step "$name $version cached"; return; fi
  step "building $name $version (first time only, minutes)"
  local start=$SECONDS gobin="$cache/gobin-$name"
  if GOBIN=$gobin go install -ldflags "$ldflags" "$pkg@$version" >"$cache/build-$name.log" 2>&1; then
    mv "$gobin/$(basename "${pkg%%/v[0-9]}")" "$out" 2>/dev/null || mv "$gobin"/* "$out"
    rm -rf "$gobin"; step "built $name in $((SECONDS - start)) s"
  else
    tail -20 "$cache/build-$name.log"; missing+=("$name")
  fi
}

# Stamped with their version, as released binaries are: the API server then reports v1.37.2
# (not v0.0.0-master) and `helm install` checks the chart's kubeVersion against it.
k8s_minor=${KUBERNETES_VERSION#v1.}; k8s_minor=${k8s_minor%%.*}
k8s_stamp=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_stamp+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor"
done
K8S_BUILD=$KUBERNETES_VERSION-stamped
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  build_in_module "$cmd" "$K8S_BUILD" "$here/toolchain/kubernetes" "k8s.io/kubernetes/cmd/$cmd" "$k8s_stamp"
done
build_in_module etcd "$ETCD_VERSION" "$here/toolchain/etcd" go.etcd.io/etcd/server/v3
install_module kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok
install_module helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm
install_module minio "$MINIO_VERSION" github.com/minio/minio
build_in_module prometheus-operator "$PROMETHEUS_OPERATOR_VERSION" "$here/toolchain/prometheus-operator" \
  github.com/prometheus-operator/prometheus-operator/cmd/operator
# Its CRDs (ServiceMonitor, PodMonitor, Prometheus, …), from the same module.
po_crds="$bin/prometheus-operator-crds-$PROMETHEUS_OPERATOR_VERSION"
if [[ ! -d $po_crds ]]; then
  po_src=$(cd "$here/toolchain/prometheus-operator" && go list -m -f '{{.Dir}}' github.com/prometheus-operator/prometheus-operator 2>/dev/null)
  if [[ -n $po_src && -d $po_src/example/prometheus-operator-crd ]]; then
    cp -r "$po_src/example/prometheus-operator-crd" "$po_crds.tmp" && chmod -R u+w "$po_crds.tmp" && mv "$po_crds.tmp" "$po_crds"
  else
    missing+=(prometheus-operator-crds)
  fi
fi

# Prometheus, promtool and Chromium (renders report.html in the tests) from Debian.
debian_packages=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || debian_packages+=(prometheus)
command -v chromium >/dev/null || debian_packages+=(chromium fonts-dejavu-core)
if ((${#debian_packages[@]})); then
  step "installing from Debian: ${debian_packages[*]}"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${debian_packages[@]}"; } >"$cache/apt.log" 2>&1; then
    tail -20 "$cache/apt.log"
  fi
fi
for cmd in prometheus promtool chromium; do
  if command -v "$cmd" >/dev/null; then step "$cmd present"; else missing+=("$cmd"); fi
done

# checkov (Kubernetes best-practice checks on the rendered chart and the operator's children):
# its own virtualenv, so its pins never meet the project's.
checkov_env="$cache/checkov-$CHECKOV_VERSION"
if [[ -x $checkov_env/bin/checkov ]]; then
  step "checkov $CHECKOV_VERSION cached"
else
  step "installing checkov $CHECKOV_VERSION (first time only)"
  if { python3 -m venv "$checkov_env" && "$checkov_env/bin/pip" install -q "checkov==$CHECKOV_VERSION"; } >"$cache/build-checkov.log" 2>&1; then
    step "installed checkov"
  else
    tail -20 "$cache/build-checkov.log"; missing+=(checkov)
  fi
fi

# Stable names for the fixtures: bin/current/<tool> -> the pinned version.
mkdir -p "$bin/current"
for tool in kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok helm minio prometheus-operator; do
  case $tool in
    kube-*|kubectl) v=$K8S_BUILD ;; etcd) v=$ETCD_VERSION ;; kwok) v=$KWOK_VERSION ;;
    helm) v=$HELM_VERSION ;; minio) v=$MINIO_VERSION ;;
    prometheus-operator) v=$PROMETHEUS_OPERATOR_VERSION ;;
  esac
  [[ -x "$bin/$tool-$v" ]] && ln -sf "$bin/$tool-$v" "$bin/current/$tool"
done
[[ -d $po_crds ]] && ln -sfn "$po_crds" "$bin/current/prometheus-operator-crds"
[[ -x $checkov_env/bin/checkov ]] && ln -sf "$checkov_env/bin/checkov" "$bin/current/checkov"

if ((${#missing[@]})); then
  step "could not obtain: ${missing[*]} (see $cache/build-*.log)"
  exit 1
fi
step "all tools ready in $bin/current"
