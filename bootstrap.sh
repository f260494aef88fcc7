#!/usr/bin/env bash
# deepfleet's one entry point on a fresh Debian 12 / Ubuntu 22.04+ machine (needs root):
#
#   sudo ./bootstrap.sh lab     # install, bring the local lab up, deploy to it, check it, chat
#   sudo ./bootstrap.sh test    # install, run the whole test suite (lab end-to-end included)
#   sudo ./bootstrap.sh setup   # only install (system packages + .venv)
#
# It installs Debian packages (the config checkers the tests use, the lab's tools) without
# starting their services, and a Python virtual environment in .venv.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(
  python3 python3-venv python3-pip git ca-certificates curl openssh-client openssl
  # the lab: namespaces, nspawn nodes, a Debian rootfs, an apt cache for the nodes
  iproute2 nftables systemd-container mmdebstrap apt-cacher-ng uidmap
  # the real tools that read our rendered configs (see docs/testing.md)
  netplan.io chrony haproxy nginx-light prometheus openssh-server systemd shellcheck
)
SGLANG_VERSION=0.5.23  # the engine release whose flags we check against (infra/sglang_flags.py)

log() { printf '\033[1m==> %s\033[0m\n' "$*"; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "error: ./bootstrap.sh needs root (network namespaces, mounts, apt): run it with sudo" >&2
    exit 2
  fi
}

install_system_packages() {
  local missing=()
  for package in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  # Install the checkers' packages without starting their daemons on this machine.
  local policy=/usr/sbin/policy-rc.d created=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && created=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ -n "$created" ] && rm -f "$policy"
  return 0
}

install_python() {
  if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    python3 -m venv .venv
  fi
  if ! .venv/bin/python -c 'import infra, pytest, pulumi_aws' 2>/dev/null \
    || [ pyproject.toml -nt .venv/.installed ]; then
    log "installing deepfleet and its pinned dependencies into .venv"
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[dev]'
    touch .venv/.installed
  fi
  # sglang's own flag definitions, read from its source (never imported: it needs torch).
  if ! .venv/bin/pip show -q sglang 2>/dev/null | grep -q "$SGLANG_VERSION" \
    && ! [ -f ".venv/sglang-$SGLANG_VERSION" ]; then
    log "fetching sglang $SGLANG_VERSION (source only, no dependencies) for the engine-flag checks"
    .venv/bin/pip install -q --no-deps "sglang==$SGLANG_VERSION" && touch ".venv/sglang-$SGLANG_VERSION"
  fi
}

run_lab() {
  export DEEPFLEET_SPEC=hosts/lab.yaml
  local started=$SECONDS
  log "validating $DEEPFLEET_SPEC"
  .venv/bin/deepfleet validate "$DEEPFLEET_SPEC"
  log "bringing the lab up"
  .venv/bin/deepfleet lab up --spec "$DEEPFLEET_SPEC"
  log "deploying every role: pyinfra inventory.py deploy.py"
  .venv/bin/pyinfra -y inventory.py deploy.py
  log "deploying again: nothing may change"
  .venv/bin/pyinfra -y --json inventory.py deploy.py 2>/dev/null \
    | .venv/bin/python -m infra.deploy_results --expect-no-change
  log "drift check: the lab must match the repository"
  .venv/bin/deepfleet drift "$DEEPFLEET_SPEC"
  log "one chat completion through the load balancer"
  .venv/bin/deepfleet lab chat --spec "$DEEPFLEET_SPEC" "Hello, lab"
  .venv/bin/deepfleet lab status --spec "$DEEPFLEET_SPEC"
  log "done in $((SECONDS - started)) s"
  cat <<EOT
  reach a node:   .venv/bin/deepfleet lab ssh gpu-01
  call the API:   curl -H "Authorization: Bearer \$(cat .lab/secrets/api-key)" http://10.77.0.10:8000/v1/models
  prometheus:     http://10.77.0.20:9090 (from this machine)
  tear it down:   .venv/bin/deepfleet lab down
EOT
}

run_tests() {
  log "lint and types"
  .venv/bin/ruff check .
  .venv/bin/ruff format --check .
  .venv/bin/mypy
  log "tests (unit, golden files with the real validators, Pulumi mocks, lab end-to-end)"
  .venv/bin/python -m pytest "$@"
}

main() {
  local command=${1:-}
  shift || true
  case "$command" in
    setup) need_root; install_system_packages; install_python ;;
    lab) need_root; install_system_packages; install_python; run_lab ;;
    test) need_root; install_system_packages; install_python; run_tests "$@" ;;
    *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
  esac
}

main "$@"
