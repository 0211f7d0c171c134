"""The benchmark harness still runs and reports every field.

Benchmarks are not tests: nothing here judges a timing. The codec benchmark
runs with a few frames and two samples, to prove that it executes, checks its
codec's output, and fills in the report; the ratio and verdict logic is
checked on hand-made timings, where the right answer is known exactly.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parents[1]
TINY = ("--scale", "0.0005", "--repeats", "2")


@pytest.fixture(autouse=True)
def _benchmarks_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    # The benchmarks package sits beside tests/, outside the installed package.
    monkeypatch.syspath_prepend(str(ROOT))


def test_codec_benchmark_reports_every_field() -> None:
    from benchmarks._report import Settings
    from benchmarks.bench_codec import DECODE_TARGET, run

    results = run(Settings(scale=0.0005, repeats=2))

    assert [(result.case, result.subject) for result in results] == [
        ("decode 64 B DATA frames", "bare Struct.unpack_from loop"),
        ("decode 64 B DATA frames", "FrameDecoder, whole buffer"),
        ("decode 64 B DATA frames", "FrameDecoder, 64 KiB chunks"),
        ("decode 4 KiB DATA frames", "bare Struct.unpack_from loop"),
        ("decode 4 KiB DATA frames", "FrameDecoder, whole buffer"),
        ("decode 4 KiB DATA frames", "FrameDecoder, 64 KiB chunks"),
        ("encode 64 B DATA frames", "bare Struct.pack + payload"),
        ("encode 64 B DATA frames", "encode_data(payload)"),
        ("encode 64 B DATA frames", "encode_frame(DATA, payload)"),
        ("encode 4 KiB DATA frames", "bare Struct.pack + payload"),
        ("encode 4 KiB DATA frames", "encode_data(payload)"),
        ("encode 4 KiB DATA frames", "encode_frame(DATA, payload)"),
    ]
    for index, result in enumerate(results):
        payload_size = 64 if "64 B" in result.case else 4096
        first_of_case = results[index - index % 3]
        assert result.benchmark == "codec"
        assert result.unit == "frames"
        assert result.operations == (50 if payload_size == 64 else 5)
        assert result.nbytes == result.operations * (6 + payload_size)
        assert len(result.timing.samples_ns) == 2
        assert result.rate > 0
        assert result.bytes_per_second > 0
        assert result.ns_per_operation > 0
        if result is first_of_case:
            assert result.baseline is None
            assert result.verdict == "baseline"
            assert result.ratio == 1.0
            continue
        assert result.baseline is first_of_case
        assert result.ratio == result.rate / first_of_case.rate
        if result.case.startswith("decode") and "chunks" in result.subject:
            assert result.target == DECODE_TARGET
            assert result.passed is (result.ratio >= DECODE_TARGET)
            assert result.verdict == f">= 0.50 {'PASS' if result.passed else 'FAIL'}"
        else:
            assert result.target is None
            assert result.passed is None
            assert result.verdict == ""


def test_ratio_and_verdict_come_from_the_best_samples() -> None:
    from benchmarks._report import Result, Timing, format_results

    baseline = Result("demo", "case", "bare", "frames", 1000, 0, Timing((100, 400, 120)))

    def against(samples: tuple[int, ...]) -> Result:
        return Result("demo", "case", "ours", "frames", 1000, 0, Timing(samples), baseline, 0.5)

    exactly_half = against((200, 260, 240))
    assert baseline.rate == 1e10
    assert exactly_half.ratio == 0.5
    assert exactly_half.median_ratio == pytest.approx(0.5)
    assert exactly_half.spread == pytest.approx(0.2)
    assert exactly_half.verdict == ">= 0.50 PASS"
    assert against((201,)).verdict == ">= 0.50 FAIL"

    table = format_results([baseline, exactly_half]).splitlines()
    assert table[0] == "demo: case (1,000 frames per sample, best of 3)"
    assert table[1].split() == [
        "subject",
        "frames/s",
        "MB/s",
        "ns/frame",
        "spread",
        "ratio",
        "(median)",
        "target",
    ]
    baseline_row = ["bare", "10,000,000,000", "-", "0.1", "20.0%", "1.00", "(1.00)", "baseline"]
    assert table[2].split() == baseline_row
    assert table[3].split()[-3:] == [">=", "0.50", "PASS"]


def test_command_line_prints_machine_command_and_tables(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.__main__ import available, main

    assert "codec" in available()
    assert main(["codec", *TINY]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("CPU: ")
    assert f"{platform.python_version()}; trio {trio.__version__}" in lines[0]
    assert lines[1] == "command: python -m benchmarks codec --scale 0.0005 --repeats 2"
    headings = [line for line in lines if line.startswith("codec: ")]
    assert headings == [
        "codec: decode 64 B DATA frames (50 frames, 0.0 MB per sample, best of 2)",
        "codec: decode 4 KiB DATA frames (5 frames, 0.0 MB per sample, best of 2)",
        "codec: encode 64 B DATA frames (50 frames, 0.0 MB per sample, best of 2)",
        "codec: encode 4 KiB DATA frames (5 frames, 0.0 MB per sample, best of 2)",
    ]
    verdicts = [line for line in lines if line.endswith((" PASS", " FAIL"))]
    assert len(verdicts) == 2
    assert any(line.startswith("targets met: ") and line.endswith(" of 2") for line in lines)


def test_the_summary_counts_the_absolute_targets_too(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import benchmarks.__main__ as command
    from benchmarks._report import Check, Result, Settings, Timing

    def run(settings: Settings) -> list[Result | Check]:
        baseline = Result("fake", "case", "bare", "ops", 10, 0, Timing((100,)))
        ours = Result("fake", "case", "ours", "ops", 10, 0, Timing((100,)), baseline, 0.5)
        memory = Check("fake", "memory <= 1 KiB", "2.00 KiB", passed=False)
        return [baseline, ours, memory, Check("fake", "nothing lost", "0 lost", passed=True)]

    monkeypatch.setattr(command, "available", lambda: ["fake"])
    monkeypatch.setattr(command, "load", lambda name: run)
    assert command.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "targets met: 2 of 3" in lines
    assert lines[-1] == "  FAIL fake: memory <= 1 KiB: 2.00 KiB"


def test_an_unknown_benchmark_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit) as raised:
        main(["no-such-benchmark"])
    assert raised.value.code == 2
    assert "no benchmark named no-such-benchmark" in capsys.readouterr().err


# -- the network benchmarks ---------------------------------------------------------
# Each runs for real at a tiny scale: child processes, loopback sockets and all,
# to prove that it starts and stops its peers, checks its subjects' answers and
# fills in every field. Their figures at this scale mean nothing and are not
# judged.


def _websockets_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("websockets") is not None


@pytest.mark.slow
def test_throughput_benchmark_reports_every_subject() -> None:
    from benchmarks._report import Settings
    from benchmarks.bench_throughput import TARGET, run

    results = run(Settings(scale=0.0005, repeats=2))

    subjects = [
        "raw Trio, send_all per message",
        "raw Trio, batched send_all",
        "trio-heartbeat, conn.send()",
    ]
    if _websockets_installed():
        subjects.append("websockets (asyncio), ws.send()")
    cases = [
        ("send 64 B DATA messages on one connection", 64, 2),
        ("send 4 KiB DATA messages on one connection", 4096, 1),
    ]
    assert [(r.case, r.subject) for r in results] == [
        (case, subject) for case, _, _ in cases for subject in subjects
    ]
    for index, result in enumerate(results):
        case, size, messages = cases[index // len(subjects)]
        baseline = results[index - index % len(subjects)]
        assert result.benchmark == "throughput"
        assert result.unit == "messages"
        assert result.operations == messages
        assert result.nbytes == messages * size
        assert len(result.timing.samples_ns) == 2
        assert result.rate > 0
        if result is baseline:
            assert result.baseline is None
            assert result.verdict == "baseline"
        else:
            assert result.baseline is baseline
        if result.subject.startswith("trio-heartbeat"):
            assert result.target == TARGET
            assert result.verdict == f">= {TARGET:.2f} {'PASS' if result.passed else 'FAIL'}"
        elif result is not baseline:
            assert result.target is None


@pytest.mark.slow
def test_rtt_benchmark_reports_percentiles(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks._report import Settings
    from benchmarks.bench_rtt import TARGET, run

    results = run(Settings(scale=0.0005, repeats=2))

    subjects = [
        "raw Trio ping-pong",
        "trio-heartbeat, await conn.ping()",
        "trio-heartbeat, PONG rtt (connection's own)",
    ]
    if _websockets_installed():
        subjects.append("websockets (asyncio), await ws.ping()")
    assert [r.subject for r in results] == subjects
    baseline = results[0]
    assert baseline.baseline is None
    for result in results:
        assert result.benchmark == "rtt"
        assert result.unit == "round trips"
        assert result.operations == 1
        assert len(result.timing.samples_ns) == 2
        assert all(sample > 0 for sample in result.timing.samples_ns)
        assert result.baseline is (None if result is baseline else baseline)
    ping = results[1]
    assert ping.target is not None
    assert ping.target == pytest.approx(1 / TARGET)
    # Judged on the ratio of medians (p50s), not of the fastest samples.
    assert ping.passed is (ping.median_ratio >= ping.target)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("rtt: PING -> PONG round trip on loopback")
    assert lines[0].endswith("percentiles of 2 round trips")
    assert lines[1].split()[1:] == [
        "p50",
        "us",
        "p90",
        "us",
        "p99",
        "us",
        "p50",
        "/",
        "baseline",
        "p50",
    ]
    table = lines[2 : 2 + len(subjects)]
    assert [row.split("  ")[1].strip() for row in table] == subjects
    assert table[0].split()[-1] == "1.00"  # the baseline's p50 over itself


def test_rtt_percentiles_and_median_verdict() -> None:
    from benchmarks._report import Result, Timing
    from benchmarks.bench_rtt import _JudgedOnMedian, percentile

    assert percentile([5, 1, 4, 2, 3], 50) == 3
    assert percentile([5, 1, 4, 2, 3], 99) == 5
    assert percentile([7], 90) == 7
    baseline = Result("rtt", "case", "raw", "round trips", 1, 0, Timing((100, 200, 300)))

    def ours(samples: tuple[int, ...]) -> Result:
        return _JudgedOnMedian(
            "rtt", "case", "ours", "round trips", 1, 0, Timing(samples), baseline, 0.5
        )

    # Fastest sample far better than the baseline's, median exactly twice as slow: PASS.
    assert ours((10, 400, 900)).verdict == ">= 0.50 PASS"
    assert ours((10, 401, 900)).verdict == ">= 0.50 FAIL"
    # Fastest sample worse than the baseline's, median fine: judged on the median.
    assert ours((150, 200, 250)).ratio < 1
    assert ours((150, 200, 250)).passed is True


@pytest.mark.slow
def test_idle_benchmark_reports_cpu_memory_and_delays(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks._report import Check, Result, Settings
    from benchmarks.bench_idle import CPU_TARGET, SUBJECTS, run

    report = run(Settings(scale=0.0005, repeats=2))
    results = [row for row in report if isinstance(row, Result)]
    checks = [row for row in report if isinstance(row, Check)]
    assert report == [*results, *checks]
    assert [check.target for check in checks] == [
        "RSS per connection <= 10 KiB",
        "no PONG later than 100 ms",
    ]

    kinds = ["watched", "raw", "thb", *(["websockets"] if _websockets_installed() else [])]
    assert [r.subject for r in results] == [SUBJECTS[kind] for kind in kinds]
    for result in results:
        assert result.benchmark == "idle"
        assert result.case == "server CPU, 2 connections heartbeating every second, 0.5 s window"
        assert result.unit == "heartbeats"
        assert result.operations >= 1
        assert len(result.timing.samples_ns) == 1
    assert results[0].verdict == "baseline"
    assert results[1].target is None
    assert results[2].target == pytest.approx(1 / CPU_TARGET)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "idle: memory, CPU and PONG delays of the server, 2 connections, 0.5 s window"
    cells = [re.split(r"\s{2,}", line.strip()) for line in out[1 : 2 + len(kinds)]]
    header, rows = cells[0], {row[0]: dict(zip(cells[0], row, strict=True)) for row in cells[1:]}
    assert header[:4] == ["subject", "up", "failed", "dropped"]
    assert sorted(rows) == sorted(SUBJECTS[kind] for kind in kinds)
    for row in rows.values():
        assert (row["up"], row["failed"], row["dropped"]) == ("2", "0", "0")
    assert out[2 + len(kinds) : 4 + len(kinds)] == [check.line for check in checks]


def test_idle_plan_and_measurement_arithmetic() -> None:
    from benchmarks._report import Settings
    from benchmarks.bench_idle import Measurement, Plan

    plan = Plan.from_settings(Settings())
    assert (plan.connections, plan.ramp, plan.settle, plan.window) == (5000, 6.0, 10.0, 10.0)
    assert plan.client_shares == [2500, 2500]
    assert Plan(5001, 0, 0, 1).client_shares == [1667, 1667, 1667]
    tiny = Plan.from_settings(Settings(scale=0.0005))
    assert (tiny.connections, tiny.window, tiny.client_shares) == (2, 0.5, [2])
    assert Plan.from_settings(Settings(), connections=40, window=2.0).client_shares == [40]

    measurement = Measurement(
        kind="thb",
        opened=1000,
        failed=3,
        dropped=200,
        dropped_in_window=100,
        window_seconds=2.5,
        cpu_seconds=0.5,
        rss_empty=10_000_000,
        rss_full=18_000_000,
        delays_us=(1_000, 99_000, 100_001, 5_000),
        server_pings=7,
    )
    assert measurement.alive == 800
    assert measurement.rss_per_connection == 10_000
    assert measurement.heartbeats == 2000
    assert measurement.lost == 203
    assert measurement.worst_delay_us == 100_001
    assert measurement.late == 1
    assert measurement.delay_percentile_us(50) == 5_000
    assert measurement.delay_percentile_us(99) == 100_001


def _children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid``, from ``/proc``."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text(encoding="ascii").rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_detection_benchmark_freezes_convicts_and_cleans_up(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """2 of 20 peers frozen for each subject: both convicted, every figure printed, no process left.

    The figures are not judged; what is pinned is that the frozen client really
    stopped and was told apart from the others, that each conviction was timed,
    and that every child (the frozen one included) is gone when run() returns.
    """
    import os

    from benchmarks._report import Check, Settings
    from benchmarks.bench_detection import SUBJECTS, default_detector_name, run

    before = set(_children_of(os.getpid()))
    report = run(Settings(scale=0.02))
    assert set(_children_of(os.getpid())) <= before

    checks = [row for row in report if isinstance(row, Check)]
    assert checks == report
    default = f"trio-heartbeat, default detector ({default_detector_name()})"
    assert [check.target for check in checks] == [
        f"{label}: {target}"
        for label in ("trio-heartbeat, FixedTimeout", default)
        for target in (
            "every frozen peer convicted, p99 freeze -> conviction <= timeout + 50 ms (3.05 s)",
            "no healthy peer convicted",
        )
    ]
    assert checks[0].figure.startswith("2 of 2 convicted, p99 ")
    assert checks[2].figure.startswith("2 of 2 convicted, p99 ")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        "detection: freeze -> conviction, 20 idle connections, 2 frozen by SIGSTOP, "
        "interval 1 s, timeout 3 s"
    )
    cells = [re.split(r"\s{2,}", line.strip()) for line in out[1 : 2 + len(SUBJECTS)]]
    header, rows = cells[0], [dict(zip(cells[0], row, strict=True)) for row in cells[1:]]
    assert header[:2] == ["subject", "convicted"]
    assert [row["subject"] for row in rows] == [
        "raw Trio + silence deadline (baseline)",
        "trio-heartbeat, FixedTimeout",
        default,
    ]
    for row in rows:
        assert row["convicted"] == "2 of 2"
        # Every conviction was timed: after the freeze, after its own deadline
        # (a conviction on time is late by a hair, never early), within the watch.
        assert 0 < float(row["p50 s"]) <= float(row["max s"]) < 4
        assert 0 < float(row["silence p50 s"]) <= float(row["silence max s"]) < 4
        assert 0 <= float(row["late p50 ms"]) <= float(row["late max ms"]) < 1000
    assert out[-len(checks) :] == [check.line for check in checks]


def test_detection_plan_and_percentiles() -> None:
    """The plan at scale 1 and at the smoke test's scale; a missed conviction counts as never."""
    import math
    from collections import Counter

    from benchmarks._report import Settings
    from benchmarks.bench_detection import Measurement, Plan, percentile

    plan = Plan.from_settings(Settings())
    assert (plan.frozen, plan.healthy, plan.ramp, plan.watch) == (100, 900, 2.0, 4.0)
    assert (plan.settle_for("fixed"), plan.settle_for("default")) == (5.0, 15.0)
    assert plan.healthy_shares == [100] * 9
    tiny = Plan.from_settings(Settings(scale=0.02))
    assert (tiny.connections, tiny.frozen, tiny.healthy_shares) == (20, 2, [18])
    assert (tiny.settle_for("watched"), tiny.settle_for("default")) == (1.0, 1.0)
    assert Plan(1, 201, 0.0, 1.0, 1.0).healthy_shares == [67, 67, 67]

    assert percentile([0.5, 0.1, 0.4, 0.2, 0.3], 99) == 0.5
    assert math.isnan(percentile([], 50))
    measurement = Measurement(
        subject="fixed",
        frozen=4,
        healthy=10,
        timeout=3.0,
        detection=(2.5, 2.25, 2.75),
        silence=(3.0, 3.0, 3.0),
        lateness=(0.001, 0.002, 0.003),
        frozen_endings=Counter({"1011 heartbeat timeout: peer silent": 3, "not convicted": 1}),
        healthy_convicted=1,
        healthy_endings=Counter({"1011 heartbeat timeout: peer silent": 1, "1006 reset": 2}),
    )
    assert (measurement.convicted, measurement.missed, measurement.healthy_lost) == (3, 1, 3)
    assert measurement.detection_percentile(50) == 2.5
    assert measurement.detection_percentile(75) == 2.75
    assert measurement.detection_percentile(99) == math.inf


# -- the failure detector benchmark -------------------------------------------------


def test_detectors_benchmark_reports_every_scenario_and_detector(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """At 500 heartbeats a scenario: every row, every target, and the printed table."""
    from benchmarks._report import Check, Result, Settings
    from benchmarks.bench_detectors import DETECTORS, MEDIAN_TARGETS, SCENARIOS, run

    report = run(Settings(scale=0.0005, repeats=2))
    results = [row for row in report if isinstance(row, Result)]
    checks = [row for row in report if isinstance(row, Check)]
    assert report == [*results, *checks]
    names = [name for name, _, _ in DETECTORS]
    assert [(r.case, r.subject) for r in results] == [
        (f"{scenario.name}: replay cost", name) for scenario in SCENARIOS for name in names
    ]
    for index, result in enumerate(results):
        baseline = results[index - index % len(names)]
        assert result.benchmark == "detectors"
        assert result.unit == "heartbeats"
        assert 0 < result.operations <= 500
        assert result.baseline is (None if result is baseline else baseline)
        assert result.target is None
    assert [check.target for check in checks] == [
        *(f"{scenario.name}: no false conviction" for scenario in SCENARIOS),
        *(f"{name}: median detection <= {bound:g} s" for name, bound in MEDIAN_TARGETS.items()),
    ]
    assert all("Akka's preset" in check.figure for check in checks[len(SCENARIOS) :])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        "detectors: false convictions and detection silence, 500 heartbeats per scenario, "
        "one a second"
    )
    rows = [line.split("  ")[2].strip() for line in out if line.startswith("    ") and "." in line]
    assert rows == names * len(SCENARIOS)
    assert [line for line in out if line.startswith("  target: ")] == [c.line for c in checks]


def test_detectors_benchmark_traces_and_replay() -> None:
    """The traces are seeded and shaped as documented; the replay counts a late arrival."""
    from itertools import pairwise

    from benchmarks.bench_detectors import SCENARIOS, Scenario, percentile, replay, trace
    from trio_heartbeat._detectors import FixedTimeout

    lan, jitter, heavy, stalls = (trace(scenario, 2000) for scenario in SCENARIOS)
    assert list(lan) == list(trace(SCENARIOS[0], 2000))  # the same every run
    assert len(lan) == 2000  # nothing lost
    assert all(0.0001 <= t - i <= 0.0009 for i, t in enumerate(lan))
    assert all(0.05 <= t % 1.0 <= 0.15 for t in jitter)
    assert 1985 <= len(jitter) < 2000  # one in a thousand lost
    assert len(heavy) < 1990  # one in a hundred lost
    assert list(heavy) == sorted(heavy)  # in order, as on a stream
    assert len(stalls) < 1990
    # A stall after every heartbeat: those due during a stall go out at its end, as one.
    stalled = trace(Scenario("always stalled", 7, lambda rng: 0.0, stall=1.0), 50)
    gaps = [later - earlier for earlier, later in pairwise(stalled)]
    assert len(stalled) < 50
    assert max(gaps) > 1.5
    assert max(gaps) <= 3.0  # a stall of at most 2 s, from within the next second
    assert percentile(sorted([5.0, 1.0, 4.0, 2.0, 3.0]), 50) == 3.0
    assert percentile([1.0, 2.0], 99) == 2.0
    outcome = replay([0.0, 1.0, 2.0, 5.5, 6.0], FixedTimeout(), 3.0)
    assert outcome.false_convictions == 1  # 3.5 s after 2.0
    assert (outcome.median, outcome.p99, outcome.heartbeats) == (3.0, 3.0, 5)
    assert outcome.us_per_heartbeat > 0
