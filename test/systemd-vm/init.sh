#!/bin/busybox sh
# /init of the systemd VM's initramfs: the host's / (read-only 9p) under a
# tmpfs overlay becomes the root; the hive is copied in from its
# `make install DESTDIR=` staging tree, the host's own services are kept
# from starting, and systemd 252 takes over as PID 1.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
die() { echo "SDTEST-INIT-FAIL $*"; poweroff -f; }
# No modules.dep in the initramfs: dependencies first.
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
	9pnet 9pnet_virtio netfs fscache 9p overlay; do
	insmod "/modules/$m.ko" || die "insmod $m"
done
opts=trans=virtio,version=9p2000.L,msize=524288
mkdir -p /lower /rw /newroot
mount -t 9p -o "$opts,ro,cache=loose" hostroot /lower || die "mount hostroot"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot || die "mount overlay"
R=/newroot
mkdir -p $R/mnt/sdtest
mount -t 9p -o "$opts" sdshare $R/mnt/sdtest || die "mount sdshare"
S=$R/mnt/sdtest
. $S/test/sdtest.env

# The host's own services stay down: no enablement links, no generators.
rm -rf $R/etc/systemd/system/*.wants $R/etc/systemd/system/*.requires
rm -f $R/.dockerenv $R/etc/systemd/system/dbus-org.freedesktop.timesync1.service
# A hive the host ran outside systemd (`make run`) left its state and config
# in the host's /: the VM starts from neither (whiteouts in the overlay; the
# host is untouched).
rm -rf $R/var/lib/rbee-hive $R/var/lib/private/rbee-hive $R/run/rbee-hive $R/etc/rbee-hive
mkdir -p $R/etc/systemd/system-generators
for g in $R/lib/systemd/system-generators/*; do ln -sf /dev/null "$R/etc/systemd/system-generators/${g##*/}"; done
for u in getty.target dbus.service dbus.socket systemd-logind.service systemd-timesyncd.service \
	systemd-pstore.service systemd-remount-fs.service systemd-firstboot.service systemd-repart.service \
	systemd-binfmt.service proc-sys-fs-binfmt_misc.automount systemd-machine-id-commit.service \
	systemd-journal-flush.service systemd-update-utmp.service systemd-update-utmp-runlevel.service \
	systemd-tmpfiles-clean.timer systemd-ask-password-wall.path systemd-ask-password-console.path \
	systemd-random-seed.service ldconfig.service systemd-hwdb-update.service systemd-udev-trigger.service \
	systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket \
	systemd-pcrphase.service systemd-pcrphase-sysinit.service remote-fs.target \
	e2scrub_reap.service postgresql.service prometheus.service; do
	ln -sf /dev/null "$R/etc/systemd/system/$u"
done
mkdir -p $R/etc/systemd/journald.conf.d
printf '[Journal]\nStorage=volatile\nRateLimitBurst=0\n' >$R/etc/systemd/journald.conf.d/sdtest.conf
# tmpfiles would otherwise delete the host's /tmp file by file through the overlay.
mount -t tmpfs tmpfs $R/tmp
mount -t tmpfs tmpfs $R/var/tmp
: >$R/etc/machine-id

# The hive as `make install DESTDIR=` staged it, then what the operator
# adds (token, config) and the test runner.
cp -a $S/install/. $R/ || die "copy install tree"
cp -a $S/test/root/. $R/ || die "copy test tree"
echo "SDTEST-INIT-$SDTEST_NONCE switch_root after $(cut -d' ' -f1 /proc/uptime)s"
umount /proc /sys
exec switch_root $R /lib/systemd/systemd
