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

SOURCES := $(wildcard src/udp_tunnel/*.py src/udp_tunnel/*/*.py)
# The kernel data path (bpf/relay.bpf.c): compiled when clang is there, and carried in the zipapp.
# Without clang the executable is built all the same, with the user-space data path only.
CLANG   ?= clang
BPF_OBJ := bpf/relay.bpf.o
HAVE_CLANG := $(shell command -v $(CLANG) 2>/dev/null)
DATAPATHS  := build/datapaths.$(if $(HAVE_CLANG),kernel,user)
UNITS   := udp-tunnel-outside.service udp-tunnel-inside.service

.PHONY: all check test lint bench flood demo install install-outside install-inside uninstall clean key \
        check-outside-args check-inside-args

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

# The agents under a replay flood and a port spray (issue 7): figures against the targets.
flood: .venv/.stamp
	.venv/bin/python tests/flood.py

install: udp-tunnel
	install -D -m 755 udp-tunnel $(DESTDIR)$(BINDIR)/udp-tunnel

# A key shared by both ends: made once, kept across re-installs.
key:
	@if [ ! -s $(DESTDIR)$(CONFDIR)/key ]; then \
	  install -d -m 700 $(DESTDIR)$(CONFDIR) && \
	  (umask 077 && $(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(32))' > $(DESTDIR)$(CONFDIR)/key) && \
	  echo "made a new key in $(CONFDIR)/key: copy this file to the other end's $(CONFDIR)/key"; \
	else echo "keeping the key in $(CONFDIR)/key (it must be the same on both ends)"; fi

define render_unit
	sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@CONFDIR@|$(CONFDIR)|g' -e 's|@KEEPALIVE@|$(keepalive)|g' \
	    -e 's|@MAXCLIENTS@|$(max_clients)|g' -e 's|@LISTEN@|$(listen)|g' -e 's|@SERVICE@|$(service)|g' \
	    -e 's|@WIREGUARD@|$(if $(wireguard_key), --wireguard-key $(wireguard_key),)|g' \
	    -e 's|@OUTSIDE@|$(outside)|g' -e 's|@NOFILE@|$(shell echo $$(( 2 * $(max_clients) + 64 )))|g' \
	    -e 's|@CAPS@|$(2)|g' systemd/$(1).in > $(DESTDIR)$(UNITDIR)/$(1).tmp
	chmod 644 $(DESTDIR)$(UNITDIR)/$(1).tmp && mv $(DESTDIR)$(UNITDIR)/$(1).tmp $(DESTDIR)$(UNITDIR)/$(1)
endef

# The arguments are checked by the program itself (udp-tunnel --check-config: the same checks
# as at start, without I/O) before anything is installed: a unit that can only fail is never written.
q = '$(subst ','\'',$(1))'
check-outside-args: udp-tunnel
	@[ -n "$(listen)" ] || { echo "usage: make install-outside listen=[HOST:]PORT [wireguard_key=PUBKEY]" >&2; exit 2; }
	@$(PYTHON) ./udp-tunnel --check-config -l $(call q,$(listen)) -t $(call q,$(keepalive)) \
	  --max-clients $(call q,$(max_clients)) --key-file $(call q,$(CONFDIR)/key) \
	  $(if $(wireguard_key),--wireguard-key $(call q,$(wireguard_key)),)

check-inside-args: udp-tunnel
	@[ -n "$(service)" ] && [ -n "$(outside)" ] || \
	  { echo "usage: make install-inside service=HOST:PORT outside=HOST:PORT" >&2; exit 2; }
	@$(PYTHON) ./udp-tunnel --check-config -s $(call q,$(service)) -o $(call q,$(outside)) \
	  -t $(call q,$(keepalive)) --max-clients $(call q,$(max_clients)) --key-file $(call q,$(CONFDIR)/key)

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

uninstall:
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	  for u in $(UNITS); do $(SYSTEMCTL) disable --now $$u 2>/dev/null || true; done; fi
	rm -f $(addprefix $(DESTDIR)$(UNITDIR)/,$(UNITS)) $(DESTDIR)$(BINDIR)/udp-tunnel
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then $(SYSTEMCTL) daemon-reload; fi
	@echo "the key in $(CONFDIR)/key was kept; remove it by hand if you no longer need it"

clean:
	rm -rf build udp-tunnel udp-tunnel.tmp $(BPF_OBJ)
