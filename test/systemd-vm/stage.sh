#!/usr/bin/env bash
# Stages what goes into the VM besides `make install`'s files: what an
# operator adds after installing (the API token, a config, a second
# instance's config), the test's watchdog drop-in and the runner unit.
#   stage.sh ROOT NONCE SCALE "EXPECTED NAMES" DEADLINE
set -euo pipefail
root=$1 nonce=$2 scale=$3 expected=$4 deadline=$5
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# `make install` creates the token only on a live install (a package's
# postinst would); this is that step.
install -d -m 0755 "$root/etc/rbee-hive"
(umask 077 && head -c 32 /dev/urandom | od -An -v -tx1 | tr -d ' \n' >"$root/etc/rbee-hive/api-token")

# The VM has well under the 2 GiB default memory_reserve; a small reserve
# lets admission place the test's workers. "leaky" is the sim backend told
# to grow without bound, for the OOM check.
cat >"$root/etc/rbee-hive/config.toml" <<'TOML'
[resources]
memory_reserve = "32MiB"
disk_reserve = "0"

# The checks' model file lives in /opt/rbee-sdtest; file: references must
# lie below a root.
[models]
file_roots = ["/var/lib/rbee-hive/models", "/opt/rbee-sdtest"]

[backends.leaky]
command = ["{self_dir}/rbee-simworker", "--port", "{port}", "--worker-id", "{worker_id}", "--model", "{model_path}", "--leak-mib-per-sec", "64"]
health = "notify"
load_timeout = "2m"
memory_limit = "48MiB"
TOML
cat >"$root/etc/rbee-hive/gpu1.toml" <<'TOML'
listen      = "127.0.0.1:9201"
runtime_dir = "/run/rbee-hive/gpu1"
state_dir   = "/var/lib/rbee-hive/gpu1"

[resources]
memory_reserve = "32MiB"
disk_reserve = "0"
TOML
chmod 0640 "$root/etc/rbee-hive/config.toml" "$root/etc/rbee-hive/gpu1.toml"

# The shipped WatchdogSec=30s would make the wedge check wait 30 s+ under
# TCG; a drop-in shortens it for this test only. It is in place from boot
# (a daemon-reload costs 10+ s under TCG), so every check runs with it and
# a spurious watchdog abort anywhere would show up in NRestarts. Scaled
# with the other waits for slow hosts.
install -d "$root/etc/systemd/system/rbee-hive.service.d"
cat >"$root/etc/systemd/system/rbee-hive.service.d/50-sdtest-watchdog.conf" <<UNIT
[Service]
WatchdogSec=$((10 * scale))s
UNIT

install -d "$root/opt/rbee-sdtest" "$root/etc/systemd/system/multi-user.target.wants"
install -m 0755 "$here/checks.sh" "$root/opt/rbee-sdtest/checks.sh"
cat >"$root/opt/rbee-sdtest/env" <<ENV
SDTEST_NONCE=$nonce
SDTEST_SCALE=$scale
SDTEST_EXPECTED="$expected"
SDTEST_DEADLINE=$deadline
ENV
cat >"$root/etc/systemd/system/rbee-sdtest.service" <<'UNIT'
[Unit]
Description=rbee-hive checks under systemd
After=multi-user.target
# poweroff-immediate: the overlay root cannot be unmounted anyway, and
# the results on the share were synced by checks.sh.
SuccessAction=poweroff-immediate
FailureAction=poweroff-immediate

[Service]
Type=exec
EnvironmentFile=/opt/rbee-sdtest/env
ExecStart=/opt/rbee-sdtest/checks.sh
# The check lines go straight to the serial console (no journald prefix);
# the checks' own output goes to a file on the share.
StandardOutput=tty
StandardError=journal
TTYPath=/dev/ttyS0
TTYReset=no
TTYVHangup=no
UNIT
ln -sf ../rbee-sdtest.service "$root/etc/systemd/system/multi-user.target.wants/rbee-sdtest.service"
