#!/usr/bin/env bash
# `npm ci` for the JavaScript clients (examples/node, examples/web), again only when a lock file changed.
# Without npm, or when npm ci fails (no registry), it says so and goes on: tests/test_js_clients.py
# then skips with the reason (and fails instead under JS_CLIENTS_REQUIRED=1, as .ci/run sets).
set -uo pipefail
cd "$(dirname "$0")"
if ! command -v npm >/dev/null; then
    echo "examples/install.sh: npm not found: the JavaScript client tests will be SKIPPED"
    exit 0
fi
for dir in node web; do
    stamp="$dir/node_modules/.package-lock.installed"  # npm ci empties node_modules, stamp included
    if [ -f "$stamp" ] && cmp -s "$dir/package-lock.json" "$stamp"; then
        continue
    fi
    if (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error); then
        cp "$dir/package-lock.json" "$stamp"
    else
        echo "examples/install.sh: npm ci failed in examples/$dir: its tests will be SKIPPED"
    fi
done
