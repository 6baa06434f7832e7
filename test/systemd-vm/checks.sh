#!/bin/bash
# The checks inside the VM, run by rbee-sdtest.service once the system is
# up. Each prints exactly one line `SDTEST <nonce> PASS|FAIL <name> <detail>`
# on the console; everything else (commands and their output) goes to
# /mnt/sdtest/out/checks.log. The commands are the ones docs/operations.md
# shows under "Under systemd: verified recipes".
set -u
N=$SDTEST_NONCE
SCALE=${SDTEST_SCALE:-1}
OUT=/mnt/sdtest/out
LOG=$OUT/checks.log
TOKEN_FILE=/etc/rbee-hive/api-token
API=http://127.0.0.1:9200
MODEL=/opt/rbee-sdtest/model.gguf
CG=/sys/fs/cgroup
exec 3>&1 >>"$LOG" 2>&1
echo "SDTEST $N BOOTED uptime=$(cut -d' ' -f1 /proc/uptime) $(systemctl --version | head -n1)" >&3
echo "rbee-simworker placeholder" >"$MODEL"
# Before the host's timeout kills the VM, save the journal and say so, so a
# hung check still leaves its evidence.
if [ "${SDTEST_DEADLINE:-0}" -gt 0 ]; then
	(
		sleep $((SDTEST_DEADLINE - $(cut -d. -f1 /proc/uptime)))
		echo "SDTEST $N FAIL deadline checks still running at ${SDTEST_DEADLINE} s uptime" >&3
		journalctl -o export --no-pager >$OUT/journal.export; journalctl -o json --no-pager >$OUT/journal.json
		sync
		systemctl poweroff --force --force
	) &
	guard=$!
fi

# --- helpers ---------------------------------------------------------------
# check NAME FUNC: runs FUNC; its last line of stdout is the detail.
check() {
	local name=$1 fn=$2 out rc
	echo "=== $name $(cut -d' ' -f1 /proc/uptime)"
	out=$("$fn" 2>>"$LOG")
	rc=$?
	printf '%s\n' "$out"
	local detail
	detail=$(printf '%s\n' "$out" | tail -n1 | tr -d '\r' | cut -c1-200)
	if [ $rc = 0 ]; then
		echo "SDTEST $N PASS $name $detail" >&3
	else
		echo "SDTEST $N FAIL $name $detail" >&3
	fi
}
# say MSG: a failure reason (becomes the detail if it is the last line).
say() { echo "$*"; }
# waitfor SECONDS CMD...: polls CMD until it succeeds; SECONDS is scaled.
waitfor() {
	local end=$(($(date +%s) + ${1%.*} * SCALE))
	shift
	until "$@" >/dev/null 2>&1; do
		[ "$(date +%s)" -lt "$end" ] || return 1
		sleep 0.2
	done
}
api() { curl -sS --max-time $((10 * SCALE)) -H "Authorization: Bearer $(cat "$TOKEN_FILE")" "$@"; }
prop() { systemctl show -P "$2" "$1"; }
mainpid() { prop rbee-hive MainPID; }
cli() { rbee-hive "$@" --token-file "$TOKEN_FILE"; }
worker_state() { api "$API/v1/workers/$1" | jq -r .state; }
is_state() { [ "$(worker_state "$1")" = "$2" ]; }
spawn() { # spawn BACKEND MEMORY: prints the worker id
	cli workers spawn --backend "$1" --model "file:$MODEL" --memory "$2" --json | jq -r .worker_id
}
metric() { curl -sS "$API/metrics" | awk -v m="$1" '$1 == m {print $2}'; }

# --- checks -------------------------------------------------------------------
c_start_ready() {
	local t0=$(date +%s%N)
	timeout $((120 * SCALE)) systemctl start rbee-hive || { say "systemctl start failed: $(systemctl status rbee-hive --no-pager | tail -n 5)"; return 1; }
	local ms=$((($(date +%s%N) - t0) / 1000000))
	# Type=notify: start returns only after READY=1, which the hive sends
	# after binding its API, so the API answers at once, without retries.
	curl -sS --max-time 5 "$API/v1/health" | jq -e '.status' || { say "API not answering right after start returned"; return 1; }
	[ "$(prop rbee-hive ActiveState)/$(prop rbee-hive SubState)" = active/running ] || { say "not active/running"; return 1; }
	say "systemctl start returned after READY in ${ms} ms, API up"
}
c_status_line() {
	local s
	s=$(systemctl status rbee-hive --no-pager)
	echo "$s"
	printf '%s\n' "$s" | grep -E '^ +Status: "0 workers"' || { say "no STATUS line in systemctl status"; return 1; }
	say "$(printf '%s\n' "$s" | grep -E '^ +Status:' | sed 's/^ *//')"
}
c_credential_token() {
	local pid code
	pid=$(mainpid)
	# The hive reads the token from $CREDENTIALS_DIRECTORY; it is never in
	# its environment and it did not generate one of its own.
	tr '\0' '\n' </proc/$pid/environ | grep '^CREDENTIALS_DIRECTORY=' || { say "no CREDENTIALS_DIRECTORY"; return 1; }
	if tr '\0' '\n' </proc/$pid/environ | grep -q "$(cat $TOKEN_FILE)"; then say "token in the environment"; return 1; fi
	[ ! -e /var/lib/rbee-hive/api-token ] || { say "hive generated its own token"; return 1; }
	cmp "$(tr '\0' '\n' </proc/$pid/environ | sed -n 's/^CREDENTIALS_DIRECTORY=//p')/api-token" $TOKEN_FILE || { say "credential differs"; return 1; }
	code=$(api -o /dev/null -w '%{http_code}' "$API/v1/workers/list")
	[ "$code" = 200 ] || { say "token from /etc/rbee-hive/api-token: HTTP $code"; return 1; }
	code=$(curl -sS -o /dev/null -w '%{http_code}' -H "Authorization: Bearer wrong" "$API/v1/workers/list")
	[ "$code" = 401 ] || { say "wrong token: HTTP $code, want 401"; return 1; }
	say "LoadCredential=api-token: right token 200, wrong 401, none in env or state dir"
}
c_supervisor_leaf() {
	local cg
	cg=$(cat /proc/$(mainpid)/cgroup)
	[ "$cg" = "0::/rbee.slice/rbee-hive.service/supervisor" ] || { say "hive in $cg"; return 1; }
	say "hive in $cg"
}
W1=
c_worker_cgroup() {
	local id pid cg max
	id=$(spawn sim 128MiB) && [ -n "$id" ] && [ "$id" != null ] || { say "spawn failed"; return 1; }
	W1=$id
	echo "$id" >$OUT/w1
	waitfor 60 is_state "$id" idle || { say "$id not idle: $(worker_state "$id")"; return 1; }
	pid=$(api "$API/v1/workers/$id" | jq -r .pid)
	cg=$(cat /proc/$pid/cgroup)
	[ "$cg" = "0::/rbee.slice/rbee-hive.service/workers/$id" ] || { say "worker in $cg"; return 1; }
	max=$(cat $CG/rbee.slice/rbee-hive.service/workers/$id/memory.max)
	[ "$max" = 134217728 ] || { say "memory.max $max"; return 1; }
	# STATUS= follows the workers.
	waitfor 10 sh -c '[ "$(systemctl show -P StatusText rbee-hive)" = "1 worker: 1 idle" ]' ||
		{ say "StatusText '$(prop rbee-hive StatusText)'"; return 1; }
	say "$id in ${cg#0::} memory.max=$max"
}
# The shipped unit's CapabilityBoundingSet= (docs/security.md), as the
# kernel numbers the capabilities.
UNIT_CAPS="cap_chown cap_dac_override cap_kill cap_setgid cap_setuid cap_setpcap"
declare -A CAPBIT=([cap_chown]=0 [cap_dac_override]=1 [cap_kill]=5 [cap_setgid]=6 [cap_setuid]=7 [cap_setpcap]=8)
capmask() { # capmask NAMES...: the 16-digit hex mask /proc/<pid>/status shows
	local m=0 c
	for c in "$@"; do
		[ -n "${CAPBIT[$c]:-}" ] || { echo "unknown capability $c" >&2; return 1; }
		m=$((m | 1 << ${CAPBIT[$c]}))
	done
	printf '%016x\n' "$m"
}
status_field() { awk -v k="$2:" '$1 == k {print $2}' /proc/$1/status; }
c_hive_capbnd() {
	local pid names want bnd eff nnp
	pid=$(mainpid)
	names=$(prop rbee-hive CapabilityBoundingSet)
	[ "$(printf '%s\n' $names | sort | paste -sd' ')" = "$(printf '%s\n' $UNIT_CAPS | sort | paste -sd' ')" ] ||
		{ say "unit CapabilityBoundingSet='$names', want '$UNIT_CAPS'"; return 1; }
	want=$(capmask $UNIT_CAPS) || { say "cannot compute the mask"; return 1; }
	grep -E '^(Uid|Cap|NoNewPrivs)' /proc/$pid/status
	bnd=$(status_field "$pid" CapBnd) eff=$(status_field "$pid" CapEff) nnp=$(status_field "$pid" NoNewPrivs)
	[ "$bnd" = "$want" ] || { say "hive CapBnd $bnd, want $want ($UNIT_CAPS)"; return 1; }
	# Root keeps all of its bounding set effective; nothing beyond it.
	[ "$eff" = "$want" ] || { say "hive CapEff $eff, want $want"; return 1; }
	[ "$nnp" = 1 ] || { say "hive NoNewPrivs $nnp"; return 1; }
	# The hive did its work under that set: worker-cgroup spawned a worker
	# into its leaf; the later checks kill, OOM and drain workers.
	say "hive pid $pid CapBnd=CapEff=$bnd ($(prop rbee-hive CapabilityBoundingSet)), NoNewPrivs=1"
}
c_worker_privs() {
	local id pid uid bnd eff prm inh amb nnp want
	id=$(cat $OUT/w1)
	pid=$(api "$API/v1/workers/$id" | jq -r .pid)
	[ -n "$pid" ] && [ -d /proc/$pid ] || { say "worker $id pid '$pid' gone"; return 1; }
	grep -E '^(Uid|Gid|Groups|Cap|NoNewPrivs)' /proc/$pid/status
	uid=$(status_field "$pid" Uid) bnd=$(status_field "$pid" CapBnd) eff=$(status_field "$pid" CapEff)
	prm=$(status_field "$pid" CapPrm) inh=$(status_field "$pid" CapInh) amb=$(status_field "$pid" CapAmb)
	nnp=$(status_field "$pid" NoNewPrivs)
	want=$(capmask $UNIT_CAPS) || return 1
	# Every worker: no_new_privs and nothing outside the unit's bounding set.
	[ "$nnp" = 1 ] || { say "worker NoNewPrivs $nnp"; return 1; }
	[ $((0x$bnd & ~0x$want)) = 0 ] || { say "worker CapBnd $bnd exceeds the unit's $want"; return 1; }
	[ "$inh" = 0000000000000000 ] && [ "$amb" = 0000000000000000 ] || { say "worker CapInh $inh CapAmb $amb"; return 1; }
	if [ "$uid" = 0 ]; then
		# Workers still run as root here (per-worker uids are not wired
		# into the supervisor yet): root keeps the unit's set, no more.
		[ "$eff" = "$want" ] && [ "$bnd" = "$want" ] || { say "root worker CapEff $eff CapBnd $bnd, want $want"; return 1; }
		say "worker $id pid $pid uid 0 (root worker), CapBnd=CapEff=$bnd (the unit's set), NoNewPrivs=1"
		return 0
	fi
	# An isolated worker: its own uid, every capability set empty.
	for v in "$eff" "$prm" "$bnd"; do
		[ "$v" = 0000000000000000 ] || { say "worker uid $uid CapEff $eff CapPrm $prm CapBnd $bnd, want all 0"; return 1; }
	done
	say "worker $id pid $pid uid $uid, CapEff=CapPrm=CapBnd=0, NoNewPrivs=1"
}
c_file_roots() {
	local code body p codes=""
	# Outside models.file_roots: 400 before any stat, the same for a file
	# that exists, one that does not, and one below a root-only directory.
	install -d -m 0700 /root/sdtest-closed && echo x >/root/sdtest-closed/m.gguf
	for p in /etc/shadow /etc/nonexistent.gguf /root/sdtest-closed/m.gguf; do
		code=$(api -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
			-d "{\"model_ref\":\"file:$p\",\"backend\":\"sim\",\"device\":0}" "$API/v1/workers/spawn")
		[ "$code" = 400 ] || { say "spawn file:$p: HTTP $code, want 400"; return 1; }
		body=$(api -X POST -H 'Content-Type: application/json' -d "{\"model_ref\":\"file:$p\"}" "$API/v1/models/download")
		echo "$body"
		printf '%s\n' "$body" | jq -e '.error.code == "VALIDATION_ERROR" and (.error.message | contains("models.file_roots"))' >/dev/null ||
			{ say "download file:$p: $body"; return 1; }
		codes="$codes $code"
	done
	# Inside a root (the staged config adds /opt/rbee-sdtest): accepted.
	code=$(api -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' -d "{\"model_ref\":\"file:$MODEL\"}" "$API/v1/models/download")
	[ "$code" = 200 ] || { say "download file:$MODEL: HTTP $code"; return 1; }
	say "file: outside models.file_roots:$codes (spawn) and VALIDATION_ERROR (download); file:$MODEL 200"
}
c_journal_worker() {
	local id out hive
	id=$(cat $OUT/w1)
	# One worker's own output: native entries from the hive, filed under
	# its unit with the worker's id.
	out=$(journalctl RBEE_WORKER_ID=$id --no-pager -o json)
	echo "$out"
	printf '%s\n' "$out" | jq -se 'length > 0 and all(.SYSLOG_IDENTIFIER == "rbee-worker" and ._SYSTEMD_UNIT == "rbee-hive.service")' ||
		{ say "journalctl RBEE_WORKER_ID=$id: not only rbee-worker entries of rbee-hive.service"; return 1; }
	journalctl RBEE_WORKER_ID=$id --no-pager | grep -q 'listening' || { say "no 'listening' line of the worker"; return 1; }
	# The hive's records about it.
	hive=$(journalctl -u rbee-hive WORKER_ID=$id --no-pager -o json)
	printf '%s\n' "$hive" | jq -se 'length > 0 and all(.SYSLOG_IDENTIFIER == "rbee-hive")' || { say "journalctl -u rbee-hive WORKER_ID=$id: no hive records"; return 1; }
	journalctl -u rbee-hive WORKER_ID=$id TO=idle --no-pager | grep -q 'worker state' || { say "no 'worker state' to idle record"; return 1; }
	say "RBEE_WORKER_ID=$id: $(printf '%s\n' "$out" | wc -l) worker lines; -u rbee-hive WORKER_ID=$id: $(printf '%s\n' "$hive" | wc -l) hive records"
}
c_oom_continue() {
	local pid0 id reason
	pid0=$(mainpid)
	# Nothing at err before the OOM: c_journal_err checks what it adds.
	journalctl -u rbee-hive -p err --no-pager -o cat >$OUT/err-before
	id=$(cli workers spawn --backend leaky --model "file:$MODEL" --restart never --json | jq -r .worker_id)
	[ -n "$id" ] && [ "$id" != null ] || { say "spawn failed"; return 1; }
	echo "$id" >$OUT/w-oom
	waitfor 90 sh -c "curl -sS -H 'Authorization: Bearer $(cat $TOKEN_FILE)' $API/v1/workers/$id | jq -e '.exit_reason == \"oom\"'" ||
		{ say "no oom: $(api "$API/v1/workers/$id")"; return 1; }
	api "$API/v1/workers/$id"
	[ "$(mainpid)" = "$pid0" ] && [ "$(prop rbee-hive ActiveState)" = active ] || { say "hive did not survive"; return 1; }
	[ "$(prop rbee-hive NRestarts)" = 0 ] || { say "NRestarts $(prop rbee-hive NRestarts)"; return 1; }
	say "$id exit_reason=oom ($(grep -h oom_kill $CG/rbee.slice/rbee-hive.service/memory.events)); hive pid $pid0 still active, NRestarts=0"
}
c_journal_err() {
	local id out
	id=$(cat $OUT/w-oom)
	[ ! -s $OUT/err-before ] || { say "err entries before the OOM: $(head -n1 $OUT/err-before)"; return 1; }
	waitfor 10 sh -c "journalctl -u rbee-hive -p err WORKER_ID=$id --no-pager | grep -q 'OOM killer'" ||
		{ say "no OOM error for $id: $(journalctl -u rbee-hive -p err --no-pager -o cat | tail -n 2)"; return 1; }
	out=$(journalctl -u rbee-hive -p err --no-pager)
	echo "$out"
	journalctl -u rbee-hive EXIT_REASON=oom --no-pager -o json | jq -se "length > 0 and all(.WORKER_ID == \"$id\")" ||
		{ say "journalctl -u rbee-hive EXIT_REASON=oom does not name $id"; return 1; }
	say "-p err: $(journalctl -u rbee-hive -p err --no-pager -o cat | sort | uniq -c | tr -s ' ' | paste -sd';'), none before the OOM; EXIT_REASON=oom names $id"
}
c_instance_gpu1() {
	timeout $((120 * SCALE)) systemctl start rbee-hive@gpu1 || { say "start failed"; return 1; }
	local cg1 cg0
	cg1=$(cat /proc/$(prop rbee-hive@gpu1 MainPID)/cgroup)
	cg0=$(cat /proc/$(mainpid)/cgroup)
	[ "$cg1" = "0::/rbee.slice/rbee-hive@gpu1.service/supervisor" ] || { say "gpu1 in $cg1"; return 1; }
	[ "$cg0" = "0::/rbee.slice/rbee-hive.service/supervisor" ] || { say "main in $cg0"; return 1; }
	curl -sS --max-time 5 http://127.0.0.1:9201/v1/health | jq -e .status || { say "gpu1 API"; return 1; }
	[ -S /run/rbee-hive/gpu1/notify.sock ] || { say "no /run/rbee-hive/gpu1/notify.sock"; return 1; }
	systemctl status rbee.slice --no-pager
	say "rbee-hive@gpu1 beside rbee-hive in rbee.slice: ${cg1#0::}, ${cg0#0::}"
}
c_watchdog_restart() {
	local pid0 n0
	pid0=$(mainpid) n0=$(prop rbee-hive NRestarts)
	[ "$n0" = 0 ] || { say "NRestarts $n0 before the wedge (a spurious watchdog abort?)"; return 1; }
	kill -STOP "$pid0"
	waitfor 60 sh -c "[ \$(systemctl show -P NRestarts rbee-hive) -gt $n0 ] && [ \$(systemctl show -P ActiveState rbee-hive) = active ]" ||
		{ say "no restart after SIGSTOP: $(systemctl status rbee-hive --no-pager | head -n 5)"; return 1; }
	journalctl -u rbee-hive --no-pager -o cat | grep 'Watchdog timeout' || { say "no 'Watchdog timeout' in the journal"; return 1; }
	journalctl -u rbee-hive --no-pager -o cat | grep "Failed with result 'watchdog'" || { say "no result 'watchdog'"; return 1; }
	[ "$(mainpid)" != "$pid0" ] || { say "same pid"; return 1; }
	say "SIGSTOP $pid0 -> $(journalctl -u rbee-hive --no-pager -o cat | grep -m1 'Watchdog timeout') -> restarted as $(mainpid)"
}
c_sigkill_restart() {
	local pid0 n0
	pid0=$(mainpid) n0=$(prop rbee-hive NRestarts)
	systemctl kill -s SIGKILL rbee-hive
	waitfor 60 sh -c "[ \$(systemctl show -P NRestarts rbee-hive) -gt $n0 ] && [ \$(systemctl show -P ActiveState rbee-hive) = active ]" ||
		{ say "no restart after SIGKILL"; return 1; }
	[ "$(mainpid)" != "$pid0" ] || { say "same pid"; return 1; }
	curl -sS --max-time 5 "$API/v1/health" | jq -e .status || { say "API down after restart"; return 1; }
	say "SIGKILL $pid0 -> restarted as $(mainpid), NRestarts $(prop rbee-hive NRestarts)"
}
c_stop_drain() {
	local id t0 ms
	id=$(spawn sim 128MiB) && [ -n "$id" ] && [ "$id" != null ] || { say "spawn failed"; return 1; }
	waitfor 60 is_state "$id" idle || { say "$id not idle"; return 1; }
	local since=$(date '+%Y-%m-%d %H:%M:%S')
	t0=$(date +%s%N)
	timeout $((120 * SCALE)) systemctl stop rbee-hive || { say "stop failed"; return 1; }
	ms=$((($(date +%s%N) - t0) / 1000000))
	journalctl -u rbee-hive --since "$since" --no-pager
	[ "$(prop rbee-hive Result)" = success ] || { say "Result=$(prop rbee-hive Result) (TimeoutStopSec hit?)"; return 1; }
	[ ! -d $CG/rbee.slice/rbee-hive.service ] || { say "cgroup left: $(cat $CG/rbee.slice/rbee-hive.service/cgroup.procs)"; return 1; }
	# The hive stopped its worker itself (SIGTERM, the worker's own
	# "stopping" line) and summed up; systemd's final SIGKILL found nothing.
	journalctl -u rbee-hive --since "$since" --no-pager -o cat | grep -q 'SIGKILL' && { say "something was SIGKILLed"; return 1; }
	journalctl RBEE_WORKER_ID=$id --since "$since" --no-pager | grep -q 'msg=stopping.*why=terminated' || { say "worker did not see SIGTERM"; return 1; }
	journalctl -u rbee-hive --since "$since" --no-pager | grep -q 'workers shut down' || { say "no 'workers shut down' line"; return 1; }
	say "systemctl stop with $id running: ${ms} ms (budget 30 s), Result=success, cgroup gone"
}
# sendqueued N: N datagrams into the socket while the hive is down (the
# first starts it), then waits until the restarted hive has counted all N
# with their sender's credentials. systemd-notify sends with the pid of its
# parent, this shell, which is in no worker's leaf: unknown_sender.
sendqueued() {
	local n=$1 i
	for i in $(seq "$n"); do
		NOTIFY_SOCKET=/run/rbee-hive/notify.sock systemd-notify "WATCHDOG=1" || { say "send $i failed"; return 1; }
	done
	waitfor 60 sh -c "[ \$(systemctl show -P ActiveState rbee-hive) = active ]" || { say "hive not started by the socket"; return 1; }
	waitfor 20 sh -c "curl -sS $API/metrics | grep -q 'rbee_hive_heartbeats_rejected_total{reason=\"unknown_sender\"} $n\$'" ||
		{ say "not all $n attributed: $(curl -sS $API/metrics | grep rbee_hive_heartbeats_rejected_total)"; return 1; }
	curl -sS $API/metrics | grep rbee_hive_heartbeats_rejected_total
	if curl -sS $API/metrics | grep -q 'reason="no_credentials"} [1-9]'; then say "datagrams without credentials"; return 1; fi
}
c_notify_socket() {
	local pid1
	# Three starts of the hive so far; this check adds two. reset-failed
	# clears the start limit (StartLimitBurst=5 in 300 s).
	systemctl reset-failed rbee-hive
	systemctl start rbee-hive-notify.socket || { say "socket start failed"; return 1; }
	[ "$(prop rbee-hive ActiveState)" = inactive ] || { say "hive not stopped"; return 1; }
	sendqueued 10 || return 1
	pid1=$(mainpid)
	# A stop of the hive alone leaves systemd's socket in place, still
	# listening; what is sent meanwhile waits for the next hive.
	timeout $((120 * SCALE)) systemctl stop rbee-hive || { say "stop failed"; return 1; }
	[ -S /run/rbee-hive/notify.sock ] || { say "the hive's stop removed /run/rbee-hive/notify.sock"; return 1; }
	[ "$(prop rbee-hive-notify.socket SubState)" = listening ] || { say "socket $(prop rbee-hive-notify.socket SubState)"; return 1; }
	sendqueued 5 || return 1
	[ "$(mainpid)" != "$pid1" ] || { say "same hive"; return 1; }
	say "10 datagrams sent while the hive was down, 5 more across a stop: each batch socket-activated a new hive and all were attributed by sender pid (unknown_sender, none no_credentials)"
}
c_security() {
	local out
	out=$(timeout $((120 * SCALE)) systemd-analyze security rbee-hive --no-pager) || { say "systemd-analyze security failed"; return 1; }
	echo "$out"
	printf '%s\n' "$out" >$OUT/security.txt
	printf '%s\n' "$out" | grep -o 'Overall exposure level for rbee-hive.service: .*' || { say "no exposure line"; return 1; }
}

for name in $SDTEST_EXPECTED; do
	check "$name" "c_${name//-/_}"
done

[ -z "${guard:-}" ] || kill "$guard"
journalctl -o export --no-pager >$OUT/journal.export 2>/dev/null
journalctl -o json --no-pager >$OUT/journal.json 2>/dev/null
systemctl stop rbee-hive rbee-hive@gpu1 rbee-hive-notify.socket
echo "SDTEST $N DONE uptime=$(cut -d' ' -f1 /proc/uptime)" >&3
sync
