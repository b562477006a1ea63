# Sourced by scripts/run, scripts/test, scripts/bench: make .venv and install the project.
# Re-installs only when pyproject.toml changed (stamp holds its hash).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
EXTRAS="${ENGINE_EXTRAS:-dev}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
if [ -z "$PY" ]; then echo "error: Python 3.11+ is needed (set PYTHON=/path/to/python3.11)" >&2; exit 1; fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PY" >&2
  "$PY" -m venv .venv
fi
STAMP=".venv/.installed-$EXTRAS"
WANT="$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "setup: installing engine[$EXTRAS] into .venv (first run takes a minute)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$EXTRAS]"
  echo "$WANT" > "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
# The message history's tests and ./scripts/run's local history use Debian's PostgreSQL
# (engine/pgserver.py finds its binaries under /usr/lib/postgresql/N/bin).
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing postgresql (message history) from Debian" >&2
  (export DEBIAN_FRONTEND=noninteractive
   apt-get install -y -qq postgresql >/dev/null 2>&1 \
     || { apt-get update -qq >/dev/null && apt-get install -y -qq postgresql >/dev/null; }) >&2 \
    || echo "setup: postgresql could not be installed; the history tests will be skipped" >&2
fi
