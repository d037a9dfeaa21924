#!/usr/bin/env bash
# Keeps the wire stable: `buf lint` (STANDARD rules) on wset.v1, `buf
# breaking` against the committed descriptor of the last accepted API
# (proto/wset-v1.binpb), and a check that the committed descriptor is the
# current API, so that what is added now is protected from here on. A
# deliberately broken copy must fail the breaking check, so that it cannot
# pass vacuously.
#
# Usage: scripts/api.sh            check (the test command runs this)
#        scripts/api.sh --accept   after a compatible change (an added field,
#                                  message or method): record the current API
#                                  as the accepted one, and commit the file
#
# buf comes from the npm registry (@bufbuild/buf, pinned), installed once
# under WSET_TOOL_CACHE (default /var/cache/wset/tools).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

buf_version=1.75.0
module=proto/proto
accepted=proto/wset-v1.binpb

require_buf() {
  local dir=${WSET_TOOL_CACHE:-/var/cache/wset/tools}/buf-$buf_version
  buf="$dir/node_modules/.bin/buf"
  [ -x "$buf" ] && "$buf" --version >/dev/null 2>&1 && return 0
  command -v npm >/dev/null || install_packages nodejs npm
  command -v npm >/dev/null || fail "npm not found: buf is installed from the npm registry (apt-get install npm)"
  step "installing buf $buf_version (npm install @bufbuild/buf; once, into $dir)"
  mkdir -p "$dir" || fail "cannot create $dir for buf"
  # npm installs beside the nearest package.json: make it this one.
  [ -f "$dir/package.json" ] || echo '{"private": true}' > "$dir/package.json"
  (cd "$dir" && npm install --no-audit --no-fund --no-save "@bufbuild/buf@$buf_version" >&2) \
    || fail "npm install @bufbuild/buf@$buf_version failed (above); the API checks need buf"
  "$buf" --version >/dev/null || fail "buf was installed in $dir but does not run"
}

require_buf
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step "buf lint ($module, STANDARD rules)"
"$buf" lint "$module" || fail "buf lint found problems in $module (above): fix the .proto files"

# The API alone: no comments or source positions, so that editing a comment
# is not an API change.
"$buf" build "$module" --exclude-source-info -o "$work/current.binpb" \
  || fail "buf build $module failed (above)"

if [ "${1:-}" = --accept ]; then
  [ -f "$accepted" ] && { "$buf" breaking "$module" --against "$accepted" \
    || fail "the change breaks the accepted API (above): wset.v1 is stable; add, do not change"; }
  cp "$work/current.binpb" "$accepted"
  echo "api: $accepted records the current API; commit it"
  exit 0
fi

[ -f "$accepted" ] || fail "$accepted is missing: the accepted API is what 'buf breaking' compares against"

step "buf breaking (against $accepted, the last accepted API; FILE rules)"
"$buf" breaking "$module" --against "$accepted" \
  || fail "the change breaks wset.v1's accepted API (above): add fields, messages and methods instead of changing or removing them"

cmp -s "$work/current.binpb" "$accepted" \
  || fail "the API changed compatibly but $accepted still records the old one: run 'scripts/api.sh --accept' and commit $accepted, so that the additions are protected too"

# Not vacuous: a copy with a field renumbered must fail.
cp -r "$module" "$work/broken"
sed -i '0,/string vm_id = 1;/s//string vm_id = 99;/' "$work/broken/wset/v1/agent.proto"
cmp -s "$module/wset/v1/agent.proto" "$work/broken/wset/v1/agent.proto" \
  && fail "the breaking self-check found no 'string vm_id = 1;' to renumber in agent.proto; update scripts/api.sh"
# buf exits 100 for findings; anything else is buf failing to check.
set +e
"$buf" breaking "$work/broken" --against "$accepted" >/dev/null 2>"$work/broken.err"
rc=$?
set -e
case $rc in
  100) ;;
  0) fail "a renumbered field passed 'buf breaking': the check would not catch a breaking change" ;;
  *) fail "buf breaking could not check the renumbered copy (exit $rc): $(cat "$work/broken.err")" ;;
esac
echo "api: buf lint clean; no breaking change against $accepted; a renumbered field is caught"
