#!/usr/bin/env bash
# make setup: bring a Debian 12 machine (as root) to the state the tests, `make run` and
# `make bench` need. Idempotent, and quiet and quick when everything is already there:
#   1. Debian packages (apt-get update only when one is missing)
#   2. .venv (python3 -m venv; python3-venv installed if that fails)
#   3. the project, editable, with test extras (again only when pyproject.toml is newer
#      than the stamp)
#   4. python3-libnbd's two files symlinked into the venv, and `import nbd` checked
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export DEBIAN_FRONTEND=noninteractive
VENV="${VENV:-.venv}"
STAMP="$VENV/.journalpair-installed"
PYTHON="${PYTHON:-python3}"

# What the tests and the bench use: NBD clients and reference servers, fio, a real file
# system (nbdfuse + losetup + mkfs.ext4), network namespaces, process tools, and
# qemu-storage-daemon (in qemu-system-common: the bench's QEMU mirror peer); for the
# failover integration (deploy/): systemd-analyze (systemd) to verify the units, and
# ocf-tester with ocf-shellfuncs (resource-agents), xmllint (libxml2-utils) and shellcheck
# for the OCF agent; promtool (prometheus) to check the example alert rules
# (deploy/prometheus/) and the daemons' /metrics output. For the iSCSI front end: libiscsi-bin
# (iscsi-ls, iscsi-inq, iscsi-readcapacity16, iscsi-test-cu) and qemu-block-extra (qemu-io's
# iscsi:// driver) as real initiators.
DEB_PACKAGES=(
    qemu-utils libnbd-bin python3-libnbd fio fuse3 e2fsprogs nbdkit
    iproute2 util-linux procps qemu-system-common
    systemd resource-agents libxml2-utils shellcheck prometheus
    libiscsi-bin qemu-block-extra
)

log() { echo "setup: $*" >&2; }

as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    else
        sudo "$@"
    fi
}

deb_missing() {
    local pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
            echo "$pkg"
        fi
    done
}

apt_install() {
    local missing
    mapfile -t missing < <(deb_missing "$@")
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_python() {
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        apt_install python3
    fi
}

venv_ok() {
    [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c 'import pip' >/dev/null 2>&1
}

ensure_venv() {
    venv_ok && return 0
    log "creating $VENV"
    rm -rf "$VENV"
    if ! "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
        # Debian's python3 ships venv without ensurepip: that lives in python3-venv.
        rm -rf "$VENV"
        apt_install python3-venv
        "$PYTHON" -m venv "$VENV"
    fi
    rm -f "$STAMP"
}

ensure_project() {
    if [[ -f "$STAMP" && ! pyproject.toml -nt "$STAMP" ]]; then
        return 0
    fi
    log "installing the project (editable, with test extras) into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
    touch "$STAMP"
}

# python3-libnbd is built for Debian's python3; link exactly its two files into the venv
# rather than exposing all of dist-packages (which would shadow the venv's own packages).
ensure_nbd_binding() {
    local dist=/usr/lib/python3/dist-packages site ext src dst
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    ext="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
    for src in "$dist/nbd.py" "$dist/libnbdmod$ext"; do
        if [[ ! -e "$src" ]]; then
            log "error: $src not found (python3-libnbd installed for another Python version?)"
            exit 1
        fi
        dst="$site/$(basename "$src")"
        if [[ "$(readlink "$dst" 2>/dev/null || true)" != "$src" ]]; then
            ln -sfn "$src" "$dst"
        fi
    done
    if ! "$VENV/bin/python" -c 'import nbd' >/dev/null 2>&1; then
        log "error: '$VENV/bin/python -c \"import nbd\"' fails:"
        "$VENV/bin/python" -c 'import nbd' || true
        exit 1
    fi
}

main() {
    apt_install "${DEB_PACKAGES[@]}"
    ensure_python
    ensure_venv
    ensure_project
    ensure_nbd_binding
}

main "$@"
