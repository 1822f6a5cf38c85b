"""--datapath: which path an agent runs and why, in one line when it can't (issue 19)."""

from __future__ import annotations

import subprocess

import pytest

from agents import command, env, free_port, without_capabilities
from udp_tunnel.io.datapath import Datapath, DatapathError, choose
from udp_tunnel.io.kernel import KernelUnavailable


def refuse(**kw):
    raise KernelUnavailable("needs root or CAP_NET_ADMIN and CAP_BPF")


def test_auto_falls_back_to_user_space_saying_why_kernel_refuses_in_one_line_user_never_asks():
    d = choose("auto", opener=refuse)
    assert (d.path, d.why, d.kp) == ("user", "the kernel path cannot run here: needs root or CAP_NET_ADMIN and "
                                             "CAP_BPF", None)
    assert d.line() == "datapath user space (the kernel path cannot run here: needs root or CAP_NET_ADMIN and CAP_BPF)"
    assert d.snapshot() == {"path": "user", "mode": "auto", "why": d.why}
    with pytest.raises(DatapathError) as e:
        choose("kernel", opener=refuse)
    assert str(e.value) == "--datapath kernel: the kernel path cannot run here: needs root or CAP_NET_ADMIN and CAP_BPF"

    def never(**kw):
        raise AssertionError("--datapath user must not try the kernel path")
    d = choose("user", opener=never)
    assert (d.path, d.why) == ("user", "--datapath user") and isinstance(d, Datapath)
    d = choose("auto", opener=lambda **kw: (_ for _ in ()).throw(OSError(24, "Too many open files")))
    assert d.why == "the kernel path cannot run here: [Errno 24] Too many open files"


def test_an_agent_asked_for_the_kernel_path_without_privileges_refuses_to_start_in_one_line(tmp_path):
    drop = without_capabilities()
    for args in (["-l", f"127.0.0.1:{free_port()}"], ["-s", "127.0.0.1:1", "-o", f"127.0.0.1:{free_port()}"]):
        r = subprocess.run(command(*args, "--datapath", "kernel", "--control", "none"), capture_output=True,
                           text=True, timeout=30, env=env(UDP_TUNNEL_KEY="a key of some length"), preexec_fn=drop)
        assert (r.returncode, r.stdout) == (1, "")
        assert r.stderr == ("udp-tunnel: --datapath kernel: the kernel path cannot run here: needs root or "
                            "CAP_NET_ADMIN and CAP_BPF\n")


def test_an_auto_agent_without_privileges_runs_in_user_space_and_says_why(lab):
    out = lab.agent("outside", ["-l", f"127.0.0.1:{free_port()}", "-t", "1", "--datapath", "auto"],
                    preexec=without_capabilities())
    why = "the kernel path cannot run here: needs root or CAP_NET_ADMIN and CAP_BPF"
    assert out.status()["datapath"] == {"path": "user", "mode": "auto", "why": why}
    assert f", datapath user space ({why}), " in out.log()


def test_status_and_the_metrics_say_which_path_runs_what_it_relays_and_what_stays_in_user_space():
    from test_status import snapshot
    from udp_tunnel.ops import metrics, status
    kernel = {"path": "kernel", "mode": "auto", "why": "--datapath auto: eBPF at tc ingress of eth0, lo", "flows": 4,
              "kept_count": 1, "kept": {"from 192.0.2.7:40000": "client and tunnel differ in address family"},
              "notes": ["turned on net.ipv4.conf.lo.forwarding (lets the program look up routes; set back when the "
                        "last agent that relies on it stops)"], "attached": ["eth0", "lo"],
              "program": {"relayed": 120, "local": 0, "control": 3, "unknown": 7}}
    text = status.render(snapshot(datapath=kernel))
    assert ("  datapath: kernel (--datapath auto: eBPF at tc ingress of eth0, lo): 4 direction(s) relayed in the "
            "kernel, 1 in user space\n"
            "    in user space: from 192.0.2.7:40000: client and tunnel differ in address family\n"
            "    note: turned on net.ipv4.conf.lo.forwarding (lets the program look up routes; set back when the "
            "last agent that relies on it stops)\n"
            "    program: 120 relayed, 3 control, 7 unknown\n") in text
    body = metrics.render(snapshot(datapath=kernel))
    assert 'datapath="kernel"} 1\n' in body
    assert 'udp_tunnel_datapath_directions{where="kernel"} 4\n' in body
    assert 'udp_tunnel_datapath_directions{where="user"} 1\n' in body
    assert 'udp_tunnel_kernel_packets_total{reason="relayed"} 120\n' in body
    user = {"path": "user", "mode": "auto", "why": "the kernel path cannot run here: needs Linux 6.6 or later"}
    assert "  datapath: user space (the kernel path cannot run here: needs Linux 6.6 or later)\n" in \
        status.render(snapshot(datapath=user))
    body = metrics.render(snapshot(datapath=user))
    assert 'datapath="user"} 1\n' in body and "datapath_directions" not in body and "kernel_packets" not in body
