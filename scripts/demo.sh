#!/usr/bin/env bash
# The main job on one machine: the wset agent with its embedded defaults and
# real KVM guests with known working sets, shown live. Ctrl-C stops it.
# Usage: scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

step "checking prerequisites"
require_root "$@"
require_device /dev/userfaultfd "the agent tracks guest memory through userfaultfd"
install_packages "${WSET_TEST_PACKAGES[@]}"

step "building release binaries (the first build takes a few minutes)"
cargo build --release --locked --bins || fail "build failed (above)"

step "starting the demo"
exec target/release/wset-demo
