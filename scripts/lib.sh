# Shared helpers for wset's scripts: progress lines, clear failures, and
# installing Debian packages on demand.

# Debian packages the build needs: libclang-dev for bindgen, which
# generates the userfaultfd crate's bindings at build time, and protoc for
# the etcd-client crate's build script (wset's own protos need no protoc).
WSET_BUILD_PACKAGES=(pkg-config libclang-dev protobuf-compiler)
# ... and the tests: a real etcd for the controller's replica tests.
WSET_TEST_PACKAGES=("${WSET_BUILD_PACKAGES[@]}" etcd-server)

step() { printf '\n==> %s\n' "$*" >&2; }
fail() { printf '\nwset: FAILED: %s\n' "$*" >&2; exit 1; }

# require_root "$@" : go on as root. Root (a fresh machine often has no
# sudo) carries on; anyone else is re-run through sudo, keeping the Rust
# toolchain on PATH, its caches and the WSET_* settings, or stopped with
# what to do. Call it after the script's `cd` to the repository (every
# script lives in scripts/).
require_root() {
  [ "$(id -u)" = 0 ] && return 0
  local why="the tracker needs userfaultfd and /proc/<pid>/pagemap of other processes, and packages may need installing"
  command -v sudo >/dev/null || fail "run as root ($why); there is no sudo here: log in as root and re-run"
  step "not root: re-running through sudo ($why)"
  local keep=()
  while IFS= read -r v; do keep+=("$v"); done < <(env | grep '^WSET_' || true)
  exec sudo env "${keep[@]}" "PATH=$PATH" "HOME=$HOME" "CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}" \
    "RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}" "$PWD/scripts/$(basename "$0")" "$@"
}

require_device() {
  local dev=$1 why=$2
  [ -e "$dev" ] || fail "$dev is missing: $why"
  [ -r "$dev" ] && [ -w "$dev" ] || fail "$dev is not readable and writable: $why"
}

# grpcurl, the reflection client the tests and the README use: grpcurl-rs
# from crates.io (no Debian package exists).
require_grpcurl() {
  export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
  command -v grpcurl >/dev/null && return 0
  step "installing grpcurl (cargo install --locked grpcurl-rs; a few minutes, once)"
  cargo install --locked grpcurl-rs >&2 \
    || fail "cargo install grpcurl-rs failed (above); the gRPC reflection tests need a grpcurl on PATH"
}

require_cargo() {
  command -v cargo >/dev/null || fail "cargo not found: install the Rust toolchain (https://rustup.rs) and re-run"
}

# install_packages PKG... : apt-get install whatever is missing.
install_packages() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  step "installing Debian packages: ${missing[*]}"
  command -v apt-get >/dev/null || fail "apt-get not found; install these packages by hand: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2 || fail "apt-get update failed; check the network and /etc/apt sources, then install: ${missing[*]}"
  apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
    || fail "apt-get install ${missing[*]} failed (above)"
}

# cargo-fuzz, which drives libFuzzer for scripts/fuzz.sh, from crates.io.
require_cargo_fuzz() {
  export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
  cargo fuzz --version >/dev/null 2>&1 && return 0
  step "installing cargo-fuzz (cargo install --locked cargo-fuzz; a minute or two, once)"
  cargo install --locked cargo-fuzz >&2 \
    || fail "cargo install cargo-fuzz failed (above); the fuzzing step needs it"
}

require_cargo
