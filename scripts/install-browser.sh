#!/bin/sh
# Debian's Chromium, which the console's browser tests drive with Playwright (never a browser
# downloaded by Playwright: the machine reaches only the Debian and PyPI registries). Does
# nothing when a chromium is already on the PATH.
set -eu
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    run=""
elif command -v sudo >/dev/null 2>&1; then
    run="sudo"
else
    echo "install-browser: chromium is missing; install Debian's chromium package as root" >&2
    exit 1
fi
DEBIAN_FRONTEND=noninteractive $run apt-get update -q
DEBIAN_FRONTEND=noninteractive $run apt-get install -y -q --no-install-recommends chromium
