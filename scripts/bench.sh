#!/usr/bin/env bash
# Runs every wset benchmark and prints its ratios against a baseline measured
# in the same run. Method and latest figures: BENCHMARKS.md.
# Usage: scripts/bench.sh   (WSET_BENCH_SECS, WSET_BENCH_ROUNDS tune the guest runs)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

step "checking prerequisites"
require_root "$@"
require_device /dev/userfaultfd "the benchmarks drive real userfaultfds"
require_device /dev/kvm "the guest-slowdown benchmark runs real KVM guests"
install_packages "${WSET_TEST_PACKAGES[@]}"

step "building release binaries"
cargo build --release --locked --workspace --bins || fail "build failed (above)"

step "fault path: tracker vs a minimal handler (about 2 minutes)"
cargo bench --locked -p wset-tracker --bench fault_path || fail "fault_path benchmark failed (above)"

step "guest slowdown: tracking on vs off (about 10 minutes)"
cargo bench --locked -p wset-tests --bench guest_slowdown || fail "guest_slowdown benchmark failed (above)"

step "controller history: ingest into sled and a day's query, vs bare sled (about 1 minute)"
cargo bench --locked -p wset-controller --bench history || fail "history benchmark failed (above)"

step "planner: a full plan for 1k, 10k and 50k hosts x 40 VMs (about 2 minutes)"
cargo bench --locked -p wset-controller --bench planner || fail "planner benchmark failed (above)"

step "overcommit policies on simulated traces: fixed ratio, average usage, wset (seconds)"
cargo bench --locked -p wset-controller --bench overcommit || fail "overcommit comparison failed (above)"

step "agent summary-stream fan-out: 0, 1, 8, 32 readers (about 3 minutes)"
cargo bench --locked -p wset-tests --bench stream_fanout || fail "stream_fanout benchmark failed (above)"

step "Firecracker restores: its own handlers vs wset on demand vs wset's learned prefetch (about 12 minutes)"
cargo bench --locked -p wset-tests --bench firecracker_restore || fail "firecracker_restore benchmark failed (above)"

step "controller replicas on etcd: hand-over after 20 leader kills, and three replicas' cost against one (about 4 minutes)"
cargo bench --locked -p wset-tests --bench replicas || fail "replicas benchmark failed (above)"

step "harvest cost on Linux 7.3: RWP vs WP_ASYNC, in the kernel lane (about 2 minutes)"
scripts/kernel-lane.sh --bench || fail "harvest_cost benchmark in the kernel lane failed (above)"
