#!/usr/bin/env bash
# CI step: the Debian package end to end. Builds it from the debug build (scripts/package.sh with
# PROFILE=dev: no release build, so the step takes seconds once cargo-deb is installed), installs
# it with dpkg -i, checks what a user relies on (the rules file passes --check, the user exists,
# `man forwarder` renders, `systemd-analyze verify` accepts the installed unit), then removes and
# purges it and checks nothing is left. A forwarder package installed before is purged first.
set -euo pipefail
cd "$(dirname "$0")/../.." || exit 1
root=$PWD

# shellcheck source=scripts/lib/apt.sh
source scripts/lib/apt.sh
ensure_apt_packages systemd man-db adduser init-system-helpers

fail() {
    echo "package: $*" >&2
    exit 1
}
installed() { dpkg-query -W -f='${Status}' forwarder 2>/dev/null | grep -q 'install ok installed'; }

started=$(date +%s)
PROFILE=dev scripts/package.sh >/dev/null
target=${CARGO_TARGET_DIR:-$root/target}
# The newest package: the names are ours (forwarder_VERSION_ARCH.deb), so ls -t is safe here.
# shellcheck disable=SC2012
deb=$(ls -t "$target"/debian/forwarder_*.deb | head -n 1)
built=$(date +%s)

if dpkg-query -W forwarder >/dev/null 2>&1; then
    echo "package: purging the forwarder package installed before this test" >&2
    dpkg --purge forwarder >/dev/null
fi
trap 'dpkg --purge forwarder >/dev/null 2>&1 || true' EXIT

dpkg -i "$deb" >/dev/null
installed || fail "not installed"
getent passwd forwarder >/dev/null || fail "user forwarder not created"
[ "$(stat -c %U /etc/forwarder/entries.csv)" = forwarder ] || fail "entries.csv not owned by forwarder"
grep -q '^# web1,8080,127.0.0.1,9001' /etc/forwarder/entries.csv || fail "entries.csv lacks the example"
forwarder --check --rules /etc/forwarder/entries.csv 2>/dev/null || fail "forwarder --check failed"

page=$(MANPAGER=cat MANWIDTH=100 man forwarder 2>&1) || fail "man forwarder: $page"
for want in "NAME" "--user" "EXIT STATUS" "cannot bind" "SIGNALS" "SIGUSR1"; do
    grep -qF -- "$want" <<<"$page" || fail "man forwarder lacks '$want'"
done
for f in /usr/share/bash-completion/completions/forwarder /usr/share/zsh/vendor-completions/_forwarder \
    /usr/share/fish/vendor_completions.d/forwarder.fish; do
    grep -q -- 'refuse-root' "$f" || fail "$f lacks --refuse-root"
done
# The forwarder's own documentation, not the workspace README.
head -n 1 /usr/share/doc/forwarder/README.md | grep -qx '# forwarder' ||
    fail "/usr/share/doc/forwarder/README.md is not the forwarder's README"
for d in rules service web internals; do
    [ -s "/usr/share/doc/forwarder/$d.md" ] || fail "no /usr/share/doc/forwarder/$d.md"
done
for p in ssl-echo-server ssl-echo-client chat-server chat-client certs; do
    other=$(env MANPAGER=cat man -l "$target/debug/docs/man/$p.1.gz" 2>&1) || fail "man $p: $other"
    grep -q -- "--help" <<<"$other" || fail "man $p lacks --help"
    [ -s "$target/debug/docs/completions/$p.bash" ] || fail "no bash completion for $p"
done

# Verifies the installed unit: the binary and man:forwarder(1) it names must exist.
verify=$(systemd-analyze verify forwarder.service 2>&1) || fail "systemd-analyze verify: $verify"
[ -z "$verify" ] || fail "systemd-analyze verify: $verify"

dpkg -r forwarder >/dev/null
[ ! -e /usr/bin/forwarder ] || fail "binary left after dpkg -r"
[ -e /etc/forwarder/entries.csv ] || fail "dpkg -r removed the conffile (only purge should)"
dpkg --purge forwarder >/dev/null
[ ! -e /etc/forwarder ] || fail "/etc/forwarder left after purge"
! dpkg-query -W forwarder >/dev/null 2>&1 || fail "still known to dpkg after purge"
[ ! -e /etc/systemd/system/multi-user.target.wants/forwarder.service ] || fail "unit still enabled after purge"

echo "package: built in $((built - started)) s; installed, checked, removed and purged in $(($(date +%s) - built)) s" >&2
