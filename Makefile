# Installs systemtap-service as a system service (spec §3):
#   make install [DESTDIR=/staging] [PREFIX=/usr/local]
# the compile server (stap-server, its unit, config and log rotation):
#   make install-server [DESTDIR=/staging] [PREFIX=/usr/local]
# and the client side (stap-client, the stap-authorize-* commands, the
# stap-loader service with its socket, the trust store directories):
#   make install-client [DESTDIR=/staging] [PREFIX=/usr/local]
# The configuration stays in /etc and the caches in /var whatever PREFIX is,
# because those are the paths the commands and the spec use by default.
# systemtap-service needs nothing but python3 (and python3-cryptography for
# COMPILE_SERVER and REQUIRE_SIGNED); the server and the client also need
# python3-cryptography. Each of the three has its own private copy of
# the Python code it runs, so that they install (and package) independently.
#
# The server runs as the system user stap-server: "make server-user" (as root)
# creates it and its directories, and "make install-server" runs it when it
# installs into the live system (no DESTDIR) as root.

PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
SBINDIR ?= $(PREFIX)/sbin
LIBDIR ?= $(PREFIX)/lib/systemtap-initscript
SERVER_LIBDIR ?= $(PREFIX)/lib/systemtap-compile-server
CLIENT_LIBDIR ?= $(PREFIX)/lib/systemtap-compile-client
MANDIR ?= $(PREFIX)/share/man
DOCDIR ?= $(PREFIX)/share/doc
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
SYSTEMDUNITDIR ?= $(PREFIX)/lib/systemd/system
SYSCONFDIR ?= /etc
LOCALSTATEDIR ?= /var
PYTHON ?= /usr/bin/python3

INSTALL ?= install
# What systemtap-service imports: its package and the helpers it shares,
# with the wire format and trust code that COMPILE_SERVER and REQUIRE_SIGNED
# load (only then, and only those need python3-cryptography).
PACKAGE_FILES := src/stapinit/__init__.py src/stapinit/py.typed src/stapinit/protocol.py \
	$(shell find src/stapinit/core -name '*.py' | sort) \
	$(shell find src/stapinit/initscript src/stapinit/trust -name '*.py' | sort)
# What every server and client command shares: the top-level modules
# (version, wire formats), the core and the trust code.
TRUST_FILES := src/stapinit/py.typed \
	$(shell find src/stapinit -maxdepth 1 -name '*.py' | sort) \
	$(shell find src/stapinit/core src/stapinit/trust -name '*.py' | sort)
SERVER_PACKAGE_FILES := $(TRUST_FILES) $(shell find src/stapinit/server -name '*.py' | sort)
# stap-client runs modules the way stap-loader does, so they ship together.
CLIENT_PACKAGE_FILES := $(TRUST_FILES) \
	$(shell find src/stapinit/client src/stapinit/loader -name '*.py' | sort)
# Files that name installed paths get their final values (without DESTDIR).
SUBSTITUTE = sed -e 's|@SBINDIR@|$(SBINDIR)|g' -e 's|@BINDIR@|$(BINDIR)|g' \
	-e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g'

# $(call launcher,COMMAND,DIRECTORY,LIBRARY,MODULE,FUNCTION,WHAT): writes
# DIRECTORY/COMMAND, which runs MODULE.FUNCTION from the private LIBRARY.
# Isolated mode (-I), so that no PYTHON* variable or user site directory can
# change what runs, often as root.
define launcher
printf '%s\n' '#!$(PYTHON) -I' \
		'"""$(1): $(6)."""' \
		'import sys' \
		'' \
		'sys.path.insert(0, "$(3)")' \
		'from $(4) import $(5)  # noqa: E402' \
		'' \
		'sys.exit($(5)())' > "$(DESTDIR)$(2)/$(1)"
	chmod 755 "$(DESTDIR)$(2)/$(1)"
endef

# $(call python_files,FILES,LIBRARY): copies src/FILES into LIBRARY.
define python_files
for file in $(1); do \
		$(INSTALL) -D -m 644 "$$file" "$(DESTDIR)$(2)/$${file#src/}" || exit 1; \
	done
endef

.PHONY: all install install-server install-client server-user
# Nothing to build: the package is pure Python and data files.
all:

install:
	$(call python_files,$(PACKAGE_FILES),$(LIBDIR))
	$(INSTALL) -d -m 755 "$(DESTDIR)$(SBINDIR)"
	$(call launcher,systemtap-service,$(SBINDIR),$(LIBDIR),stapinit.initscript.cli,main,run SystemTap scripts as services; see systemtap-service(8))
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
# postrm.d runs when a kernel image is removed: its caches go too.
	$(INSTALL) -d -m 755 "$(DESTDIR)$(SYSCONFDIR)/kernel/postrm.d"
	$(SUBSTITUTE) data/kernel/postrm.d/systemtap > "$(DESTDIR)$(SYSCONFDIR)/kernel/postrm.d/systemtap"
	chmod 755 "$(DESTDIR)$(SYSCONFDIR)/kernel/postrm.d/systemtap"
	$(INSTALL) -d -m 755 "$(DESTDIR)$(MANDIR)/man8"
	$(INSTALL) -m 644 doc/systemtap-service.8 "$(DESTDIR)$(MANDIR)/man8/systemtap-service.8"
	$(INSTALL) -d -m 755 "$(DESTDIR)$(BASHCOMPDIR)"
	$(INSTALL) -m 644 data/bash-completion/systemtap-service \
		"$(DESTDIR)$(BASHCOMPDIR)/systemtap-service"

install-server:
	$(call python_files,$(SERVER_PACKAGE_FILES),$(SERVER_LIBDIR))
	$(INSTALL) -d -m 755 "$(DESTDIR)$(BINDIR)"
	$(call launcher,stap-server,$(BINDIR),$(SERVER_LIBDIR),stapinit.server.cli,main,the SystemTap compile server)
	$(INSTALL) -d -m 755 "$(DESTDIR)$(SYSCONFDIR)/stap-server"
	test -e "$(DESTDIR)$(SYSCONFDIR)/stap-server/stap-server.conf" || \
		$(INSTALL) -m 644 data/server/stap-server.conf \
			"$(DESTDIR)$(SYSCONFDIR)/stap-server/stap-server.conf"
	$(INSTALL) -d -m 755 "$(DESTDIR)$(SYSTEMDUNITDIR)"
	$(SUBSTITUTE) -e 's|@DOCDIR@|$(DOCDIR)/systemtap-compile-server|g' \
		data/server/stap-server.service > "$(DESTDIR)$(SYSTEMDUNITDIR)/stap-server.service"
	chmod 644 "$(DESTDIR)$(SYSTEMDUNITDIR)/stap-server.service"
	$(INSTALL) -d -m 755 "$(DESTDIR)$(SYSCONFDIR)/logrotate.d"
	$(INSTALL) -m 644 data/logrotate/stap-server "$(DESTDIR)$(SYSCONFDIR)/logrotate.d/stap-server"
	$(INSTALL) -D -m 644 README.md "$(DESTDIR)$(DOCDIR)/systemtap-compile-server/README.md"
	$(INSTALL) -d -m 755 "$(DESTDIR)$(MANDIR)/man8"
	$(INSTALL) -m 644 doc/stap-server.8 "$(DESTDIR)$(MANDIR)/man8/stap-server.8"
# Into the live system as root, the service user comes with it; staged
# installs leave that to the package's maintainer scripts.
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" = 0 ]; then \
		$(MAKE) --no-print-directory server-user; \
	elif [ -z "$(DESTDIR)" ]; then \
		echo "Now run 'make server-user' as root: stap-server runs as user stap-server."; \
	fi

# The service user, its state directory (root's: the key is read there before
# the server drops to stap-server) and its log directory (idempotent; existing
# ones keep their contents). /run/stap-server comes from the unit's RuntimeDirectory=,
# or from stap-server itself when root starts it without systemd.
server-user:
	getent group stap-server >/dev/null || groupadd --system stap-server
	getent passwd stap-server >/dev/null || \
		useradd --system --gid stap-server --home-dir $(LOCALSTATEDIR)/lib/stap-server \
			--no-create-home --shell /usr/sbin/nologin stap-server
	$(INSTALL) -d -m 755 -o root -g root "$(LOCALSTATEDIR)/lib/stap-server"
	$(INSTALL) -d -m 750 -o stap-server -g stap-server "$(LOCALSTATEDIR)/log/stap-server"

install-client:
	$(call python_files,$(CLIENT_PACKAGE_FILES),$(CLIENT_LIBDIR))
	$(INSTALL) -d -m 755 "$(DESTDIR)$(BINDIR)" "$(DESTDIR)$(SBINDIR)"
	$(call launcher,stap-client,$(BINDIR),$(CLIENT_LIBDIR),stapinit.client.cli,main,compile on a trusted stap-server and run the module)
	$(call launcher,stap-authorize-server-cert,$(BINDIR),$(CLIENT_LIBDIR),stapinit.client.authorize,authorize_server_main,trust a stap-server certificate)
	$(call launcher,stap-authorize-signing-cert,$(BINDIR),$(CLIENT_LIBDIR),stapinit.client.authorize,authorize_signing_main,trust a module signer certificate)
	$(call launcher,stap-loader,$(SBINDIR),$(CLIENT_LIBDIR),stapinit.loader.cli,main,load modules for stapdev and stapusr members)
# The system-wide trust stores: root's, and never writable by group or others
# (the commands ignore a store that is). install creates missing parents 0755.
	$(INSTALL) -d -m 755 "$(DESTDIR)$(SYSCONFDIR)/systemtap/ssl/client" \
		"$(DESTDIR)$(SYSCONFDIR)/systemtap/staprun"
	for conf in client/client.conf loader/stap-loader.conf; do \
		test -e "$(DESTDIR)$(SYSCONFDIR)/systemtap/$${conf#*/}" || \
			$(INSTALL) -m 644 "data/$$conf" "$(DESTDIR)$(SYSCONFDIR)/systemtap/$${conf#*/}" || \
			exit 1; \
	done
	$(INSTALL) -d -m 755 "$(DESTDIR)$(SYSTEMDUNITDIR)"
	for unit in stap-loader.socket stap-loader.service; do \
		$(SUBSTITUTE) -e 's|@DOCDIR@|$(DOCDIR)/systemtap-compile-client|g' \
			"data/loader/$$unit" > "$(DESTDIR)$(SYSTEMDUNITDIR)/$$unit" || exit 1; \
		chmod 644 "$(DESTDIR)$(SYSTEMDUNITDIR)/$$unit" || exit 1; \
	done
	$(INSTALL) -D -m 644 README.md "$(DESTDIR)$(DOCDIR)/systemtap-compile-client/README.md"
	$(INSTALL) -d -m 755 "$(DESTDIR)$(MANDIR)/man1" "$(DESTDIR)$(MANDIR)/man8"
	for page in stap-client.1 stap-authorize-server-cert.1; do \
		$(INSTALL) -m 644 "doc/$$page" "$(DESTDIR)$(MANDIR)/man1/$$page" || exit 1; \
	done
	for page in stap-authorize-signing-cert.8 stap-loader.8; do \
		$(INSTALL) -m 644 "doc/$$page" "$(DESTDIR)$(MANDIR)/man8/$$page" || exit 1; \
	done
