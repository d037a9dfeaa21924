#!/usr/bin/env bash
# Renders every kustomization under deploy/ (the base and each overlay) and
# validates the result against the Kubernetes schemas, strictly (an unknown
# or misspelt field fails), and kube-scheduler's configuration for the
# extender against its own schema. A deliberately broken copy must fail too, so the
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

# kube-scheduler's configuration for the extender is not an API object (no
# Kubernetes schema has it): it is checked against the schema written from
# k8s.io/kube-scheduler/config/v1's types, as strictly, broken copy and all.
sched_validate() {
  python3 - "$1" <<'PY'
import json, sys, yaml, jsonschema
schema = json.load(open("deploy/schemas/kubescheduler.config.k8s.io-v1.json"))
doc = yaml.safe_load(open(sys.argv[1]))
errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
for e in errors:
    print(f"{sys.argv[1]}: {'/'.join(map(str, e.path)) or '(top)'}: {e.message}", file=sys.stderr)
sys.exit(1 if errors else 0)
PY
}
config=deploy/kube-scheduler/kube-scheduler-config.yaml
sched_validate "$config" || fail "$config does not validate against its schema (above)"
sed 's/filterVerb: filter/filterVerbb: filter/' "$config" > "$out/broken-scheduler.yaml"
if sched_validate "$out/broken-scheduler.yaml" 2>/dev/null; then
  fail "a misspelt extender field passed validation: the kube-scheduler configuration check would not catch a typo"
fi
echo "deploy: $config valid against kubescheduler.config.k8s.io/v1; a misspelt field is caught"
