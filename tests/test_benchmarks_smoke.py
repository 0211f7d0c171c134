"""The benchmark harness still runs and reports every field.

Benchmarks are not tests: nothing here judges a timing. The codec benchmark
runs with a few frames and two samples, to prove that it executes, checks its
codec's output, and fills in the report; the ratio and verdict logic is
checked on hand-made timings, where the right answer is known exactly.
"""

from __future__ import annotations

import platform
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


def test_an_unknown_benchmark_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit) as raised:
        main(["no-such-benchmark"])
    assert raised.value.code == 2
    assert "no benchmark named no-such-benchmark" in capsys.readouterr().err
