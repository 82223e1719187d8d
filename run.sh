#!/usr/bin/env bash
# Install what is missing (torch's CPU build when there is no NVIDIA GPU), then
# start the app: bash run.sh [app.py options, e.g. --model tiny --controlnet tiny]
set -euo pipefail
cd "$(dirname "$0")"
bash tools/install.sh
exec "${PYTHON:-python3}" app.py "$@"
