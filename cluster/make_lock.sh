#!/usr/bin/env bash
# Regenerates cluster/requirements.lock, the pinned dependencies that cluster/aws.yaml, cluster/gcp.yaml and
# cluster/Dockerfile install: `pip freeze --exclude-editable` of the project's virtual environment (bikd
# itself, installed editable, is left out), less the torch line (torch==2.13.0 is installed before the
# lock, from the CPU or the CUDA index of download.pytorch.org, so the lock works for both builds).
#
#   bash cluster/make_lock.sh                     # freezes .venv of this checkout
#   VENV=/path/to/venv bash cluster/make_lock.sh  # another environment
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
out="$root/cluster/requirements.lock"
py="$("$venv/bin/python" -c 'import platform; print(f"Python {platform.python_version()}, {platform.system()} {platform.machine()}")')"
{
  echo "# Pinned dependencies of bikd for the cluster nodes and image (cluster/aws.yaml, gcp.yaml, Dockerfile)."
  echo "# Made by cluster/make_lock.sh: 'pip freeze --exclude-editable' of the project's virtual environment"
  echo "# ($py), with the torch line removed. Install order:"
  echo "#   pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu   # or .../whl/cu128 on GPU nodes"
  echo "#   pip install -r cluster/requirements.lock"
  echo "#   pip install --no-deps -e ."
  "$venv/bin/pip" freeze --exclude-editable | grep -v -E '^torch(==| @ )'
} > "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out ($(grep -c -v '^#' "$out") packages)"
