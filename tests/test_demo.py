"""The narrated demo (``python -m trio_heartbeat demo``), run in-process at its fast speed.

The demo runs on real sockets and a real clock, so these assertions are about
its story, not its timings: every scene is told in order, the silent network
is detected and reported, and the client comes back each time. The only
numbers checked are bounds the setup guarantees (a round trip through a proxy
that delays each direction by 20 ms is at least 40 ms).
"""

from __future__ import annotations

import re

import pytest
import trio

from trio_heartbeat._demo import run_demo

pytestmark = pytest.mark.slow

SCENES = ("1.", "2.", "3.", "4.", "5.", "Done")
EVENT = re.compile(r"\[ *(\d+\.\d\d)s\] (server|client|proxy) +(\S.*)")


async def narrate() -> list[str]:
    chunks: list[str] = []
    with trio.fail_after(30):
        assert await run_demo(fast=True, write=chunks.append) == 0
    return "".join(chunks).splitlines()


def by_scene(lines: list[str]) -> dict[str, list[str]]:
    """What each scene says (``""`` holds what comes before the first), without timestamps."""
    scenes: dict[str, list[str]] = {"": []}
    current = ""
    for line in lines:
        if line.startswith("== "):
            current = line[3:].split(" ")[0]
            scenes[current] = []
        elif match := EVENT.fullmatch(line):
            scenes[current].append(f"{match[2]} {match[3]}")
    return scenes


def index_of(lines: list[str], pattern: str, start: int = 0) -> int:
    """The first line at or after ``start`` that matches ``pattern``."""
    for index in range(start, len(lines)):
        if re.search(pattern, lines[index]):
            return index
    raise AssertionError(f"no line matches {pattern!r} after line {start}:\n" + "\n".join(lines))


async def test_every_scene_is_told_in_order_with_times_that_only_go_forward() -> None:
    lines = await narrate()
    assert lines[0].startswith("trio-heartbeat demo:")
    assert "every 0.05 s when idle" in lines[1]
    assert "silent for 0.20 s is dead" in lines[1]
    headers = [line[3:] for line in lines if line.startswith("== ")]
    assert [header.split(" ")[0] for header in headers] == list(SCENES)
    events = [EVENT.fullmatch(line) for line in lines[2:] if line and not line.startswith("== ")]
    assert all(events), [line for line in lines[2:] if line and not EVENT.fullmatch(line)]
    times = [float(event[1]) for event in events if event is not None]
    assert times == sorted(times)


async def test_the_silent_network_is_detected_and_the_client_comes_back() -> None:
    scenes = by_scene(await narrate())
    port = re.search(r"listening on 127\.0\.0\.1:(\d+)", "\n".join(scenes[""]))
    assert port is not None

    healthy = scenes["1."]
    assert index_of(healthy, r"sent 'hello #1', echo 'hello #1'") < index_of(
        healthy, r"sent 'hello #2', echo 'hello #2'"
    )

    slow = scenes["2."]
    round_trips = [
        float(m[1]) for line in slow if (m := re.search(r"round trip ([\d.]+) ms", line))
    ]
    # The proxy now delays each way by 20 ms (a PING already past it may still
    # come back quicker, so not every report need show it).
    assert max(round_trips, default=0.0) >= 40.0, slow
    index_of(slow, r"sent 'slow #3', echo 'slow #3'")

    silent = scenes["3."]
    blackholed = index_of(silent, r"^proxy blackholing both directions$")
    lost = index_of(
        silent,
        r"^client connection lost \(it was up [\d.]+ s\): closed with 1011: heartbeat timeout: peer silent$",
        blackholed,
    )
    declared = index_of(silent, r"^client declared the server dead", blackholed)
    detected = re.search(
        r"dead ([\d.]+) s after the network went silent \(timeout 0.20 s\)", silent[declared]
    )
    assert detected is not None
    assert 0.0 < float(detected[1]) < 2.0  # by the heartbeat timeout, long before TCP would notice
    healed = index_of(silent, r"^proxy network healed$", max(lost, declared))
    reconnected = index_of(
        silent, r"^client connected to 127\.0\.0\.1:\d+ \(attempt \d+\)$", healed
    )
    index_of(silent, r"sent 'back #4', echo 'back #4'", reconnected)

    health = scenes["4."]
    assert index_of(health, r"server health SERVING -> DEGRADED$") < index_of(
        health, r"server health DEGRADED -> SERVING$"
    )

    restart = scenes["5."]
    going_away = index_of(
        restart, r"^client connection lost \(it was up [\d.]+ s\): closed with 1001 by the peer"
    )
    stopped = index_of(restart, r"^server drained and stopped$")
    back = index_of(restart, rf"^server back on 127\.0\.0\.1:{port[1]}$", stopped)
    reconnected = index_of(restart, r"^client connected to 127\.0\.0\.1:\d+", max(back, going_away))
    index_of(restart, r"sent 'again #5', echo 'again #5'", reconnected)

    summary = re.search(r"(\d+) connections over (\d+) attempts", "\n".join(scenes["Done"]))
    assert summary is not None
    connections, attempts = int(summary[1]), int(summary[2])
    assert connections >= 3  # the first, after the silent network, after the restart
    assert attempts >= connections
