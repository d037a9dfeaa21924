#!/usr/bin/env bash
# The RWP kernel lane: boots Debian's newest 7.3+ kernel (CONFIG_USERFAULTFD_RWP=y)
# under QEMU (software emulation) with an initramfs holding the agent, the
# process guest and the lane's test binaries, runs them there, and reports
# each test's result here, in libtest's own format.
#
# Usage: scripts/kernel-lane.sh [TEST_FILTER...]   the RWP tests and shared scenarios
#        scripts/kernel-lane.sh --bench            the harvest-cost benchmark instead
# Environment: WSET_KERNEL_CACHE (default /var/cache/wset/kernel),
#   WSET_LANE_MEM_MIB (default 3072), WSET_LANE_TIMEOUT_S (default 1500).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

require_root "$@"
install_packages qemu-system-x86 busybox-static cpio "${WSET_TEST_PACKAGES[@]}"
command -v qemu-system-x86_64 >/dev/null || fail "qemu-system-x86_64 not found after installing qemu-system-x86"
[ -x /bin/busybox ] || fail "/bin/busybox not found after installing busybox-static"

kdir=$(scripts/fetch-kernel.sh) || fail "no RWP kernel to boot (above)"

# Test targets run inside the lane: the RWP tests and the scenarios shared
# with the host run; or the harvest benchmark.
lane_tests=(rwp scenarios)
kind=test
if [ "${1:-}" = --bench ]; then
  shift
  lane_tests=(harvest_cost)
  kind=bench
fi

step "building the agent, the process guest and the lane's tests (release)"
cargo build --release --locked -p wset-agent -p wset-guest --bins >&2 || fail "release build failed (above)"
test_args=()
for t in "${lane_tests[@]}"; do test_args+=(--"$kind" "$t"); done
profile=(--release)
[ "$kind" = bench ] && profile=()
built=$(cargo "$kind" "${profile[@]}" --locked -p wset-tests --features kernel-lane "${test_args[@]}" --no-run 2>&1) \
  || { echo "$built" >&2; fail "building the lane's tests failed (above)"; }
mapfile -t test_bins < <(echo "$built" | sed -nE 's/^ *Executable (tests|benches)\/[^ ]+ \((.*)\)$/\2/p')
[ ${#test_bins[@]} -eq ${#lane_tests[@]} ] \
  || { echo "$built" >&2; fail "expected ${#lane_tests[@]} lane test binaries, found ${#test_bins[@]}"; }

step "building the initramfs"
root=$(mktemp -d /tmp/wset-lane.XXXXXX)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,run,etc,wset/bin,wset/tests}
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
copy_with_libs() {
  local bin=$1 dest=$2
  objcopy --strip-debug "$bin" "$dest" || cp "$bin" "$dest"
  ldd "$bin" | grep -Eo '/[^ ]+' | while read -r lib; do
    [ -e "$root$lib" ] && continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}
copy_with_libs target/release/wset-agent "$root/wset/bin/wset-agent"
copy_with_libs target/release/wset-guest "$root/wset/bin/wset-guest"
for tb in "${test_bins[@]}"; do
  copy_with_libs "$tb" "$root/wset/tests/$(basename "$tb" | sed 's/-[0-9a-f]*$//')"
done
filter=""
for f in "$@"; do filter+=" $(printf '%q' "$f")"; done
cat >"$root/init" <<EOF
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
ip link set lo up
mkdir -p /var/lib/wset /dev/hugepages
mount -t hugetlbfs hugetlbfs /dev/hugepages
echo 1 > /proc/sys/vm/overcommit_memory
echo "WSET-LANE-KERNEL \$(uname -r)"
status=0
for t in ${lane_tests[*]}; do
  echo "WSET-LANE-RUN \$t"
  if [ $kind = bench ]; then
    WSET_BIN_DIR=/wset/bin /wset/tests/\$t || status=1
  else
    WSET_BIN_DIR=/wset/bin RUST_BACKTRACE=1 /wset/tests/\$t --test-threads=1 --nocapture $filter || status=1
  fi
done
echo "WSET-LANE-EXIT \$status"
poweroff -f
EOF
chmod +x "$root/init"
initrd=$(mktemp /tmp/wset-lane-initrd.XXXXXX)
trap 'rm -rf "$root" "$initrd"' EXIT
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$initrd" || fail "packing the initramfs failed"

mem=${WSET_LANE_MEM_MIB:-3072}
limit=${WSET_LANE_TIMEOUT_S:-1500}
step "booting $(cat "$kdir/version") under QEMU (software emulation, ${mem} MiB, 2 vCPUs; at most ${limit} s)"
log=$(mktemp /tmp/wset-lane-log.XXXXXX)
trap 'rm -rf "$root" "$initrd" "$log"' EXIT
set +e
timeout --kill-after=10 "$limit" qemu-system-x86_64 \
  -machine q35 -accel tcg,thread=multi -cpu max -smp 2 -m "$mem" \
  -kernel "$kdir/vmlinuz" -initrd "$initrd" \
  -append "console=ttyS0 rdinit=/init panic=-1 oops=panic loglevel=4 hugepages=64 transparent_hugepage=madvise" \
  -nographic -no-reboot -nic none </dev/null 2>&1 \
  | sed -u -e 's/\r//g' -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\x1bc//g' | tee "$log" \
  | grep -vE '^\[ *[0-9]+\.[0-9]+\] ' >&2
qemu_status=${PIPESTATUS[0]}
set -e
if ! grep -q 'WSET-LANE-KERNEL ' "$log"; then
  tail -40 "$log" >&2
  fail "the lane kernel did not reach the test runner (QEMU exit $qemu_status; the kernel's last lines above)"
fi
[ "$qemu_status" -ne 124 ] || fail "the lane timed out after ${limit} s (console above)"
exit_line=$(grep -Eo 'WSET-LANE-EXIT [0-9]+' "$log" | tail -1)
[ -n "$exit_line" ] || fail "the lane ended before its tests finished (QEMU exit $qemu_status; console above)"
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '^test result: .* [0-9]+ failed' "$log" | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
[ "$exit_line" = "WSET-LANE-EXIT 0" ] || fail "RWP lane tests failed on $(grep -Eo 'WSET-LANE-KERNEL [^ ]+' "$log" | cut -d' ' -f2): $passed passed, $failed failed (above)"
[ "$kind" = bench ] || [ "$passed" -gt 0 ] || fail "the lane ran no test"
step "RWP lane on $(grep -Eo 'WSET-LANE-KERNEL [^ ]+' "$log" | cut -d' ' -f2): $passed passed, $failed failed"
