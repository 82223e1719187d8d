#!/usr/bin/env bash
# Install the app and the test tools (pytest, Playwright, Debian's chromium), then
# run the tests: bash test.sh [pytest options]
set -euo pipefail
cd "$(dirname "$0")"
bash tools/install.sh --dev
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1
exec "${PYTHON:-python3}" -m pytest -q "$@"
