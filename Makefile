# Installs systemtap-service as a system service (spec §3):
#   make install [DESTDIR=/staging] [PREFIX=/usr/local]
# The configuration stays in /etc and the caches in /var whatever PREFIX is,
# because those are the paths the command and the spec use by default.
# Only the boot-time service is installed: it needs nothing but python3.

PREFIX ?= /usr/local
DESTDIR ?=
SBINDIR ?= $(PREFIX)/sbin
LIBDIR ?= $(PREFIX)/lib/systemtap-initscript
MANDIR ?= $(PREFIX)/share/man
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
SYSTEMDUNITDIR ?= $(PREFIX)/lib/systemd/system
SYSCONFDIR ?= /etc
LOCALSTATEDIR ?= /var
PYTHON ?= /usr/bin/python3

INSTALL ?= install
# What systemtap-service imports: its package and the helpers it shares.
PACKAGE_FILES := src/stapinit/__init__.py src/stapinit/fsutil.py src/stapinit/py.typed \
	$(shell find src/stapinit/service -name '*.py' | sort)
# Files that name the installed command get its final path (without DESTDIR).
SUBSTITUTE = sed -e 's|@SBINDIR@|$(SBINDIR)|g'

.PHONY: all install
# Nothing to build: the package is pure Python and data files.
all:

install:
	for file in $(PACKAGE_FILES); do \
		$(INSTALL) -D -m 644 "$$file" "$(DESTDIR)$(LIBDIR)/$${file#src/}" || exit 1; \
	done
	$(INSTALL) -d -m 755 "$(DESTDIR)$(SBINDIR)"
# The launcher: isolated mode (-I) so that no PYTHON* variable or user
# site directory can change what runs as root at boot.
	printf '%s\n' '#!$(PYTHON) -I' \
		'"""systemtap-service: run SystemTap scripts as services; see systemtap-service(8)."""' \
		'import sys' \
		'' \
		'sys.path.insert(0, "$(LIBDIR)")' \
		'from stapinit.service.cli import main  # noqa: E402' \
		'' \
		'sys.exit(main())' > "$(DESTDIR)$(SBINDIR)/systemtap-service"
	chmod 755 "$(DESTDIR)$(SBINDIR)/systemtap-service"
	$(INSTALL) -d -m 755 "$(DESTDIR)$(SYSCONFDIR)/systemtap/script.d" \
		"$(DESTDIR)$(SYSCONFDIR)/systemtap/conf.d" "$(DESTDIR)$(LOCALSTATEDIR)/cache/systemtap"
# Never overwrite a configuration someone has edited.
	test -e "$(DESTDIR)$(SYSCONFDIR)/systemtap/config" || \
		$(INSTALL) -m 644 data/config "$(DESTDIR)$(SYSCONFDIR)/systemtap/config"
	$(INSTALL) -d -m 755 "$(DESTDIR)$(SYSCONFDIR)/init.d"
	$(SUBSTITUTE) data/init.d/systemtap > "$(DESTDIR)$(SYSCONFDIR)/init.d/systemtap"
	chmod 755 "$(DESTDIR)$(SYSCONFDIR)/init.d/systemtap"
	$(INSTALL) -d -m 755 "$(DESTDIR)$(SYSTEMDUNITDIR)"
	$(SUBSTITUTE) data/systemd/systemtap.service > "$(DESTDIR)$(SYSTEMDUNITDIR)/systemtap.service"
	chmod 644 "$(DESTDIR)$(SYSTEMDUNITDIR)/systemtap.service"
	$(INSTALL) -d -m 755 "$(DESTDIR)$(SYSCONFDIR)/logrotate.d"
	$(INSTALL) -m 644 data/logrotate/systemtap "$(DESTDIR)$(SYSCONFDIR)/logrotate.d/systemtap"
# Debian runs postinst.d when a kernel image is installed and
# header_postinst.d when its headers (the build tree) are.
	for hooks in postinst.d header_postinst.d; do \
		$(INSTALL) -d -m 755 "$(DESTDIR)$(SYSCONFDIR)/kernel/$$hooks" || exit 1; \
		$(SUBSTITUTE) data/kernel/postinst.d/systemtap \
			> "$(DESTDIR)$(SYSCONFDIR)/kernel/$$hooks/systemtap" || exit 1; \
		chmod 755 "$(DESTDIR)$(SYSCONFDIR)/kernel/$$hooks/systemtap" || exit 1; \
	done
	$(INSTALL) -d -m 755 "$(DESTDIR)$(MANDIR)/man8"
	$(INSTALL) -m 644 doc/systemtap-service.8 "$(DESTDIR)$(MANDIR)/man8/systemtap-service.8"
	$(INSTALL) -d -m 755 "$(DESTDIR)$(BASHCOMPDIR)"
	$(INSTALL) -m 644 data/bash-completion/systemtap-service \
		"$(DESTDIR)$(BASHCOMPDIR)/systemtap-service"
