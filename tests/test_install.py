"""make install targets into a temporary root, and the units they write."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess

import pytest

from agents import ROOT


def make(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    # run as a user would, even when the suite itself runs under `make check` (whose MAKELEVEL would make the
    # sub-make say "make[1]: ***" and its MAKEFLAGS would leak options)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    return subprocess.run(["make", "-s", "-C", ROOT, *args, "SYSTEMCTL=false"], capture_output=True, text=True,
                          timeout=120, check=check, env=env)


def dirs(tmp) -> list[str]:
    return [f"PREFIX={tmp}/prefix", f"UNITDIR={tmp}/units", f"CONFDIR={tmp}/conf"]


def test_install_targets_write_program_units_and_a_private_key_and_uninstall_removes_them(tmp_path):
    # an older install's key: owner-only, in an owner-only directory
    (tmp_path / "conf").mkdir(mode=0o700)
    (tmp_path / "conf/key").write_text("an older install's key, kept\n")
    (tmp_path / "conf/key").chmod(0o600)
    make("install-outside", "listen=9999", *dirs(tmp_path))
    make("install-inside", "service=localhost:51820", "outside=vps.example.com:9999", "max_clients=50",
         *dirs(tmp_path))
    exe = tmp_path / "prefix/bin/udp-tunnel"
    assert os.access(exe, os.X_OK)
    assert subprocess.run([str(exe), "--version"], capture_output=True, text=True).stdout.startswith("udp-tunnel ")
    key = tmp_path / "conf/key"
    # kept, and readable by the units' group (the unit reads this file, so that a reload takes a new key)
    assert key.read_text() == "an older install's key, kept\n"
    assert stat.S_IMODE(key.stat().st_mode) == 0o640 and stat.S_IMODE(key.parent.stat().st_mode) == 0o750
    out = (tmp_path / "units/udp-tunnel-outside.service").read_text()
    ins = (tmp_path / "units/udp-tunnel-inside.service").read_text()
    assert f"ExecStart={exe} -l 9999 -t 25 --max-clients 1000 --key-file {tmp_path}/conf/key\n" in out
    assert f"ExecStart={exe} -s localhost:51820 -o vps.example.com:9999 -t 25 --max-clients 50 " \
           f"--key-file {tmp_path}/conf/key\n" in ins
    for unit in (out, ins):
        assert "SupplementaryGroups=udp-tunnel\n" in unit and "LoadCredential" not in unit and " -k " not in unit
        for line in ("Type=notify", "DynamicUser=yes", "NoNewPrivileges=yes", "ProtectSystem=strict",
                     "PrivateTmp=yes", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "WatchdogSec=30"):
            assert line + "\n" in unit
        assert re.search(r"@[A-Z]+@", unit) is None  # every placeholder filled in
    assert "CapabilityBoundingSet=\n" in out and "LimitNOFILE=2064\n" in out and "LimitNOFILE=164\n" in ins
    first_key = key.read_text()
    make("install-outside", "listen=9999", *dirs(tmp_path))
    assert key.read_text() == first_key  # a re-install keeps the key
    make("uninstall", *dirs(tmp_path))
    assert not exe.exists() and not list((tmp_path / "units").iterdir()) and key.exists()


def test_a_privileged_listen_port_gets_only_cap_net_bind_service(tmp_path):
    make("install-outside", "listen=[::]:443", *dirs(tmp_path))
    unit = (tmp_path / "units/udp-tunnel-outside.service").read_text()
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n" in unit
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE\n" in unit


def test_install_targets_without_their_arguments_say_how_and_install_nothing(tmp_path):
    for target, needle in (("install-outside", "listen="), ("install-inside", "service=HOST:PORT")):
        r = make(target, *dirs(tmp_path), check=False)
        assert r.returncode != 0 and needle in r.stderr
    assert not (tmp_path / "prefix").exists() and not (tmp_path / "conf").exists()


@pytest.mark.parametrize("target, args, needle", [
    ("install-outside", ["listen=70000"], "bad port '70000'"),
    ("install-outside", ["listen=vps example:9999"], "bad host name"),
    ("install-outside", ["listen=9999", "keepalive=0"], "keepalive interval must be between"),
    ("install-outside", ["listen=9999", "keepalive=nan"], "expected a number"),
    ("install-outside", ["listen=9999", "max_clients=lots"], "expected a whole number"),
    ("install-outside", ["listen=9999", "max_clients=0"], "--max-clients must be between"),
    ("install-inside", ["service=localhost", "outside=vps.example.com:9999"], "expected HOST:PORT"),
    ("install-inside", ["service=localhost:51820", "outside=vps.example.com:99999"], "bad port"),
    ("install-inside", ["service=localhost:51820", "outside=vps.example.com:9999", "keepalive=-5"],
     "must be between"),
    ("install-inside", ["service=it's:1", "outside=vps.example.com:9999"], "bad host name"),
])
def test_install_targets_check_their_arguments_with_the_program_and_install_nothing_when_wrong(
        tmp_path, target, args, needle):
    r = make(target, *args, *dirs(tmp_path), check=False)
    assert r.returncode != 0 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "prefix").exists() and not (tmp_path / "conf").exists()
    assert not (tmp_path / "units").exists()


def test_destdir_is_honoured(tmp_path):
    make("install-outside", "listen=9999", f"DESTDIR={tmp_path}")
    assert (tmp_path / "usr/local/bin/udp-tunnel").exists()
    assert "ExecStart=/usr/local/bin/udp-tunnel -l 9999" in (
        tmp_path / "etc/systemd/system/udp-tunnel-outside.service").read_text()
    assert (tmp_path / "etc/udp-tunnel/key").exists()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(tmp_path):
    make("install-outside", "listen=9999", *dirs(tmp_path))
    make("install-inside", "service=127.0.0.1:51820", "outside=192.0.2.1:9999", *dirs(tmp_path))
    for unit in ("udp-tunnel-outside.service", "udp-tunnel-inside.service"):
        r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "units" / unit)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and unit not in r.stderr, r.stderr


def test_install_outside_with_a_wireguard_key_puts_it_in_the_unit_and_refuses_a_bad_one(tmp_path):
    key = "+++/+++/+++/+++/+++/+++/+++/+++/+++/+++/YWI="  # 32 bytes, with + and / as base64 has
    make("install-outside", "listen=9999", f"wireguard_key={key}", *dirs(tmp_path))
    unit = (tmp_path / "units/udp-tunnel-outside.service").read_text()
    assert f"-t 25 --max-clients 1000 --wireguard-key {key} --key-file {tmp_path}/conf/key\n" in unit
    made = tmp_path / "conf/key"  # a new random key, readable by the units' group
    assert stat.S_IMODE(made.stat().st_mode) == 0o640 and len(made.read_text().strip()) >= 32
    r = make("install-outside", "listen=9999", "wireguard_key=not-a-key", f"PREFIX={tmp_path}/p2",
             f"UNITDIR={tmp_path}/u2", f"CONFDIR={tmp_path}/c2", check=False)
    assert r.returncode != 0 and "not a WireGuard public key" in r.stderr
    assert not (tmp_path / "u2").exists() and not (tmp_path / "p2").exists()


# --- the config-file way: make install-outside config=FILE (issue 21) ---

EXAMPLES = os.path.join(ROOT, "examples")
HARDENING = ("Type=notify", "DynamicUser=yes", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
             "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "WatchdogSec=30", "UMask=0077")


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("role, keys, caps", [
    ("outside", ["home.key", "friend.key"], "CAP_NET_BIND_SERVICE"),  # the example has DNS on port 53
    ("inside", ["home.key"], ""),
])
def test_install_with_a_config_file_installs_it_its_keys_and_a_unit_that_runs_it(tmp_path, role, keys, caps):
    example = os.path.join(EXAMPLES, f"{role}.toml")
    r = make(f"install-{role}", f"config={example}", *dirs(tmp_path))
    conf, exe = tmp_path / "conf", tmp_path / "prefix/bin/udp-tunnel"
    assert r.stdout == "".join(f"made a new key in {conf}/{k}: the other agent needs the same file ({k})\n"
                               for k in keys)
    assert (conf / f"{role}.toml").read_bytes() == open(example, "rb").read()
    assert sorted(os.listdir(conf)) == sorted([*keys, f"{role}.toml"])
    assert mode(conf) == 0o750 and mode(conf / f"{role}.toml") == 0o640
    for k in keys:
        assert mode(conf / k) == 0o640 and len((conf / k).read_text().strip()) >= 32
    unit = (tmp_path / f"units/udp-tunnel-{role}.service").read_text()
    assert unit.startswith(f"# Installed by `make install-{role} config=FILE`: the settings are in "
                           f"{conf}/{role}.toml (systemctl reload udp-tunnel-{role} reads it again).\n")
    assert f"\nExecStart={exe} --config {conf}/{role}.toml\n" in unit
    assert "\nExecReload=/bin/kill -HUP $MAINPID\n" in unit and "\nSupplementaryGroups=udp-tunnel\n" in unit
    assert "LoadCredential" not in unit and "--key-file" not in unit
    assert f"\nCapabilityBoundingSet={caps}\n" in unit and f"\nAmbientCapabilities={caps}\n" in unit
    assert "\nLimitNOFILE=65536\n" in unit
    for line in HARDENING:
        assert f"\n{line}\n" in unit
    assert re.search(r"@[A-Z]+@", unit) is None
    # the installed program reads the installed file (its keys beside it)
    r2 = subprocess.run([str(exe), "--check-config", "--config", str(conf / f"{role}.toml")], capture_output=True,
                        text=True, timeout=30)
    assert (r2.returncode, r2.stderr) == (0, "")
    first = {k: (conf / k).read_text() for k in keys}
    r = make(f"install-{role}", f"config={example}", *dirs(tmp_path))  # again: the keys stay
    assert r.stdout == "".join(f"keeping the key in {conf}/{k}\n" for k in keys)
    assert {k: (conf / k).read_text() for k in keys} == first
    make("uninstall", *dirs(tmp_path))
    assert not exe.exists() and not (tmp_path / f"units/udp-tunnel-{role}.service").exists()
    assert sorted(os.listdir(conf)) == sorted([*keys, f"{role}.toml"])  # configuration and keys are kept


@pytest.mark.parametrize("target, text, needle", [
    ("install-outside", '[outside]\nlisten = "70000"\n', ":2: outside.listen: bad port '70000' (1-65535)"),
    ("install-outside", '[outside\nlisten = "9999"\n', ":1: not TOML: "),
    ("install-outside", '[inside]\noutside = "h:1"\nkey_file = "k"\n[services.a]\nservice = "h:2"\n',
     "is an inside agent's file (make install-inside config="),
    ("install-inside", '[outside]\nlisten = "9"\n[keys.a]\nfile = "k"\n[services.a]\nlisten = "9"\n',
     "is an outside agent's file (make install-outside config="),
    ("install-inside", None, "make install-inside: cannot read config="),
])
def test_install_with_a_bad_config_file_says_why_in_one_line_and_installs_nothing(tmp_path, target, text, needle):
    path = tmp_path / "agent.toml"
    if text is not None:
        path.write_text(text)
    r = make(target, f"config={path}", *dirs(tmp_path), check=False)
    assert r.returncode != 0 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert [line for line in r.stderr.splitlines() if not line.startswith("make: ***")] == [
        next(line for line in r.stderr.splitlines() if needle in line)]
    assert not (tmp_path / "prefix").exists() and not (tmp_path / "conf").exists()
    assert not (tmp_path / "units").exists()


def test_install_with_a_config_file_honours_destdir_also_for_a_key_file_named_by_its_full_path(tmp_path):
    text = open(os.path.join(EXAMPLES, "outside.toml")).read().replace(
        'file = "friend.key"', 'file = "/etc/udp-tunnel-test-friend/friend.key"')
    (tmp_path / "outside.toml").write_text(text)
    assert not os.path.exists("/etc/udp-tunnel-test-friend")
    dest = tmp_path / "dest"
    make("install-outside", f"config={tmp_path}/outside.toml", f"DESTDIR={dest}")
    assert not os.path.exists("/etc/udp-tunnel-test-friend")  # nothing outside DESTDIR
    assert (dest / "etc/udp-tunnel-test-friend/friend.key").exists() and (dest / "etc/udp-tunnel/home.key").exists()
    assert (dest / "etc/udp-tunnel/outside.toml").read_text() == text
    assert "\nExecStart=/usr/local/bin/udp-tunnel --config /etc/udp-tunnel/outside.toml\n" in (
        dest / "etc/systemd/system/udp-tunnel-outside.service").read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_config_file_units_pass_systemd_analyze_verify(tmp_path):
    for role in ("outside", "inside"):
        make(f"install-{role}", f"config={EXAMPLES}/{role}.toml", *dirs(tmp_path))
        unit = tmp_path / "units" / f"udp-tunnel-{role}.service"
        r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and unit.name not in r.stderr, r.stderr


# --- make deb ---

NEEDS_DPKG = pytest.mark.skipif(shutil.which("dpkg-deb") is None or shutil.which("dpkg") is None,
                                reason="dpkg and dpkg-deb are not installed (Debian's dpkg package)")


@pytest.fixture(scope="module")
def deb() -> str:
    from udp_tunnel import __version__
    make("deb")
    path = os.path.join(ROOT, "build", f"udp-tunnel_{__version__}_all.deb")
    assert os.path.exists(path)
    return path


def dpkg_deb(*args: str) -> str:
    return subprocess.run(["dpkg-deb", *args], capture_output=True, text=True, timeout=60, check=True).stdout


@NEEDS_DPKG
def test_make_deb_builds_a_package_of_this_version_with_the_program_units_examples_and_copyright(deb):
    from udp_tunnel import __version__
    fields = {f: dpkg_deb("-f", deb, f).strip() for f in ("Package", "Version", "Architecture", "Depends")}
    assert fields == {"Package": "udp-tunnel", "Version": __version__, "Architecture": "all",
                      "Depends": "python3 (>= 3.11)"}
    files = {}
    for line in dpkg_deb("-c", deb).splitlines():
        perms, owner, *_, name = line.split()
        if not perms.startswith("d"):
            files[name] = (perms, owner)
    assert files == {
        "./usr/bin/udp-tunnel": ("-rwxr-xr-x", "root/root"),
        "./lib/systemd/system/udp-tunnel-outside.service": ("-rw-r--r--", "root/root"),
        "./lib/systemd/system/udp-tunnel-inside.service": ("-rw-r--r--", "root/root"),
        "./usr/share/doc/udp-tunnel/copyright": ("-rw-r--r--", "root/root"),
        "./usr/share/doc/udp-tunnel/examples/outside.toml": ("-rw-r--r--", "root/root"),
        "./usr/share/doc/udp-tunnel/examples/inside.toml": ("-rw-r--r--", "root/root"),
    }


@NEEDS_DPKG
def test_the_package_s_maintainer_scripts_never_enable_start_or_restart_a_unit(deb, tmp_path):
    dpkg_deb("-e", deb, str(tmp_path / "control"))
    scripts = sorted(f for f in os.listdir(tmp_path / "control") if f != "control")
    assert scripts == ["postinst", "postrm", "prerm"]
    for name in scripts:
        path = tmp_path / "control" / name
        assert mode(path) == 0o755 and subprocess.run(["sh", "-n", str(path)]).returncode == 0
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        calls = re.findall(r"\bsystemctl\s+([a-z][a-z-]*)", code)
        assert set(calls) <= {"daemon-reload", "stop"}, (name, calls)
        assert code.count("systemctl") == len(calls) + code.count("command -v systemctl")  # no other use of it
        assert "deb-systemd-invoke" not in path.read_text() and "invoke-rc.d" not in path.read_text()
    prerm = (tmp_path / "control/prerm").read_text()
    assert 'if [ "$1" = remove ]' in prerm  # stops the agents when removed, not when upgraded


@NEEDS_DPKG
@pytest.mark.skipif(os.geteuid() != 0, reason="dpkg --root installs as root")
def test_the_package_installs_into_a_scratch_root_and_runs_from_there(deb, tmp_path):
    # dpkg --unpack, the installer itself (its database, its checks of the archive), into a scratch
    # root; configure (postinst) is not run: dpkg would run it chrooted there, where there is no shell.
    root = tmp_path / "root"
    for d in ("info", "updates", "triggers"):
        (root / "var/lib/dpkg" / d).mkdir(parents=True)
    (root / "var/lib/dpkg/status").touch()
    (root / "var/lib/dpkg/available").touch()
    subprocess.run(["dpkg", f"--root={root}", "--unpack", deb], capture_output=True, text=True, timeout=120,
                   check=True)
    status = subprocess.run(["dpkg", f"--root={root}", "-s", "udp-tunnel"], capture_output=True, text=True,
                            timeout=60).stdout
    assert "Status: install ok unpacked\n" in status
    from udp_tunnel import __version__
    exe = str(root / "usr/bin/udp-tunnel")
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout) == (0, f"udp-tunnel {__version__}\n")
    examples = root / "usr/share/doc/udp-tunnel/examples"
    for files in (["outside.toml"], ["inside.toml"], ["outside.toml", "inside.toml"]):
        args = [a for f in files for a in ("--config", str(examples / f))]
        r = subprocess.run([exe, "--check-config", *args], capture_output=True, text=True, timeout=30)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    unit = (root / "lib/systemd/system/udp-tunnel-outside.service").read_text()
    assert "\nExecStart=/usr/bin/udp-tunnel --config /etc/udp-tunnel/outside.toml\n" in unit
    assert "\nSupplementaryGroups=udp-tunnel\n" in unit and re.search(r"@[A-Z]+@", unit) is None


# --- the kernel data path and transparent mode: what their units get, only when on ---

KERNEL_LINES = ("SystemCallFilter=bpf", "ReadWritePaths=-/proc/sys/net/ipv4/conf/lo -/proc/sys/net/ipv6/conf/lo",
                "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK")


def security(unit: str) -> str:
    """systemd-analyze's exposure score of a unit file ("1.4 OK"), or "" where it can't say."""
    if shutil.which("systemd-analyze") is None:
        return ""
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", unit], capture_output=True, text=True,
                       timeout=60)
    last = (r.stdout.strip().splitlines() or [""])[-1]
    return last.split(": ", 1)[-1] if "Overall exposure level" in last else ""


def test_datapath_kernel_gives_the_unit_the_kernel_path_s_needs_and_the_default_units_stay_as_they_were(tmp_path):
    make("install-outside", "listen=9999", *dirs(tmp_path))
    make("install-inside", "service=127.0.0.1:51820", "outside=192.0.2.1:9999", *dirs(tmp_path))
    plain = {r: (tmp_path / f"units/udp-tunnel-{r}.service").read_text() for r in ("outside", "inside")}
    k = tmp_path / "k"
    make("install-outside", "listen=9999", "datapath=kernel", f"PREFIX={tmp_path}/prefix", f"UNITDIR={k}/units",
         f"CONFDIR={tmp_path}/conf")
    make("install-inside", "service=127.0.0.1:51820", "outside=192.0.2.1:9999", "datapath=kernel",
         f"PREFIX={tmp_path}/prefix", f"UNITDIR={k}/units", f"CONFDIR={tmp_path}/conf")
    scores = {}
    for role, unit in plain.items():
        kernel = (k / f"units/udp-tunnel-{role}.service").read_text()
        assert "AF_NETLINK" not in unit and "bpf" not in unit and "ReadWritePaths" not in unit
        assert "\nCapabilityBoundingSet=\n" in unit and "\nAmbientCapabilities=\n" in unit
        assert " --datapath " not in unit
        assert "\nCapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN\n" in kernel
        assert "\nAmbientCapabilities=CAP_BPF CAP_NET_ADMIN\n" in kernel
        assert f" --datapath kernel --key-file {tmp_path}/conf/key\n" in kernel
        for line in KERNEL_LINES:
            assert f"\n{line}\n" in kernel
        # the rest of the sandbox is as without it
        same = [x for x in unit.splitlines() if not x.startswith(("ExecStart=", "CapabilityBoundingSet=",
                                                                   "AmbientCapabilities=", "RestrictAddressFamilies="))]
        assert [x for x in kernel.splitlines() if x in same] == same
        assert re.search(r"@[A-Z]+@", kernel) is None
        if shutil.which("systemd-analyze"):
            path = str(k / f"units/udp-tunnel-{role}.service")
            r = subprocess.run(["systemd-analyze", "verify", path], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0 and "udp-tunnel" not in r.stderr, r.stderr
        scores[role] = (security(str(tmp_path / f"units/udp-tunnel-{role}.service")), security(str(
            k / f"units/udp-tunnel-{role}.service")))
    print(f"systemd-analyze security (exposure, lower is better), default unit -> datapath=kernel: {scores}")


@pytest.mark.parametrize("role, edit, caps, kernel", [
    ("outside", ('datapath = "auto"\n', 'datapath = "kernel"\n'), "CAP_NET_BIND_SERVICE CAP_BPF CAP_NET_ADMIN", True),
    ("outside", ('datapath = "auto"\n', 'datapath = "user"\n'), "CAP_NET_BIND_SERVICE", False),
    ("inside", ('datapath = "auto"\n', 'datapath = "kernel"\n'), "CAP_BPF CAP_NET_ADMIN", True),
    ("inside", ('client_address = "off"\n', 'client_address = "transparent"\n'), "CAP_NET_ADMIN CAP_NET_RAW", False),
])
def test_a_config_file_s_datapath_kernel_or_transparent_service_gives_its_unit_what_they_need(tmp_path, role, edit,
                                                                                              caps, kernel):
    text = open(os.path.join(EXAMPLES, f"{role}.toml")).read()
    assert edit[0] in text
    (tmp_path / f"{role}.toml").write_text(text.replace(edit[0], edit[1], 1))
    make(f"install-{role}", f"config={tmp_path}/{role}.toml", *dirs(tmp_path))
    unit = (tmp_path / f"units/udp-tunnel-{role}.service").read_text()
    assert f"\nCapabilityBoundingSet={caps}\n" in unit and f"\nAmbientCapabilities={caps}\n" in unit
    assert ("\nRestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK\n" in unit) == ("CAP_NET_ADMIN" in caps)
    assert ("\nSystemCallFilter=bpf\n" in unit) == kernel and ("ReadWritePaths=" in unit) == kernel
    assert re.search(r"@[A-Z]+@", unit) is None
    score = security(str(tmp_path / "units" / f"udp-tunnel-{role}.service"))
    print(f"{role} unit ({edit[1].strip()}): systemd-analyze security {score}")


def test_a_bad_datapath_installs_nothing(tmp_path):
    r = make("install-outside", "listen=9999", "datapath=ebpf", *dirs(tmp_path), check=False)
    assert r.returncode != 0 and "--datapath: invalid choice: 'ebpf'" in r.stderr
    assert not (tmp_path / "units").exists() and not (tmp_path / "prefix").exists()


def test_install_inside_with_client_address_transparent_gives_the_unit_its_capabilities_and_netlink(tmp_path):
    make("install-inside", "service=127.0.0.1:51820", "outside=vps.example.com:9999", "client_address=transparent",
         "datapath=kernel", *dirs(tmp_path))
    unit = (tmp_path / "units/udp-tunnel-inside.service").read_text()
    assert " --datapath kernel --client-address transparent --key-file " in unit
    caps = "CAP_BPF CAP_NET_ADMIN CAP_NET_RAW"  # each once, with the kernel path's
    assert f"\nCapabilityBoundingSet={caps}\n" in unit and f"\nAmbientCapabilities={caps}\n" in unit
    assert "\nRestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK\n" in unit
    for target, args, needle in (
            ("install-outside", ["listen=9999"], "--client-address is for the inside agent"),
            ("install-inside", ["service=127.0.0.1:1", "outside=192.0.2.1:9"], "invalid choice: 'real'")):
        r = make(target, *args, "client_address=real" if target == "install-inside" else "client_address=proxy-v2",
                 f"PREFIX={tmp_path}/p2", f"UNITDIR={tmp_path}/u2", f"CONFDIR={tmp_path}/c2", check=False)
        assert r.returncode != 0 and needle in r.stderr, r.stderr
        assert not (tmp_path / "u2").exists()
