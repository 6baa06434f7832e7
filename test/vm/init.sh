#!/bin/busybox sh
# /init of the vmtest initramfs: mount what a cgroup v2 host has, delegate
# memory/pids/cpu from the root, run every test binary, report, power off.
# The marker nonce comes from run.sh so test output can never fake a result.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
echo "+memory +pids +cpu" > /sys/fs/cgroup/cgroup.subtree_control
# Loopback for tests that serve HTTP or unix sockets on 127.0.0.1.
ip link set lo up || ifconfig lo 127.0.0.1 up
hostname vmtest
. /etc/vmtest.env
export HOME=/tmp TMPDIR=/tmp
[ -x /bin/rbee-simworker ] && export RBEE_SIMWORKER=/bin/rbee-simworker
echo "VMTEST-BOOTED-$VMTEST_NONCE kernel=$(uname -r) cgroup2=$(cat /sys/fs/cgroup/cgroup.subtree_control) mem=$(awk '/MemTotal/{print $2}' /proc/meminfo)kB"
for t in /tests/*.test; do
	name=${t##*/}
	name=${name%.test}
	echo "VMTEST-BEGIN-$VMTEST_NONCE $name"
	# go test runs a package's tests in the package directory (testdata/).
	cd "/pkg/$name"
	# shellcheck disable=SC2086
	"$t" -test.v -test.timeout="$VMTEST_TEST_TIMEOUT" $VMTEST_ARGS
	rc=$?
	echo "VMTEST-RESULT-$VMTEST_NONCE $name rc=$rc"
done
echo "VMTEST-DONE-$VMTEST_NONCE"
sync
poweroff -f
