#!/usr/bin/env bash
# Make redis-server and redis-cli available for the tests (Debian's redis-server package) if missing.
set -euo pipefail
if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "redis-server is missing and this user cannot install it (no sudo)" >&2; exit 1; }
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends redis-server redis-tools >/dev/null
# the package may start a system service; the tests start their own servers on free ports
$SUDO service redis-server stop >/dev/null 2>&1 || true
command -v redis-server >/dev/null
