#!/usr/bin/env bash
# Fuzzes wset's parsers of untrusted input for a short while each, with
# cargo fuzz (libFuzzer, coverage-guided): the VMM handshake, the
# userfaultfd message decoder and what the tracker does with a message,
# the gRPC requests and agent summaries the servers validate, and the
# controller's history block codec (what a damaged store hands it). Each
# target starts from its corpus in fuzz/corpus (read only: new inputs go
# to a scratch directory) and any crash, panic or timeout fails the run,
# naming the input and how to replay it.
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 30)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

install_packages "${WSET_TEST_PACKAGES[@]}"
secs=${1:-30}
targets=(handshake uffd_msg grpc_requests history_blocks)

# The instrumentation flags cargo fuzz passes need a nightly compiler; where
# there is none, the stable one accepts them with RUSTC_BOOTSTRAP.
if rustup run nightly rustc --version >/dev/null 2>&1; then
  toolchain=nightly
else
  toolchain=stable
  export RUSTC_BOOTSTRAP=1
fi
require_cargo_fuzz

# The fuzz workspace has a lock file of its own: a dependency the main
# workspace gained must be in it too, or the build would change it.
(cd fuzz && cargo fetch --locked --target "$(rustc -vV | sed -n "s/^host: //p")" -q) \
  || fail "fuzz/Cargo.lock is out of date with the workspace (above): run 'cargo update --workspace' in fuzz/ and commit it"

step "building the fuzz targets (${toolchain} toolchain)"
cargo "+$toolchain" fuzz build --fuzz-dir fuzz --sanitizer none >&2 \
  || fail "building the fuzz targets failed (above)"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for t in "${targets[@]}"; do
  step "fuzzing $t for ${secs} s (corpus fuzz/corpus/$t)"
  mkdir -p "$work/$t" "$work/artifacts"
  # libFuzzer's progress lines (new coverage, reductions) are left out;
  # everything else, a failure's report above all, is shown.
  set +e
  cargo "+$toolchain" fuzz run --fuzz-dir fuzz --sanitizer none "$t" "$work/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$work/artifacts/$t-" -print_final_stats=1 2>&1 \
    | grep -Ev '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse|INITED)|^[[:space:]]+NEW_FUNC' >&2
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -ne 0 ]; then
    kept=fuzz/artifacts/$t
    mkdir -p "$kept"
    cp "$work"/artifacts/"$t"-* "$kept"/ 2>/dev/null || true
    fail "fuzz target $t failed on an input kept in $kept/ (above); replay it with: cargo +$toolchain fuzz run --fuzz-dir fuzz -s none $t $kept/<file>"
  fi
  echo "fuzz: $t: $(ls "$work/$t" | wc -l) new inputs beyond the corpus, no failure" >&2
done
