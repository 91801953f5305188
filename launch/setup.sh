#!/usr/bin/env bash
# Set-up on a fresh machine: the project and its Python dependencies (`test` adds pytest), and, when
# running as root on Debian, the offline data packages: Fashion-MNIST IDX files (dataset-fashion-mnist)
# and the Python documentation sources, the byte-level text of the language models (python3.11-doc).
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
missing=""
[ -d /usr/share/datasets/fashion-mnist ] || missing="$missing dataset-fashion-mnist"
[ -d /usr/share/doc/python3.11/html/_sources ] || missing="$missing python3.11-doc"
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "note: missing Debian packages:$missing (sudo apt-get install$missing, or point" \
         "--config.data.idx_dir / --config.data.path at the files); tests that need them are skipped." >&2
  fi
fi
python -m pip install -q --disable-pip-version-check -e ".${extra}"
