#!/usr/bin/env bash
# Install the Debian packages a one-node Slurm test cluster needs (slurmctld,
# slurmd, slurm-client, munge). Idempotent: does nothing when they are already
# there. Not root, or no apt-get: says why and exits 0, so CI can call it
# unconditionally and the Slurm test skips itself with the reason.
set -u

PACKAGES=(slurmctld slurmd slurm-client munge)

have_all() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null
}

ensure_munge_key() {
    # The munge package makes its key at install time; a machine that lost it gets a new one.
    if command -v mungekey >/dev/null && [ ! -f /etc/munge/munge.key ] && [ "$(id -u)" -eq 0 ]; then
        mungekey --create --keyfile=/etc/munge/munge.key && chown munge:munge /etc/munge/munge.key \
            && chmod 400 /etc/munge/munge.key && echo "install_slurm: created /etc/munge/munge.key"
    fi
}

if have_all; then
    ensure_munge_key
    echo "install_slurm: already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_slurm: skipped (needs root to install ${PACKAGES[*]})"
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install_slurm: skipped (no apt-get on this machine)"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || echo "install_slurm: apt-get update failed; trying the cached package lists"
if apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"; then
    ensure_munge_key
    echo "install_slurm: installed ${PACKAGES[*]}"
else
    echo "install_slurm: apt-get install failed; the Slurm test will be skipped"
fi
exit 0
