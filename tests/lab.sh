#!/usr/bin/env bash
# tests/lab.sh - run a command where a real verbs device and tc netem exist, even on a host without them.
#
#   tests/lab.sh 'python -m pytest -q tests/rdma tests/faults'
#
# With an active RDMA device on this host (or MOONLET_LAB=direct), the command runs here.
# Otherwise a throwaway guest is booted under qemu: Debian's 6.1 kernel, which has
# soft-RoCE (rdma_rxe), network namespaces, veth and netem, with this machine's file
# system as its root (9p, read-only except the current directory).  Inside it a dummy
# netdev carries one rxe device, rxe0; both sides of every RDMA test share it, and the
# fault tests' namespaces hang off a bridge, so no traffic ever leaves the guest.
# The command's exit code is this script's; 124 means the guest ran out of time,
# 125 that it could not boot or set up rxe.
#
# Knobs: MOONLET_LAB_TIMEOUT (s, default 900), MOONLET_LAB_MEM (default 2G),
# MOONLET_LAB_MTU (netdev MTU, default 1500), MOONLET_LAB_HOME (virtme-ng venv,
# default /opt/moonlet-rdma-lab), MOONLET_LAB=direct|guest (default: auto).
set -uo pipefail
[ $# -ge 1 ] || { sed -n '2,17s/^# \{0,1\}//p' "$0"; exit 2; }
CMD="$*"
say() { echo "[rdma-lab] $*" >&2; }

has_device() { ls /sys/class/infiniband/*/ports/*/state 2>/dev/null | xargs -r grep -l ACTIVE | grep -q .; }
if [ "${MOONLET_LAB:-auto}" = direct ] || { [ "${MOONLET_LAB:-auto}" = auto ] && has_device; }; then
    say "running on this host's RDMA device"
    exec bash -c "$CMD"
fi

HOME_DIR=${MOONLET_LAB_HOME:-/opt/moonlet-rdma-lab}
PKGS="qemu-system-x86 linux-image-amd64 rdma-core ibverbs-utils perftest busybox-static iproute2 kmod python3-venv"
missing=0
for tool in qemu-system-x86_64 busybox modprobe ip rdma ib_write_bw; do command -v "$tool" >/dev/null || missing=1; done
ls /lib/modules/6.1.*-amd64/kernel/drivers/infiniband/sw/rxe/rdma_rxe.ko* >/dev/null 2>&1 || missing=1
if [ $missing = 1 ]; then
    say "installing $PKGS (once)"
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null &&
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $PKGS >/tmp/moonlet-lab-apt.log 2>&1 ||
        { tail -20 /tmp/moonlet-lab-apt.log >&2; say "apt-get failed"; exit 125; }
fi
if [ ! -x "$HOME_DIR/venv/bin/vng" ]; then
    say "installing virtme-ng into $HOME_DIR/venv (once)"
    mkdir -p "$HOME_DIR" && /usr/bin/python3 -m venv "$HOME_DIR/venv" &&
        "$HOME_DIR/venv/bin/pip" install -q "virtme-ng==1.42" >"$HOME_DIR/pip.log" 2>&1 ||
        { tail -20 "$HOME_DIR/pip.log" >&2; say "pip install virtme-ng failed"; exit 125; }
fi
KVER=$(ls -1 /lib/modules | grep -E '^6\.1\..*-amd64$' | sort -V | tail -1)
[ -n "$KVER" ] && [ -r "/boot/vmlinuz-$KVER" ] || { say "no 6.1 guest kernel in /boot"; exit 125; }

# Hardware KVM only when the CPU advertises it (a PVM-only /dev/kvm cannot boot a stock kernel).
ACCEL=(--disable-kvm)
if [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo && [ ! -d /sys/module/kvm_pvm ]; then ACCEL=(); fi

RUN=$(mktemp -d /tmp/moonlet-lab.XXXXXX)
trap 'rm -rf "$RUN"' EXIT
{
    echo '#!/bin/bash'
    # the caller's environment, minus what belongs to this shell
    for v in $(compgen -e); do
        case $v in PWD|OLDPWD|SHLVL|_|HOSTNAME|TERM|TMPDIR|SSH_*|XDG_*|DBUS_*|BASH_*) continue ;; esac
        printf 'export %s=%q\n' "$v" "${!v}"
    done
    printf 'RUN=%q CMD=%q MTU=%q WORKDIR=%q\n' "$RUN" "$CMD" "${MOONLET_LAB_MTU:-1500}" "$PWD"
    cat <<'GUEST'
bail() { echo "[rdma-lab] guest setup failed: $*" >&2; echo 125 > "$RUN/rc"; exit 125; }
modprobe -a rdma_rxe ib_uverbs >/dev/null 2>&1 || bail "modprobe rdma_rxe"
ip link set lo up && ip link add rxenet0 type dummy && ip link set rxenet0 mtu "$MTU" up &&
    ip addr add 192.0.2.1/32 dev rxenet0 || bail "rxenet0"
rdma link add rxe0 type rxe netdev rxenet0 || bail "rdma link add"
for _ in $(seq 100); do grep -q ACTIVE /sys/class/infiniband/rxe0/ports/1/state 2>/dev/null && break; sleep 0.1; done
grep -q ACTIVE /sys/class/infiniband/rxe0/ports/1/state || bail "rxe0 not active"
for _ in $(seq 50); do grep -q ffff:c000:0201 /sys/class/infiniband/rxe0/ports/1/gids/* 2>/dev/null && break; sleep 0.1; done
ulimit -l unlimited
export MOONLET_RDMA_LAB=rxe0 XDG_CACHE_HOME=/tmp/.cache
cd "$WORKDIR" || bail "cd $WORKDIR"
bash -c "$CMD"
echo $? > "$RUN/rc"
GUEST
} > "$RUN/guest.sh"
chmod +x "$RUN/guest.sh"

# Modules udev would load for the emulated PC; none is needed and they slow a TCG boot.
SKIP=kvm,kvm_amd,kvm_intel,ahci,libahci,libata,sr_mod,cdrom,sg,psmouse,pcspkr,iTCO_wdt,i2c_i801,lpc_ich,ccp,aesni_intel,ghash_clmulni_intel,crc32_pclmul,crct10dif_pclmul,serio_raw,evdev,button,qemu_fw_cfg
say "booting $KVER under qemu (${ACCEL[*]:-kvm})"
# qemu reopens /proc/self/fd/1 and 2 with O_TRUNC: give it pipes, never the caller's files.
PATH="$HOME_DIR/venv/bin:$PATH" timeout -k 20 "${MOONLET_LAB_TIMEOUT:-900}" vng --run "/boot/vmlinuz-$KVER" \
    --user root --force-9p "${ACCEL[@]}" --memory "${MOONLET_LAB_MEM:-2G}" --cpus "$(nproc)" \
    --rwdir "$RUN" --rwdir "$PWD" --append "module_blacklist=$SKIP" -- "bash $RUN/guest.sh" </dev/null 2>&1 | cat
vng_rc=${PIPESTATUS[0]}
if [ -s "$RUN/rc" ]; then rc=$(cat "$RUN/rc"); elif [ "$vng_rc" = 124 ]; then rc=124; else rc=125; fi
say "exit code $rc"
exit "$rc"
