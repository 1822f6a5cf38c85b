# udp-tunnel: `make` builds ./udp-tunnel, a single executable (a Python zipapp).
PYTHON    ?= python3
PREFIX    ?= /usr/local
BINDIR    ?= $(PREFIX)/bin
UNITDIR   ?= /etc/systemd/system
CONFDIR   ?= /etc/udp-tunnel
SYSTEMCTL ?= systemctl
DESTDIR   ?=
# for install-outside / install-inside
listen      ?=
service     ?=
outside     ?=
keepalive   ?= 25
max_clients ?= 1000
# install-outside: the WireGuard server's public key(s), comma-separated (`wg show wg0 public-key`)
wireguard_key ?=
# install-outside / install-inside: --datapath (auto, kernel or user; none given: the agent's default, auto).
# Only datapath=kernel gives the unit what the kernel data path needs (CAP_BPF, CAP_NET_ADMIN, netlink, bpf(),
# lo's settings); a unit without them runs auto as user space, and says why in its log.
datapath ?=
# install-inside: --client-address (off, transparent, proxy-v2, proxy-v2-first); transparent gives the unit
# CAP_NET_ADMIN, CAP_NET_RAW and netlink (docs/client-address.md)
client_address ?=
# install-outside / install-inside config=FILE: the agent's settings and services in a TOML file
# (examples/), installed as $(CONFDIR)/outside.toml or inside.toml; the variables above are then unused
config ?=
# config=: the group that may read the configuration and key files (the units run with it)
GROUP ?= udp-tunnel

SOURCES := $(wildcard src/udp_tunnel/*.py src/udp_tunnel/*/*.py)
# The kernel data path (bpf/relay.bpf.c): compiled when clang is there, and carried in the zipapp.
# Without clang the executable is built all the same, with the user-space data path only.
CLANG   ?= clang
BPF_OBJ := bpf/relay.bpf.o
HAVE_CLANG := $(shell command -v $(CLANG) 2>/dev/null)
DATAPATHS  := build/datapaths.$(if $(HAVE_CLANG),kernel,user)
UNITS   := udp-tunnel-outside.service udp-tunnel-inside.service

.PHONY: all check test lint bench churn flood demo install install-outside install-inside uninstall clean key deb \
        check-outside-args check-inside-args check-outside-config check-inside-config deb-units

all: udp-tunnel

udp-tunnel: $(SOURCES) $(DATAPATHS) $(if $(HAVE_CLANG),$(BPF_OBJ))
	rm -rf build/zipapp && mkdir -p build/zipapp
	cp -r src/udp_tunnel build/zipapp/
	$(if $(HAVE_CLANG),cp $(BPF_OBJ) build/zipapp/udp_tunnel/io/relay.bpf.o,\
	  @echo "no clang ($(CLANG)): building without the kernel data path (apt-get install clang)")
	find build/zipapp -name __pycache__ -prune -exec rm -rf {} +
	printf 'import sys\nfrom udp_tunnel.cli import main\nsys.exit(main())\n' > build/zipapp/__main__.py
	$(PYTHON) -m zipapp build/zipapp -p '/usr/bin/env python3' -o $@.tmp
	chmod 755 $@.tmp && mv $@.tmp $@

# rebuilds the executable when clang comes or goes
$(DATAPATHS):
	mkdir -p build && rm -f build/datapaths.* && touch $@

# restricted C for the kernel's verifier: no libbpf or kernel headers needed (bpf/relay.h has what it uses)
$(BPF_OBJ): bpf/relay.bpf.c bpf/relay.h
	$(CLANG) -O2 -g0 -target bpfel -mcpu=v3 -Wall -Werror -c $< -o $@.tmp && mv $@.tmp $@

demo: udp-tunnel
	./udp-tunnel demo

# Every test, in a virtual environment with the test tools (pyproject.toml, extra "test").
# The network lab (tests/lab) runs when root and its packages are there (see .ci/run).
check: .venv/.stamp udp-tunnel
	.venv/bin/python -m ruff check src tests
	.venv/bin/python -m pytest

.venv/.stamp: pyproject.toml
	$(PYTHON) -m venv .venv
	.venv/bin/pip install -q -e '.[test]'
	touch $@

test:
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check src tests

# Side by side with the C tool when C_TOOL=/path/to/its/udp-tunnel (harness: ../shared/perf or PERF_DIR)
bench: udp-tunnel
	C_TOOL="$(C_TOOL)" $(PYTHON) tests/bench.py

# Sustained churn (issue 18): new clients from one address at RATES per second (default 30,200,300,500),
# SECONDS each (default 40); with C_TOOL=/path the C tool too, alternating. Prints the churn table.
churn: .venv/.stamp
	C_TOOL="$(C_TOOL)" RATES="$(RATES)" SECONDS="$(SECONDS)" MAX_CLIENTS="$(MAX_CLIENTS)" .venv/bin/python tests/churn.py

# The agents under a replay flood and a port spray (issue 7): figures against the targets.
flood: .venv/.stamp
	.venv/bin/python tests/flood.py

install: udp-tunnel
	install -D -m 755 udp-tunnel $(DESTDIR)$(BINDIR)/udp-tunnel

# The group the units run with (SupplementaryGroups=), the only one that may read $(CONFDIR) and its keys:
# made on a real install (no DESTDIR, under systemd); none on a DESTDIR install (a package's postinst makes it).
define find_group
	group=; if getent group $(GROUP) >/dev/null 2>&1; then group=$(GROUP); \
	elif [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then groupadd --system $(GROUP) && group=$(GROUP); fi
endef

# A key shared by both ends: made once, kept across re-installs; the file, not a copy of it, is what the
# unit reads, so that `systemctl reload` takes a new key (0640, group $(GROUP); an older 0600 one is opened up).
key:
	@$(find_group); set -e; conf="$(DESTDIR)$(CONFDIR)"; \
	install -d "$$conf"; chmod 750 "$$conf"; [ -z "$$group" ] || chgrp "$$group" "$$conf"; \
	if [ ! -s "$$conf/key" ]; then \
	  (umask 077 && $(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(32))' > "$$conf/key"); \
	  echo "made a new key in $(CONFDIR)/key: copy this file to the other end's $(CONFDIR)/key"; \
	else echo "keeping the key in $(CONFDIR)/key (it must be the same on both ends)"; fi; \
	chmod 640 "$$conf/key"; [ -z "$$group" ] || chgrp "$$group" "$$conf/key"

# What a unit gets for the kernel data path (datapath = "kernel"), on top of its capabilities: the bpf()
# system call (@privileged otherwise), and write access to lo's settings it turns on (docs/kernel-path.md).
KERNEL_LINES = \# the kernel data path (datapath kernel): bpf(), and the settings of lo it turns on while it runs\nSystemCallFilter=bpf\nReadWritePaths=-/proc/sys/net/ipv4/conf/lo -/proc/sys/net/ipv6/conf/lo

# A unit from its template: $(1) the unit, $(2) capabilities, $(3) the header comment, $(4) description,
# $(5) ExecStart, $(6) how the agent reads its key, $(7) LimitNOFILE, $(8) where to write it, $(9) "kernel"
# for the kernel data path's lines, $(10) "yes" when the agent needs netlink (AF_NETLINK).
# The arguments may name shell variables of the recipe ("$$desc").
define unit_from_template
	fam=; if [ "$(10)" = yes ]; then fam=" AF_NETLINK"; fi; \
	kl='/^@KERNELPATH@$$/d'; if [ "$(9)" = kernel ]; then kl='s|^@KERNELPATH@$$|$(KERNEL_LINES)|'; fi; \
	sed -e "s|@HEADER@|$(3)|" -e "s|@DESCRIPTION@|$(4)|" -e "s|@EXECSTART@|$(5)|" -e "s|@KEYACCESS@|$(6)|" \
	    -e "s|@NOFILE@|$(7)|" -e "s|@CAPS@|$(2)|g" -e "s|@FAMILIES@|$$fam|" -e "$$kl" systemd/$(1).in > $(8).tmp && \
	chmod 644 $(8).tmp && mv $(8).tmp $(8)
endef

# The units of the command-line way: the options are on the ExecStart line, the key file read with the group.
is_outside = $(filter %outside.service,$(1))
args_header = Installed by \`make $(if $(is_outside),install-outside,install-inside)\`; edit the Makefile variables, not this copy.
args_exec = $(BINDIR)/udp-tunnel $(if $(is_outside),-l $(listen),-s $(service) -o $(outside)) -t $(keepalive) \
            --max-clients $(max_clients)$(if $(wireguard_key), --wireguard-key $(wireguard_key),)$(if $(datapath), \
            --datapath $(datapath),)$(if $(client_address), --client-address $(client_address),) --key-file $(CONFDIR)/key
kernel_caps = $(if $(filter kernel,$(datapath)),CAP_BPF CAP_NET_ADMIN)
extra_caps = $(sort $(kernel_caps) $(if $(filter transparent,$(client_address)),CAP_NET_ADMIN CAP_NET_RAW))
define render_unit
	$(call unit_from_template,$(1),$(strip $(2) $(extra_caps)),$(args_header),$(if $(is_outside),relay on $(listen),$(service) via $(outside)),$(args_exec),SupplementaryGroups=$(GROUP),$(shell echo $$(( 2 * $(max_clients) + 64 ))),$(DESTDIR)$(UNITDIR)/$(1),$(datapath),$(if $(extra_caps),yes))
endef

# The arguments are checked by the program itself (udp-tunnel --check-config: the same checks
# as at start, without I/O) before anything is installed: a unit that can only fail is never written.
q = '$(subst ','\'',$(1))'
check-outside-args: udp-tunnel
	@[ -n "$(listen)" ] || { echo "usage: make install-outside listen=[HOST:]PORT [wireguard_key=PUBKEY]" >&2; exit 2; }
	@$(PYTHON) ./udp-tunnel --check-config -l $(call q,$(listen)) -t $(call q,$(keepalive)) \
	  --max-clients $(call q,$(max_clients)) --key-file $(call q,$(CONFDIR)/key) \
	  $(if $(wireguard_key),--wireguard-key $(call q,$(wireguard_key)),) $(if $(datapath),--datapath $(call q,$(datapath)),) \
	  $(if $(client_address),--client-address $(call q,$(client_address)),)

check-inside-args: udp-tunnel
	@[ -n "$(service)" ] && [ -n "$(outside)" ] || \
	  { echo "usage: make install-inside service=HOST:PORT outside=HOST:PORT" >&2; exit 2; }
	@$(PYTHON) ./udp-tunnel --check-config -s $(call q,$(service)) -o $(call q,$(outside)) \
	  -t $(call q,$(keepalive)) --max-clients $(call q,$(max_clients)) --key-file $(call q,$(CONFDIR)/key) \
	  $(if $(datapath),--datapath $(call q,$(datapath)),) \
	  $(if $(client_address),--client-address $(call q,$(client_address)),)

ifeq ($(config),)
install-outside: check-outside-args install key
	install -d $(DESTDIR)$(UNITDIR)
	$(call render_unit,udp-tunnel-outside.service,$(shell port=$$(echo '$(listen)' | sed 's/.*://'); \
	    [ "$$port" -lt 1024 ] 2>/dev/null && echo CAP_NET_BIND_SERVICE))
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	  $(SYSTEMCTL) daemon-reload && $(SYSTEMCTL) enable --now udp-tunnel-outside.service; fi

install-inside: check-inside-args install key
	install -d $(DESTDIR)$(UNITDIR)
	$(call render_unit,udp-tunnel-inside.service,)
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	  $(SYSTEMCTL) daemon-reload && $(SYSTEMCTL) enable --now udp-tunnel-inside.service; fi
else
install-outside: check-outside-config install
	$(call install_config,outside)

install-inside: check-inside-config install
	$(call install_config,inside)
endif

# The config-file way. The file is checked by the program first (a bad one installs nothing), then
# installed as $(CONFDIR)/ROLE.toml with the key files it names (a random key is made for each one
# missing: a relative name is beside the file), readable by the group $(GROUP) only; the unit runs
# `udp-tunnel --config $(CONFDIR)/ROLE.toml` with that group, so that `systemctl reload` (SIGHUP)
# reads the file and the keys again. The group is made on a real install (no DESTDIR, under systemd).
check-outside-config check-inside-config: udp-tunnel
	@[ -r $(call q,$(config)) ] || { echo "make install-$(word 2,$(subst -, ,$@)): cannot read config=$(config)" >&2; exit 2; }
	@$(PYTHON) ./udp-tunnel --check-config --config $(call q,$(config))
	@role=$$($(PYTHON) ./udp-tunnel --check-config --print-install-facts --config $(call q,$(config)) | sed -n 's/^role=//p'); \
	  [ "$$role" = $(word 2,$(subst -, ,$@)) ] || { echo "make install-$(word 2,$(subst -, ,$@)): $(config) is an $$role \
	agent's file (make install-$$role config=$(config))" >&2; exit 2; }

config_header = Installed by \`make install-$(1) config=FILE\`: the settings are in $(CONFDIR)/$(1).toml (systemctl reload udp-tunnel-$(1) reads it again).
config_exec = $(BINDIR)/udp-tunnel --config $(CONFDIR)/$(1).toml
define install_config
	@facts=$$($(PYTHON) ./udp-tunnel --check-config --print-install-facts --config $(call q,$(config))) || exit 2; \
	fact() { printf '%s\n' "$$facts" | sed -n "s/^$$1=//p"; }; \
	conf="$(DESTDIR)$(CONFDIR)"; unit="$(DESTDIR)$(UNITDIR)/udp-tunnel-$(1).service"; $(find_group); \
	set -e; install -d "$$conf" "$(DESTDIR)$(UNITDIR)"; chmod 750 "$$conf"; [ -z "$$group" ] || chgrp "$$group" "$$conf"; \
	fact key_file | while IFS= read -r f; do \
	  case "$$f" in /*) k="$(DESTDIR)$$f";; *) k="$$conf/$$f";; esac; \
	  if [ ! -s "$$k" ]; then \
	    mkdir -p "$$(dirname "$$k")"; \
	    (umask 077 && $(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(32))' > "$$k"); \
	    echo "made a new key in $${k#$(DESTDIR)}: the other agent needs the same file ($$f)"; \
	  else echo "keeping the key in $${k#$(DESTDIR)}"; fi; \
	  chmod 640 "$$k"; [ -z "$$group" ] || chgrp "$$group" "$$k"; \
	done; \
	install -m 640 $(call q,$(config)) "$$conf/$(1).toml.tmp"; [ -z "$$group" ] || chgrp "$$group" "$$conf/$(1).toml.tmp"; \
	mv "$$conf/$(1).toml.tmp" "$$conf/$(1).toml"; \
	nofile=$$(fact nofile); [ "$$nofile" -ge 65536 ] || nofile=65536; caps=$$(fact caps); desc=$$(fact description); \
	datapath=$$(fact datapath); netlink=$$(fact netlink); \
	before=$$([ ! -f "$$unit" ] || cksum < "$$unit"); \
	$(call unit_from_template,udp-tunnel-$(1).service,$$caps,$(config_header),$$desc,$(config_exec),SupplementaryGroups=$(GROUP),$$nofile,$$unit,$$datapath,$$netlink); \
	if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	  $(SYSTEMCTL) daemon-reload && $(SYSTEMCTL) enable udp-tunnel-$(1).service && \
	  if [ "$$before" = "$$(cksum < "$$unit")" ]; then $(SYSTEMCTL) reload-or-restart udp-tunnel-$(1).service; \
	  else $(SYSTEMCTL) restart udp-tunnel-$(1).service; fi; fi
endef

uninstall:
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	  for u in $(UNITS); do $(SYSTEMCTL) disable --now $$u 2>/dev/null || true; done; fi
	rm -f $(addprefix $(DESTDIR)$(UNITDIR)/,$(UNITS)) $(DESTDIR)$(BINDIR)/udp-tunnel
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then $(SYSTEMCTL) daemon-reload; fi
	@echo "the key in $(CONFDIR)/key was kept; remove it by hand if you no longer need it"

# A Debian package (dpkg-deb, no debhelper): the program in /usr/bin, the units of the config-file
# way in /lib/systemd/system (they run /etc/udp-tunnel/ROLE.toml; the outside may bind ports below
# 1024), the examples in /usr/share/doc/udp-tunnel/examples. Its maintainer scripts (deb/) make the
# group udp-tunnel and never enable or start a unit.
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' src/udp_tunnel/__init__.py)
DEB := build/udp-tunnel_$(VERSION)_all.deb

deb: $(DEB)

$(DEB): udp-tunnel $(wildcard systemd/*.in examples/*.toml deb/*) Makefile
	rm -rf build/deb && mkdir -p build/deb/DEBIAN build/deb/lib/systemd/system build/deb/usr/share/doc/udp-tunnel/examples
	install -D -m 755 udp-tunnel build/deb/usr/bin/udp-tunnel
	$(MAKE) -s --no-print-directory deb-units BINDIR=/usr/bin CONFDIR=/etc/udp-tunnel UNITDIR=/lib/systemd/system \
	  DESTDIR=$(CURDIR)/build/deb
	install -m 644 examples/outside.toml examples/inside.toml build/deb/usr/share/doc/udp-tunnel/examples/
	install -m 644 deb/copyright build/deb/usr/share/doc/udp-tunnel/copyright
	install -m 755 deb/postinst deb/prerm deb/postrm build/deb/DEBIAN/
	sed -e 's|@VERSION@|$(VERSION)|' -e "s|@SIZE@|$$(du -sk --exclude=DEBIAN build/deb | cut -f1)|" deb/control.in \
	  > build/deb/DEBIAN/control
	dpkg-deb --root-owner-group -Zxz --build build/deb $@.tmp >/dev/null && mv $@.tmp $@
	@echo "built $@"

deb_header = Installed by the udp-tunnel package: the settings are in $(CONFDIR)/$(1).toml (examples in /usr/share/doc/udp-tunnel/examples; systemctl reload udp-tunnel-$(1) reads it again).
deb-units:
	$(call unit_from_template,udp-tunnel-outside.service,CAP_NET_BIND_SERVICE,$(call deb_header,outside),$(CONFDIR)/outside.toml,$(call config_exec,outside),SupplementaryGroups=$(GROUP),65536,$(DESTDIR)$(UNITDIR)/udp-tunnel-outside.service)
	$(call unit_from_template,udp-tunnel-inside.service,,$(call deb_header,inside),$(CONFDIR)/inside.toml,$(call config_exec,inside),SupplementaryGroups=$(GROUP),65536,$(DESTDIR)$(UNITDIR)/udp-tunnel-inside.service)

clean:
	rm -rf build udp-tunnel udp-tunnel.tmp $(BPF_OBJ)
