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
    return subprocess.run(["make", "-s", "-C", ROOT, *args, "SYSTEMCTL=false"], capture_output=True, text=True,
                          timeout=120, check=check)


def dirs(tmp) -> list[str]:
    return [f"PREFIX={tmp}/prefix", f"UNITDIR={tmp}/units", f"CONFDIR={tmp}/conf"]


def test_install_targets_write_program_units_and_a_private_key_and_uninstall_removes_them(tmp_path):
    make("install-outside", "listen=9999", *dirs(tmp_path))
    make("install-inside", "service=localhost:51820", "outside=vps.example.com:9999", "max_clients=50",
         *dirs(tmp_path))
    exe = tmp_path / "prefix/bin/udp-tunnel"
    assert os.access(exe, os.X_OK)
    assert subprocess.run([str(exe), "--version"], capture_output=True, text=True).stdout.startswith("udp-tunnel ")
    key = tmp_path / "conf/key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_text().strip()) >= 32
    out = (tmp_path / "units/udp-tunnel-outside.service").read_text()
    ins = (tmp_path / "units/udp-tunnel-inside.service").read_text()
    assert f"ExecStart={exe} -l 9999 -t 25 --max-clients 1000 --key-file %d/key" in out
    assert f"ExecStart={exe} -s localhost:51820 -o vps.example.com:9999 -t 25 --max-clients 50 --key-file %d/key" in ins
    for unit in (out, ins):
        assert f"LoadCredential=key:{tmp_path}/conf/key" in unit and " -k " not in unit
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
    assert f"-t 25 --max-clients 1000 --wireguard-key {key} --key-file %d/key\n" in unit
    r = make("install-outside", "listen=9999", "wireguard_key=not-a-key", f"PREFIX={tmp_path}/p2",
             f"UNITDIR={tmp_path}/u2", f"CONFDIR={tmp_path}/c2", check=False)
    assert r.returncode != 0 and "not a WireGuard public key" in r.stderr
    assert not (tmp_path / "u2").exists() and not (tmp_path / "p2").exists()
