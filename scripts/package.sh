#!/usr/bin/env bash
# Builds the forwarder's Debian package, target/debian/forwarder_*.deb: the binary, the systemd
# unit, /etc/forwarder/entries.csv (a conffile: the commented example), the man page and shell
# completions. Also writes the man pages and completions of every other program into
# target/<profile>/docs. Safe to run again: cargo-deb is installed only when missing.
#
#   scripts/package.sh                 # release build
#   PROFILE=dev scripts/package.sh     # from the debug build (what scripts/test.d/package.sh uses)
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=${PROFILE:-release}
PROGRAMS=(forwarder ssl-echo-server ssl-echo-client chat-server chat-client certs)
case "$PROFILE" in
    dev) dir=debug ;;
    *) dir=$PROFILE ;;
esac
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
out="$target/$dir"
docs="$out/docs"

# Pinned: cargo-deb warns that packaging the dev profile (what the test uses, to reuse the debug
# build) will become an error in a later release.
CARGO_DEB_VERSION=3.8.0
if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
    echo "installing cargo-deb $CARGO_DEB_VERSION" >&2
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked
fi

args=()
for p in "${PROGRAMS[@]}"; do args+=(-p "$p"); done
cargo build --profile "$PROFILE" --bins "${args[@]}"

rm -rf "$docs"
for p in "${PROGRAMS[@]}"; do
    "$out/$p" --generate-docs "$docs"
done
gzip -9nf "$docs"/man/*.1

# The example rules file is the one the forwarder writes when started without one.
example=$(mktemp -d)
trap 'rm -rf "$example"' EXIT
(cd "$example" && "$out/forwarder" --check >/dev/null 2>&1)
cp "$example/entries.csv" "$docs/entries.csv"

cargo deb -p forwarder --profile "$PROFILE" --no-build --output "$target/debian/"
ls "$target"/debian/forwarder_*.deb
