#!/usr/bin/env bash
# Installs what Strata needs on a Debian/Ubuntu machine, and nothing that is already
# there. Safe to run any number of times. Says what it installs and why.
set -euo pipefail

say() { printf 'bootstrap: %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        say "need root to run: $*"; exit 1
    fi
}

APT_UPDATED=0
apt_install() {
    if ! command -v apt-get >/dev/null; then
        say "apt-get not found: please install $* with your package manager"; exit 1
    fi
    if [ "$APT_UPDATED" -eq 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# A C compiler and linker: Rust links with cc, and ring (TLS) builds C code.
if ! command -v cc >/dev/null; then
    say "installing gcc and libc headers (the Rust toolchain links with cc)"
    apt_install build-essential ca-certificates curl
fi

# The Rust toolchain. Debian's packaged cargo is too old for this workspace (edition 2024).
if ! command -v cargo >/dev/null; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        say "installing the Rust toolchain with rustup (cargo was not found)"
        command -v curl >/dev/null || apt_install curl ca-certificates
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component rustfmt,clippy >&2
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
fi

# A Vulkan driver. Without a GPU driver, Mesa's lavapipe runs Vulkan on the CPU.
vulkan_icd_present() {
    local icd found=0
    for icd in /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json; do
        [ -e "$icd" ] && found=1
    done
    [ "$found" -eq 1 ] || return 1
    # No pipe into grep -q here: under pipefail its early exit would fail the pipeline.
    local libs
    libs="$(ldconfig -p 2>/dev/null || true)"
    [[ "$libs" == *libvulkan.so.1* ]]
}
if ! vulkan_icd_present; then
    say "installing mesa-vulkan-drivers (no Vulkan driver found; it provides lavapipe, a software Vulkan adapter)"
    apt_install mesa-vulkan-drivers libvulkan1
fi

# The demo's data and the plot's font.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    say "installing dataset-fashion-mnist (the demo trains on Fashion-MNIST)"
    apt_install dataset-fashion-mnist
fi
if [ ! -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
    say "installing fonts-dejavu-core (labels of the training plot)"
    apt_install fonts-dejavu-core
fi

# Vulkan loaders complain on every start when XDG_RUNTIME_DIR is unset; harmless.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
    export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/strata-runtime-$(id -u)"
    mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
fi
