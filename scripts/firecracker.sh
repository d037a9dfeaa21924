#!/usr/bin/env bash
# Finds the real Firecracker the tests and benchmarks run: the VMM (v1.16.1),
# Firecracker's two example page-fault handlers and the memloop guest kernel,
# and prints them as KEY=PATH lines (FIRECRACKER, ON_DEMAND_HANDLER,
# FAULT_ALL_HANDLER, KERNEL) and ORIGIN=<where the VMM came from>.
#
# The VMM is the official v1.16.1 release where the network allows (fetched
# once into the cache and checked against the release's SHA256SUMS), else the
# bundle's own build of the same tag. The handlers and the guest kernel come
# only with the bundle (the release has neither): $WSET_FIRECRACKER_DIR, else
# ../shared/firecracker beside this checkout, else /work/shared/firecracker.
# Environment: WSET_FIRECRACKER_DIR, WSET_FIRECRACKER_CACHE (default
# /var/cache/wset/firecracker), WSET_FIRECRACKER_OFFLINE=1 (no download).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

version=v1.16.1
arch=x86_64

bundle=""
for d in "${WSET_FIRECRACKER_DIR:-}" "$PWD/../shared/firecracker" /work/shared/firecracker; do
  [ -n "$d" ] && [ -x "$d/bin/firecracker" ] && { bundle=$(cd "$d" && pwd); break; }
done
[ -n "$bundle" ] || fail "no Firecracker bundle: set WSET_FIRECRACKER_DIR to a directory holding \
bin/firecracker, bin/uffd_on_demand_handler, bin/uffd_fault_all_handler and \
guest/vmlinux-memloop (looked in \$WSET_FIRECRACKER_DIR, $PWD/../shared/firecracker and /work/shared/firecracker)"
for f in bin/uffd_on_demand_handler bin/uffd_fault_all_handler guest/vmlinux-memloop; do
  [ -r "$bundle/$f" ] || fail "the Firecracker bundle $bundle lacks $f"
done

vmm="$bundle/bin/firecracker"
origin="bundle $bundle (built from tag $version)"
cache=${WSET_FIRECRACKER_CACHE:-/var/cache/wset/firecracker}
released="$cache/$version/firecracker-$version-$arch"
if [ -x "$released" ]; then
  vmm=$released
  origin="official release $version (cached in $cache)"
elif [ "${WSET_FIRECRACKER_OFFLINE:-0}" != 1 ] && command -v curl >/dev/null; then
  url="https://github.com/firecracker-microvm/firecracker/releases/download/$version"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  if curl -fsSL --connect-timeout 10 --max-time 120 -o "$tmp/fc.tgz" "$url/firecracker-$version-$arch.tgz" 2>/dev/null \
    && curl -fsSL --connect-timeout 10 --max-time 30 -o "$tmp/fc.tgz.sha256.txt" "$url/firecracker-$version-$arch.tgz.sha256.txt" 2>/dev/null; then
    (cd "$tmp" && sha256sum -c --status fc.tgz.sha256.txt) || fail "the downloaded Firecracker $version release does not match its published SHA256"
    tar -xzf "$tmp/fc.tgz" -C "$tmp"
    mkdir -p "$cache/$version"
    install -m 0755 "$tmp/release-$version-$arch/firecracker-$version-$arch" "$released"
    vmm=$released
    origin="official release $version (downloaded into $cache)"
  else
    echo "firecracker.sh: the $version release could not be downloaded here; using the bundle's build of the same tag" >&2
  fi
fi

got=$("$vmm" --version 2>/dev/null | head -n 1) || fail "$vmm does not run"
case "$got" in
  *"${version#v}"*) ;;
  *) fail "$vmm is not Firecracker $version (it says: $got)" ;;
esac

echo "FIRECRACKER=$vmm"
echo "ON_DEMAND_HANDLER=$bundle/bin/uffd_on_demand_handler"
echo "FAULT_ALL_HANDLER=$bundle/bin/uffd_fault_all_handler"
echo "KERNEL=$bundle/guest/vmlinux-memloop"
echo "ORIGIN=$origin"
