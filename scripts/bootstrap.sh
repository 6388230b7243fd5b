#!/usr/bin/env bash
# Make a fresh Debian 12 machine ready to run and test Ciliate; safe to run on every `make up`.
#
# 1. Debian packages (bcc, headers, bpftool, networking tools), installed only when missing.
# 2. The Python 3.11 virtualenv, (re)installed only when pyproject.toml/constraints.txt changed.
# 3. A .pth file that puts Debian's bcc (and only it) on the virtualenv's path.
# 4. `ciliate doctor --fix`: header links, tracefs/bpffs/cgroup2 mounts, kernel feature probes.
#
# Overrides: VENV (virtualenv path, default <repo>/.venv), PYTHON (interpreter for a new venv),
# SKIP_APT=1 (do not touch Debian packages), SKIP_DOCTOR=1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
STAMP="$VENV/.ciliate-install-stamp"
DEBIAN_BCC=/usr/lib/python3/dist-packages/bcc
APT_PACKAGES=(
    python3-bpfcc bpfcc-tools libbpfcc linux-headers-amd64 bpftool
    iproute2 iptables nftables conntrack iperf3 util-linux chromium
)
started_ns=$(date +%s%N)

say() { printf '%-8s %s\n' "$1:" "$2"; }
die() { printf 'bootstrap: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [[ $EUID -eq 0 ]]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root for: $*"
    fi
}

# --- 1. Debian packages ------------------------------------------------------------------------
installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

pick_python() {
    if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
    if command -v python3 >/dev/null &&
        python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
        command -v python3
    else
        echo /usr/bin/python3.11
    fi
}

python_for_venv="$(pick_python)"
wanted=("${APT_PACKAGES[@]}")
# Debian's own interpreter needs its venv module packaged separately.
[[ "$python_for_venv" == /usr/bin/* ]] && wanted+=(python3.11 python3.11-venv)

if [[ "${SKIP_APT:-0}" == 1 ]]; then
    say apt "skipped (SKIP_APT=1)"
else
    missing=()
    for pkg in "${wanted[@]}"; do installed "$pkg" || missing+=("$pkg"); done
    if ((${#missing[@]})); then
        say apt "installing ${missing[*]}"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        say apt "all ${#wanted[@]} packages present"
    fi
fi

# --- 2. virtualenv -----------------------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    [[ -x "$python_for_venv" ]] || die "no Python 3.11 found (tried python3 on PATH, $python_for_venv)"
    say venv "creating $VENV with $("$python_for_venv" --version 2>&1)"
    "$python_for_venv" -m venv "$VENV"
fi

want_stamp="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
have_stamp="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "$want_stamp" != "$have_stamp" ]]; then
    say venv "installing ciliate[dev] (pyproject.toml or constraints.txt changed)"
    (cd "$ROOT" && "$VENV/bin/python" -m pip install -q -c constraints.txt -e '.[dev]')
    echo "$want_stamp" > "$STAMP"
else
    say venv "up to date ($VENV)"
fi

# --- 3. Debian's bcc on the venv path ----------------------------------------------------------
[[ -d "$DEBIAN_BCC" ]] || die "$DEBIAN_BCC missing: is python3-bpfcc installed?"
site_packages="$(echo "$VENV"/lib/python3.*/site-packages)"
[[ -d "$site_packages" ]] || die "no site-packages under $VENV/lib"
mkdir -p "$VENV/bcc-link"
if [[ "$(readlink "$VENV/bcc-link/bcc" 2>/dev/null)" != "$DEBIAN_BCC" ]]; then
    ln -sfn "$DEBIAN_BCC" "$VENV/bcc-link/bcc"
    say bcc "linked $VENV/bcc-link/bcc -> $DEBIAN_BCC"
else
    say bcc "already linked"
fi
if [[ "$(cat "$site_packages/debian-bcc.pth" 2>/dev/null)" != "$VENV/bcc-link" ]]; then
    echo "$VENV/bcc-link" > "$site_packages/debian-bcc.pth"
fi

# --- 4. kernel-side preparation ----------------------------------------------------------------
if [[ "${SKIP_DOCTOR:-0}" == 1 ]]; then
    say doctor "skipped (SKIP_DOCTOR=1)"
else
    if "$VENV/bin/ciliate" doctor --help >/dev/null 2>&1; then
        doctor=("$VENV/bin/ciliate" doctor --fix)
    else
        doctor=("$VENV/bin/python" -m ciliate.doctor --fix)
    fi
    [[ $EUID -eq 0 ]] || doctor=(sudo "${doctor[@]}")
    if report="$(cd "$ROOT" && "${doctor[@]}" 2>&1)"; then
        # Only the lines worth reading: repairs, warnings and the verdict.
        say doctor "$(grep -v '^  ok ' <<<"$report" | sed '2,$s/^/         /')"
    else
        printf '%s\n' "$report"
        die "host is not ready (see the doctor's report above)"
    fi
fi

elapsed_ms=$((($(date +%s%N) - started_ns) / 1000000))
say done "in $((elapsed_ms / 1000)).$(printf '%03d' $((elapsed_ms % 1000)))s"
