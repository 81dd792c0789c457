#!/usr/bin/env bash
# Runs shellcheck on every shell script of the repository (scripts/, .ci/run, the Debian
# maintainer scripts), following what they source. Installs shellcheck first (idempotent).
# Called by scripts/test.sh; also runs on its own.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/lib/apt.sh
source scripts/lib/apt.sh
ensure_apt_packages shellcheck

# Ours only: npm's node_modules (scripts/e2e) brings scripts of its own.
mapfile -t scripts < <(
    find scripts .ci packaging -name node_modules -prune -o -type f \( -name '*.sh' -o -path .ci/run \
        -o -name postinst -o -name postrm -o -name prerm -o -name preinst \) -print | sort
)
# -x follows `source`; -P lists where relative `source` paths are looked up.
shellcheck -x -P SCRIPTDIR:scripts/lib:scripts/bench:scripts/lab "${scripts[@]}"
echo "shellcheck: ${#scripts[@]} scripts clean" >&2
