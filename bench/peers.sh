#!/bin/sh
# The hive against peers in one run (bench/peers/main.go): crash → restarted
# and idle CPU/RSS against supervisord, the heartbeat path against a raw Go
# unixgram receiver. Installs Debian's supervisor package when supervisord is
# missing, and leaves no supervisord daemon of the package running (the
# benchmark starts its own in the foreground). Run as root.
# Env: PEERS_WORKERS (100), PEERS_KILLS (10), PEERS_WINDOW (30s),
#      PEERS_PHASES (crash,idle,heartbeat).
set -eu
cd "$(dirname "$0")/.."
if ! command -v supervisord >/dev/null 2>&1; then
	# policy-rc.d 101: the package's postinst must not start its daemon.
	had_policy=; [ -e /usr/sbin/policy-rc.d ] && had_policy=1
	[ -n "$had_policy" ] || printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
	chmod +x /usr/sbin/policy-rc.d
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends supervisor
	[ -n "$had_policy" ] || rm -f /usr/sbin/policy-rc.d
fi
# Never started at boot; stopped now where systemd runs (--no-reload also
# works without systemd as PID 1: it only removes the enablement links).
if command -v systemctl >/dev/null 2>&1 && [ -e /lib/systemd/system/supervisor.service ]; then
	if [ -d /run/systemd/system ]; then
		systemctl disable --now supervisor.service >/dev/null 2>&1 || true
	else
		systemctl --no-reload disable supervisor.service >/dev/null 2>&1 || true
	fi
fi
# Without systemd as PID 1 the package daemon, if one was started, has this
# pidfile (the package's /etc/supervisor/supervisord.conf).
if [ -s /var/run/supervisord.pid ] && kill -0 "$(cat /var/run/supervisord.pid)" 2>/dev/null; then
	/etc/init.d/supervisor stop || true
fi
go build -o bin/rbee-hive ./cmd/rbee-hive
go build -o bin/rbee-simworker ./cmd/rbee-simworker
go build -o bin/peers ./bench/peers
exec bin/peers -bin bin -workers "${PEERS_WORKERS:-100}" -kills "${PEERS_KILLS:-10}" \
	-window "${PEERS_WINDOW:-30s}" -phases "${PEERS_PHASES:-crash,idle,heartbeat}"
