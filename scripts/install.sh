#!/usr/bin/env bash
# Create .venv and install the project with its test tools. Idempotent: a second run only checks.
# Versions come from requirements.lock (every dependency, pinned). uv installs them (measured: ~4x faster than pip
# here); it does not read pip's configuration, so it is handed the same package locations pip uses on this machine
# (torch/torchvision come from local wheels that way, see ../shared/DESIGN.md). If uv cannot do it, pip does.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
UV_VERSION=0.13.9
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi

pip_locations() {
  # pip's index, extra indexes and find-links (its config files and PIP_* variables) as uv options.
  local key flag value
  for key in index-url extra-index-url find-links; do
    case $key in index-url) flag=--index-url ;; extra-index-url) flag=--extra-index-url ;; *) flag=--find-links ;; esac
    for value in $(.venv/bin/pip config get "global.$key" 2>/dev/null || true); do echo "$flag $value"; done
  done
  for value in ${PIP_INDEX_URL:-}; do echo "--index-url $value"; done
  for value in ${PIP_EXTRA_INDEX_URL:-}; do echo "--extra-index-url $value"; done
  for value in ${PIP_FIND_LINKS:-}; do echo "--find-links $value"; done
}

uv_install() {
  .venv/bin/pip install -q --disable-pip-version-check "uv==$UV_VERSION" || return 1
  # pip's certificate bundle (a proxy's CA) for uv as well; unsafe-best-match picks versions across indexes as pip does.
  # --compile-bytecode: uv leaves no .pyc files, and where PYTHONDONTWRITEBYTECODE is set (these machines set it)
  # every process would compile torch and transformers again: measured 10.4 s -> 4.7 s for importing the decode stage.
  local cert=${PIP_CERT:-$(.venv/bin/pip config get global.cert 2>/dev/null || true)}
  # shellcheck disable=SC2046  # one option and its value per line, split on purpose
  SSL_CERT_FILE=${cert:-${SSL_CERT_FILE:-}} .venv/bin/uv pip install -q --python .venv/bin/python \
    --index-strategy unsafe-best-match --compile-bytecode $(pip_locations) -r requirements.lock
}

stamp=.venv/.qvl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements.lock -nt "$stamp" ]; then
  # Every dependency at its locked version (scripts/lock.sh re-resolves), then the project itself.
  if ! uv_install; then
    echo "install: uv failed; installing with pip instead" >&2
    .venv/bin/pip install -q -r requirements.lock
  fi
  .venv/bin/pip install -q --no-deps -e ".[dev]"
  # torchcodec (if something pulled it in) is CUDA-linked and breaks qwen-vl-utils' reader choice.
  .venv/bin/pip uninstall -q -y torchcodec 2>/dev/null || true
  touch "$stamp"
fi
