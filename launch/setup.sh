#!/usr/bin/env bash
# Set-up on a fresh machine: the project and its Python dependencies (`test` adds pytest), and, when
# running as root on Debian, the offline data packages (Fashion-MNIST IDX files).
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: Fashion-MNIST is not installed (sudo apt-get install dataset-fashion-mnist, or set" \
         "--config.data.idx_dir to the four IDX files); tests that need it are skipped." >&2
  fi
fi
python -m pip install -q --disable-pip-version-check -e ".${extra}"
