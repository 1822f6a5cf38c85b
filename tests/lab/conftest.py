import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each test's result on the item, so fixtures can print logs only on failure."""
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call = rep


@pytest.fixture
def net(lab, tmp_path, request):
    """Agents of the requesting module's lab; their logs are printed when the test failed."""
    from test_lab import Net
    n = Net(lab, str(tmp_path))
    yield n
    logs = n.stop_agents()
    failed = getattr(request.node, "rep_call", None)
    if failed is None or failed.failed:
        print(logs)
