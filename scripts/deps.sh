#!/usr/bin/env bash
# Installs the apt packages given as arguments when any is missing, and mounts bpffs.
# Idempotent: a machine that has everything is left alone.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
	echo "vnetbpf needs root for its datapath and tests (BPF, network namespaces): run as root" >&2
	exit 1
fi
command -v go >/dev/null || { echo "go is not on PATH (expected Go 1.26 at /usr/local/go)" >&2; exit 1; }

missing=()
for p in "$@"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo ">> installing ${missing[*]} (apt)"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! mount | grep -q ' /sys/fs/bpf type bpf '; then
	echo ">> mounting bpffs at /sys/fs/bpf"
	mount -t bpf bpf /sys/fs/bpf
fi
