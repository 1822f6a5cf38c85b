import itertools
import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "src"))

from agents import Agent, EchoService, UdpNat, kernel_why_not  # noqa: E402

_NETNS = itertools.count()
@pytest.fixture(params=["user", "kernel"])
def datapath(request):
    """Both data paths, the test's agents with --datapath user and --datapath kernel (or a file's
    datapath = ...). The kernel one runs the whole test (the agents, the services, the clients) in a
    network namespace of its own, with only lo: the program attaches to every interface it finds,
    and changes lo's settings there; skipped with the reason where the kernel path cannot run."""
    if request.param == "user":
        yield "user"
        return
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip(f"--datapath kernel: {kernel_why_not()}")
    from kernelnet import Netns
    ns = Netns(f"utdp{os.getpid() % 100000}-{next(_NETNS)}")
    try:
        with ns.entered():
            why = kernel_why_not()
            if why:
                pytest.skip(f"--datapath kernel: {why}")
            yield "kernel"
    finally:
        ns.close()


@pytest.fixture
def lab(request, tmp_path):
    """Start agents and services; stop them all and show their logs at the end. A test that asks for
    `datapath` gets its agents started with --datapath (unless they read a --config file)."""
    started: list = []
    path = request.getfixturevalue("datapath") if "datapath" in request.fixturenames else None

    class Lab:
        datapath = path

        def agent(self, name, args, **kw) -> Agent:
            if path is not None and "--config" not in args:
                args = [*args, "--datapath", path]
            a = Agent(name, args, tmp_path, **kw)
            started.append(a)
            return a

        def echo(self, host="127.0.0.1") -> EchoService:
            e = EchoService(host)
            started.append(e)
            return e

        def nat(self, outside) -> UdpNat:
            n = UdpNat(outside)
            started.append(n)
            return n

    yield Lab()
    for x in reversed(started):
        if isinstance(x, Agent):
            x.stop()
            print(f"----- log of {x.name} -----\n{x.log()}")
        else:
            x.close()
