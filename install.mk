# install.mk: `make install` / `make uninstall` for rbee-hive as a systemd
# service. Included from the Makefile; paths are relative to the repository
# root.
#
#   make install                              # this host: /usr/local, daemon-reload
#   make install DESTDIR=/tmp/pkg PREFIX=/usr # staging for a package
#
# Installs bin/rbee-hive, bin/rbee-gate and bin/rbee-simworker, the units (into
# $(PREFIX)/lib/systemd/system, systemd's path for locally installed
# software, so /etc/systemd/system stays the administrator's), the sample
# config only if none exists, and, on a live install, a random API token.

PREFIX           ?= /usr/local
DESTDIR          ?=
INSTALL          ?= install
# Where the build put the binaries.
RBEE_BIN_SRC     ?= bin
RBEE_UNIT_DIR    ?= $(PREFIX)/lib/systemd/system
RBEE_CONF_DIR    ?= /etc/rbee-hive
RBEE_DOC_DIR     ?= $(PREFIX)/share/doc/rbee-hive
# The drop-in with systemd >= 254 settings is installed only for such a
# systemd. Packagers set this to the target distribution's version.
SYSTEMD_VERSION  ?= $(shell systemctl --version 2>/dev/null | awk 'NR == 1 { print $$2 + 0 }')

RBEE_UNITS   := rbee-hive.service rbee-hive@.service rbee.slice rbee-hive-notify.socket
RBEE_DROPINS := rbee-hive.service.d/50-systemd-254.conf rbee-hive@.service.d/50-systemd-254.conf

.PHONY: install install-bin install-units install-config uninstall

install: install-bin install-units install-config
ifeq ($(DESTDIR),)
	@if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "Installed. Start it with: systemctl enable --now rbee-hive"
endif

# rbee-gate goes beside rbee-hive: the hive looks for its spawn gate there.
install-bin: $(RBEE_BIN_SRC)/rbee-hive $(RBEE_BIN_SRC)/rbee-gate $(RBEE_BIN_SRC)/rbee-simworker
	$(INSTALL) -D -m 0755 $(RBEE_BIN_SRC)/rbee-hive $(DESTDIR)$(PREFIX)/bin/rbee-hive
	$(INSTALL) -D -m 0755 $(RBEE_BIN_SRC)/rbee-gate $(DESTDIR)$(PREFIX)/bin/rbee-gate
	$(INSTALL) -D -m 0755 $(RBEE_BIN_SRC)/rbee-simworker $(DESTDIR)$(PREFIX)/bin/rbee-simworker

# The units name /usr/local/bin/rbee-hive; another PREFIX is written into
# the installed copies.
install-units:
	@for u in $(RBEE_UNITS); do \
		$(INSTALL) -D -m 0644 systemd/units/$$u $(DESTDIR)$(RBEE_UNIT_DIR)/$$u || exit 1; \
		sed -i 's|/usr/local/bin/rbee-hive|$(PREFIX)/bin/rbee-hive|g' $(DESTDIR)$(RBEE_UNIT_DIR)/$$u || exit 1; \
	done
	@if [ -n "$(SYSTEMD_VERSION)" ] && [ "$(SYSTEMD_VERSION)" -ge 254 ]; then \
		for d in $(RBEE_DROPINS); do \
			$(INSTALL) -D -m 0644 systemd/units/$$d $(DESTDIR)$(RBEE_UNIT_DIR)/$$d || exit 1; \
		done; \
	else \
		echo "systemd '$(SYSTEMD_VERSION)' < 254: skipping the DelegateSubgroup=/RestartSteps= drop-in (the hive moves itself into supervisor/)"; \
		for d in $(RBEE_DROPINS); do rm -f $(DESTDIR)$(RBEE_UNIT_DIR)/$$d; done; \
	fi

# Never overwrite an operator's config or token. The token is created only on
# a live install: a package must not ship one secret to every host (create it
# in the package's postinst instead).
install-config:
	$(INSTALL) -D -m 0644 systemd/config.example.toml $(DESTDIR)$(RBEE_DOC_DIR)/config.example.toml
	@if [ -e $(DESTDIR)$(RBEE_CONF_DIR)/config.toml ]; then \
		echo "keeping existing $(DESTDIR)$(RBEE_CONF_DIR)/config.toml"; \
	else \
		$(INSTALL) -D -m 0640 systemd/config.example.toml $(DESTDIR)$(RBEE_CONF_DIR)/config.toml; \
	fi
ifeq ($(DESTDIR),)
	@if [ ! -e $(RBEE_CONF_DIR)/api-token ]; then \
		(umask 077 && head -c 32 /dev/urandom | od -An -v -tx1 | tr -d ' \n' > $(RBEE_CONF_DIR)/api-token) && \
		echo "created $(RBEE_CONF_DIR)/api-token (the unit passes it as credential api-token)"; \
	fi
endif

# Leaves config, token, state and logs in place.
uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/rbee-hive $(DESTDIR)$(PREFIX)/bin/rbee-gate $(DESTDIR)$(PREFIX)/bin/rbee-simworker
	rm -f $(addprefix $(DESTDIR)$(RBEE_UNIT_DIR)/,$(RBEE_UNITS) $(RBEE_DROPINS))
	-rmdir $(DESTDIR)$(RBEE_UNIT_DIR)/rbee-hive.service.d $(DESTDIR)$(RBEE_UNIT_DIR)/rbee-hive@.service.d 2>/dev/null
	rm -f $(DESTDIR)$(RBEE_DOC_DIR)/config.example.toml
ifeq ($(DESTDIR),)
	@if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
endif
