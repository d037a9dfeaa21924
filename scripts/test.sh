#!/usr/bin/env bash
# Runs every wset test: formatting, lints, unit tests, real-kernel tests
# (userfaultfd, KVM), the API's lint and breaking-change checks
# (scripts/api.sh), the end-to-end tests, the RWP kernel lane (a Linux
# 7.3+ kernel booted under QEMU, scripts/kernel-lane.sh) and a short fuzzing
# run of every fuzz target (scripts/fuzz.sh). Installs what it
# needs as root.
# Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

step "checking prerequisites"
require_root "$@"
require_device /dev/userfaultfd "userfaultfd (CONFIG_USERFAULTFD) is needed by the tracker tests"
require_device /dev/kvm "KVM is needed by the KVM guest tests (enable virtualization or nested virtualization)"
install_packages "${WSET_TEST_PACKAGES[@]}"
# A real Prometheus (and promtool) scrapes and lints both metrics endpoints.
install_packages prometheus
require_grpcurl

step "cargo fmt --check"
cargo fmt --all -- --check || fail "formatting differs: run 'cargo fmt --all'"

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings || fail "clippy found problems (above)"

step "the wire: buf lint and buf breaking on wset.v1 (scripts/api.sh)"
scripts/api.sh || fail "the API checks failed (above)"

step "building release binaries for the end-to-end tests"
cargo build --workspace --release --locked --bins || fail "release build failed (above)"

step "the image recipe (scripts/image-rootfs.sh, what the Dockerfile runs)"
rootfs=$(mktemp -d)
scripts/image-rootfs.sh "$rootfs" || fail "the image recipe failed (above)"
for b in wset-agent wset-controller; do
  "$rootfs/usr/local/bin/$b" --version || fail "$b from the image recipe does not run"
done
rm -rf "$rootfs"

step "deploy/: kustomizations rendered and validated against the Kubernetes schemas"
scripts/validate-deploy.sh || fail "deploy/ validation failed (above)"

step "cargo test (unit, real-kernel, end-to-end; the integrity run takes about 2 minutes)"
log=$(mktemp)
set +e
WSET_BIN_DIR="$PWD/target/release" cargo test --workspace --locked --lib --bins --tests \
  -- --test-threads="${WSET_TEST_THREADS:-2}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
step "RWP kernel lane (Linux 7.3+ under QEMU: the RWP tests, then the same scenarios as above)"
scripts/kernel-lane.sh 2>&1 | tee -a "$log"
lane_status=${PIPESTATUS[0]}
[ "$lane_status" -eq 0 ] || status=$lane_status
step "fuzzing (scripts/fuzz.sh: each target ${WSET_FUZZ_SECS:-30} s from its corpus)"
scripts/fuzz.sh "${WSET_FUZZ_SECS:-30}" 2>&1 | tee -a "$log"
fuzz_status=${PIPESTATUS[0]}
[ "$fuzz_status" -eq 0 ] || status=$fuzz_status
set -e
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' "$log" | awk '{s+=$1} END {print s+0}')
rm -f "$log"
[ "$status" -eq 0 ] || fail "tests failed (above); $passed passed, $failed failed"
[ "$passed" -gt 0 ] || fail "no test ran"

step "all tests passed"
echo "wset: $passed passed, $failed failed"
