#!/usr/bin/env bash
# Renders every kustomization under deploy/ (the base and each overlay) and
# validates the result against the Kubernetes schemas, strictly (an unknown
# or misspelt field fails). A deliberately broken copy must fail too, so the
# check cannot pass vacuously.
# Usage: scripts/validate-deploy.sh   (K8S_VERSION, default 1.30.0)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

version=${K8S_VERSION:-1.30.0}
command -v kubectl >/dev/null || install_packages kubernetes-client
command -v kubectl >/dev/null || fail "kubectl not found: it renders the kustomizations (apt-get install kubernetes-client)"
command -v python3 >/dev/null || install_packages python3 python3-pip
if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
  step "installing kubernetes-validate (Kubernetes schemas, from PyPI)"
  python3 -m pip install -q 'kubernetes-validate==1.37.0' >&2 \
    || fail "pip install kubernetes-validate failed (above): it validates deploy/ against the Kubernetes schemas"
fi
validate() { python3 -m kubernetes_validate "$@"; }

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
n=0
for k in deploy/base deploy/overlays/*; do
  name=$(echo "$k" | tr / -)
  kubectl kustomize "$k" > "$out/$name.yaml" || fail "kubectl kustomize $k failed (above)"
  validate --strict --quiet -k "$version" "$out/$name.yaml" \
    || fail "$k does not validate against Kubernetes $version (above)"
  echo "deploy: $k renders and validates against Kubernetes $version"
  n=$((n + 1))
done
sed 's/containerPort: 7070/containerPortt: 7070/' "$out/deploy-base.yaml" > "$out/broken.yaml"
if validate --strict --quiet -k "$version" "$out/broken.yaml" >/dev/null 2>&1; then
  fail "a misspelt field passed validation: the deploy check would not catch a typo"
fi
echo "deploy: $n kustomizations valid; a misspelt field is caught"
