#!/usr/bin/env bash
# Fetches the newest Debian 7.3+ "cloud" kernel whose config has
# CONFIG_USERFAULTFD_RWP=y, without touching the machine's apt setup: a
# separate sources list (sid + experimental, from the machine's own Debian
# mirror) and a separate state directory under the cache.
#
# Usage: scripts/fetch-kernel.sh [CACHE_DIR]
# Prints the kernel directory (holding vmlinuz, config and version) on stdout.
# A kernel already in the cache is reused; WSET_KERNEL_REFRESH=1 looks again.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

cache=${1:-${WSET_KERNEL_CACHE:-/var/cache/wset/kernel}}
mkdir -p "$cache" || fail "cannot create the kernel cache $cache"

have_kernel() {
  [ -s "$cache/current/vmlinuz" ] && [ -s "$cache/current/config" ] \
    && grep -q '^CONFIG_USERFAULTFD_RWP=y' "$cache/current/config"
}
if [ "${WSET_KERNEL_REFRESH:-0}" != 1 ] && have_kernel; then
  step "using cached kernel $(cat "$cache/current/version") ($cache/current)"
  echo "$cache/current"
  exit 0
fi

# The machine's own Debian mirror, so a site mirror keeps working.
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
if [ -z "$mirror" ]; then
  mirror=$(awk '$1=="deb" && $0 ~ /debian/ && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}

apt_dir="$cache/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial"
cat >"$apt_dir/sources.list" <<EOF
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror experimental main
EOF
apt_opts=(
  -o "Dir::Etc::SourceList=$apt_dir/sources.list"
  -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::State::Lists=$apt_dir/lists"
  -o "Dir::Cache::Archives=$apt_dir/archives"
  -o "Dir::Cache::pkgcache=$apt_dir/pkgcache.bin"
  -o "Dir::Cache::srcpkgcache=$apt_dir/srcpkgcache.bin"
  -o "APT::Get::List-Cleanup=0"
  -o "APT::Sandbox::User=root"
)

step "reading Debian sid and experimental package lists from $mirror (separate apt state in $apt_dir)"
apt-get "${apt_opts[@]}" -q update >&2 \
  || fail "apt-get update of sid/experimental from $mirror failed (above): the RWP kernel lane needs Debian's archive"

# Newest first: every linux-binary-7.N*-cloud-amd64 with N >= 3 (or 8+).
mapfile -t candidates < <(
  apt-cache "${apt_opts[@]}" pkgnames linux-binary- 2>/dev/null \
    | grep -E '^linux-binary-([7-9]|[1-9][0-9])\.[0-9]+[^ ]*-cloud-amd64$' \
    | awk -F'[-.]' '{ if ($3 > 7 || ($3 == 7 && $4 >= 3)) print }' \
    | sort -V -r
)
[ ${#candidates[@]} -gt 0 ] || fail "no linux-binary-7.3+-cloud-amd64 package in Debian sid or experimental: the RWP kernel lane has no kernel to boot"

work="$cache/work"
for pkg in "${candidates[@]}"; do
  flavour=${pkg#linux-binary-}
  step "downloading $pkg and linux-base-$flavour"
  rm -rf "$work" && mkdir -p "$work/deb" "$work/root"
  (cd "$work/deb" && apt-get "${apt_opts[@]}" -q download "$pkg" "linux-base-$flavour" >&2) || {
    echo "wset: could not download $pkg; trying an older one" >&2
    continue
  }
  for deb in "$work"/deb/*.deb; do dpkg -x "$deb" "$work/root"; done
  vmlinuz=$(find "$work/root" -name vmlinuz -path "*/modules/*" | head -1)
  [ -n "$vmlinuz" ] || vmlinuz=$(find "$work/root/boot" -name 'vmlinuz-*' 2>/dev/null | head -1)
  config=$(find "$work/root" \( -name config -path "*/modules/*" \) -o -name 'config-*' | head -1)
  if [ -z "$vmlinuz" ] || [ -z "$config" ]; then
    echo "wset: $pkg has no vmlinuz or config; trying an older one" >&2
    continue
  fi
  if ! grep -q '^CONFIG_USERFAULTFD_RWP=y' "$config"; then
    echo "wset: $pkg lacks CONFIG_USERFAULTFD_RWP=y; trying an older one" >&2
    continue
  fi
  version=$(dpkg-deb -f "$(ls "$work"/deb/linux-binary-*.deb | head -1)" Version)
  dest="$cache/$flavour-$version"
  rm -rf "$dest" && mkdir -p "$dest"
  cp "$vmlinuz" "$dest/vmlinuz"
  cp "$config" "$dest/config"
  echo "$pkg $version" >"$dest/version"
  ln -sfn "$dest" "$cache/current"
  rm -rf "$work"
  step "kernel $pkg $version cached in $dest (CONFIG_USERFAULTFD_RWP=y)"
  echo "$cache/current"
  exit 0
done
fail "none of ${candidates[*]} could be downloaded with CONFIG_USERFAULTFD_RWP=y (above)"
