import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "src"))

from agents import Agent, EchoService, UdpNat  # noqa: E402


@pytest.fixture
def lab(tmp_path):
    """Start agents and services; stop them all and show their logs at the end."""
    started: list = []

    class Lab:
        def agent(self, name, args, **kw) -> Agent:
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
