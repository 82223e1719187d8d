#!/usr/bin/env bash
# Install what StreamV2V Canvas needs into the current Python (activate a
# virtual environment first if you want one).  run.sh and test.sh call it;
# it does nothing when the requirements files have not changed since it last
# ran for this Python (it keeps a stamp file, .installed-*, per Python).
#
#   bash tools/install.sh          the app's requirements (requirements.txt)
#   bash tools/install.sh --dev    also the test tools: requirements-dev.txt, Ray Serve
#                                  (requirements-ray.txt, for the Ray back end's tests), the
#                                  benchmark's peer (streamdiffusion, without its pins) and
#                                  Debian's chromium for the browser tests (apt-get, when missing)
#
# torch: kept when it is already installed; otherwise, with an NVIDIA GPU
# (nvidia-smi lists one), requirements.txt pulls PyPI's CUDA build; without
# one, the CPU build is installed first from PyTorch's CPU index
# ($SV2V_TORCH_INDEX: another index URL, e.g. a mirror, where that one cannot
# be reached), so pip does not fetch gigabytes of CUDA libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_INDEX="${SV2V_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
pip=("$PYTHON" -m pip install -q)
dev=0
case "${1:-}" in
  "") ;;
  --dev) dev=1 ;;
  *) echo "usage: bash tools/install.sh [--dev]" >&2; exit 2 ;;
esac

# Stamps: what was installed for this Python (delete .installed-* to install again).
stamp=".installed-$( "$PYTHON" -c 'import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:10])' )"
app_wanted="$(cat requirements.txt)"
dev_wanted="$(cat requirements.txt requirements-dev.txt requirements-ray.txt)"
if [ "$dev" = 1 ]; then wanted="$dev_wanted"; suffix=dev; else wanted="$app_wanted"; suffix=app; fi
if [ -f "$stamp-$suffix" ] && [ "$(cat "$stamp-$suffix")" = "$wanted" ]; then
  exit 0
fi

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install: NVIDIA GPU found: torch's CUDA build comes with requirements.txt"
  else
    echo "install: no NVIDIA GPU: torch's CPU build from $TORCH_INDEX"
    # An index that cannot be reached costs pip minutes of retries: ask once, then fail fast
    # (pip still finds a wheel in its configured find-links, if any).
    retries=()
    if ! "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)' "$TORCH_INDEX" \
         >/dev/null 2>&1; then
      echo "install: $TORCH_INDEX cannot be reached; trying it once (set SV2V_TORCH_INDEX to a reachable index)" >&2
      retries=(--retries 0 --timeout 5)
    fi
    if ! "${pip[@]}" "${retries[@]}" torch --index-url "$TORCH_INDEX"; then
      echo "install: no CPU build of torch found; set SV2V_TORCH_INDEX to an index that has one," \
           "or install torch yourself first" >&2
      exit 1
    fi
  fi
fi
echo "install: requirements.txt"
"${pip[@]}" -r requirements.txt
if [ "$dev" = 1 ]; then
  echo "install: requirements-dev.txt, requirements-ray.txt and the benchmark's peer"
  "${pip[@]}" -r requirements-dev.txt -r requirements-ray.txt
  "${pip[@]}" --no-deps streamdiffusion==0.1.1  # it pins diffusers 0.24, which it does not need
  if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
    else
      echo "install: the browser tests need Debian's chromium (sudo apt-get install chromium); they are skipped without it" >&2
    fi
  fi
fi
printf '%s' "$app_wanted" > "$stamp-app"
if [ "$dev" = 1 ]; then printf '%s' "$dev_wanted" > "$stamp-dev"; fi
