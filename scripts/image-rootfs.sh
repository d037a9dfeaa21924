#!/usr/bin/env bash
# The image's build recipe: builds both binaries (release, locked) and lays
# out the runtime image's files under DEST. The Dockerfile runs exactly this;
# scripts/test.sh runs it too and checks the result, so the recipe is tested
# where no container engine runs.
# Usage: scripts/image-rootfs.sh DEST
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
dest=${1:?usage: scripts/image-rootfs.sh DEST}
install_packages "${WSET_BUILD_PACKAGES[@]}"

cargo build --release --locked -p wset-agent -p wset-controller \
  || fail "building wset-agent and wset-controller failed (above)"
install -D -m 0755 target/release/wset-agent "$dest/usr/local/bin/wset-agent"
install -D -m 0755 target/release/wset-controller "$dest/usr/local/bin/wset-controller"
install -D -m 0644 README.md "$dest/usr/share/doc/wset/README.md"

# The runtime image (distroless cc) has glibc, libm and libgcc_s: anything
# else the binaries link would be missing there.
for b in "$dest"/usr/local/bin/*; do
  extra=$(ldd "$b" | awk '{print $1}' | grep -Ev '^(linux-vdso\.so\.1|libgcc_s\.so\.1|libm\.so\.6|libc\.so\.6|/lib64/ld-linux-x86-64\.so\.2)$' || true)
  [ -z "$extra" ] || fail "$(basename "$b") links libraries the runtime image lacks: $extra"
done
echo "image: rootfs in $dest"
