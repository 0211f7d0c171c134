from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings

if TYPE_CHECKING:
    from etcd_server import EtcdServer

# Property tests judge behaviour, not speed: on a loaded 2-core CI machine under
# coverage, data generation and single examples can be slow without anything
# being wrong, so neither per-example deadlines nor the slowness health check
# may fail a run.
settings.register_profile(
    "thb", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("thb")


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """Virtual time that jumps ahead whenever every task is blocked."""
    return trio.testing.MockClock(autojump_threshold=0)


#: How much virtual time a test under ``autojump_clock`` may take. The longest
#: takes about 830 s (a reconnecting client cancelled at every moment). The
#: limit is itself a deadline the clock jumps to, so a regression that waits
#: forever fails here in a moment of real time, with a message, whether or not
#: timers keep firing meanwhile.
VIRTUAL_TIME_LIMIT = 3600.0


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Bound every virtual-time test by :data:`VIRTUAL_TIME_LIMIT` (before pytest-trio wraps it).

    Tests in real time are left to the per-test limit of pytest-timeout.
    """
    test = getattr(item, "obj", None)
    if "autojump_clock" in getattr(item, "fixturenames", ()) and inspect.iscoroutinefunction(test):

        @functools.wraps(test)
        async def bounded(**kwargs: Any) -> None:
            with trio.move_on_after(VIRTUAL_TIME_LIMIT) as scope:
                await test(**kwargs)
            if scope.cancelled_caught:
                pytest.fail(
                    f"still running after {VIRTUAL_TIME_LIMIT:g} s of virtual time: it hangs",
                    pytrace=False,
                )

        item.obj = bounded  # type: ignore[attr-defined]
    yield


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A real etcd member of its own on loopback, stopped after the test (tests/etcd_server.py).

    Skipped where etcd is not installed, except under CI (``CI`` set), where
    it must be: the test fails and says how to install it.
    """
    from etcd_server import EtcdServer, find_etcd  # here: this file is also copied alone

    binary = find_etcd()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(
                "etcd-server is required under CI: apt-get install -y etcd-server", pytrace=False
            )
        pytest.skip("etcd is not installed (apt-get install -y etcd-server)")
    with EtcdServer(tmp_path / "etcd", binary=binary) as server:
        yield server
