"""The command line's arguments (``_cli_args.py``): the parser, and the settings it makes.

What it pins: the defaults of ``serve``, every protocol option reaching the
:class:`Config` (a ``--secret-file`` stripped of surrounding white space),
``--detector`` choosing every connection's failure detector, and argparse's
refusal of a detector it does not know. ``main``'s usage errors, which go
through this parser, are ``test_cli.py``'s.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from trio_heartbeat._adaptive import AdaptiveDetector
from trio_heartbeat._cli_args import DEFAULT_PORT, _config, _options, build_parser
from trio_heartbeat._detectors import FixedTimeout


def test_secret_file_key_is_stripped_of_surrounding_whitespace(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"  s3cret key\n")
    args = build_parser().parse_args(["serve", "--secret-file", str(secret)])
    assert _config(args).secret == b"s3cret key"


def test_options_reach_the_protocol_config(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [
            "connect",
            "--interval",
            "0.25",
            "--timeout",
            "0.75",
            "--handshake-timeout",
            "2",
            "--id",
            "node-7",
            "--linger",
            "0.5",
            "h1:1",
            "h2:2",
        ]
    )
    config = _config(args)
    assert (config.interval_ms, config.timeout_ms, config.handshake_timeout) == (250, 750, 2.0)
    assert config.instance_id == "node-7"
    assert config.secret is None
    assert args.endpoints == ["h1:1", "h2:2"]
    assert args.linger == 0.5

    defaults = build_parser().parse_args(["serve"])
    assert (defaults.host, defaults.port, defaults.max_connections) == (
        "127.0.0.1",
        DEFAULT_PORT,
        4096,
    )
    assert (defaults.interval, defaults.timeout, defaults.id) == (1.0, 3.0, "")


@pytest.mark.parametrize("command", ["serve", "connect"])
@pytest.mark.parametrize(
    ("flag", "detector"), [([], AdaptiveDetector), (["--detector", "fixed"], FixedTimeout)]
)
def test_detector_picks_the_failure_detector_of_every_connection(
    command: str, flag: list[str], detector: type
) -> None:
    endpoint = ["h1:1"] if command == "connect" else []
    options = _options(build_parser().parse_args([command, *flag, *endpoint]))
    assert options.detector is detector


def test_an_unknown_detector_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--detector", "phi"])
    assert exited.value.code == 2
    assert "invalid choice: 'phi' (choose from 'adaptive', 'fixed')" in capsys.readouterr().err
