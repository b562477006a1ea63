"""``engine sink --control FILE``: fault flags overridden at run time by a JSON file.

The pure part (``control_faults``) is checked directly; the rest drives a real sink
subprocess over TCP (smtplib), rewriting and deleting its control file meanwhile.
"""

from __future__ import annotations

import json
import os
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.embedded import SinkProcess
from engine.sink.faults import NO_FAULTS, FaultOptions, control_faults


def test_no_control_file_means_the_flags() -> None:
    flags = FaultOptions(fail_ratio=0.25, fail_code=452, seed=3)
    assert control_faults(flags, None) is flags


def test_control_keys_override_their_flags_only() -> None:
    flags = FaultOptions(fail_ratio=0.25, fail_code=452, drop_ratio=0.1, delay_ms=5, seed=3)
    got = control_faults(flags, {"fail_ratio": 1, "delay_ms": 250})
    assert got == FaultOptions(fail_ratio=1.0, fail_code=452, drop_ratio=0.1, delay_ms=250, seed=3)
    assert control_faults(NO_FAULTS, {}) == NO_FAULTS
    assert control_faults(NO_FAULTS, {"fail_code": 550.0}).fail_code == 550


@pytest.mark.parametrize(
    ("control", "error"),
    [
        ([1, 2], "must hold a JSON object"),
        ({"fail_ratio": 1, "bogus": 2}, "unknown control keys \\['bogus'\\]"),
        ({"fail_ratio": "1"}, "fail_ratio must be a number"),
        ({"fail_ratio": True}, "fail_ratio must be a number"),
        ({"fail_ratio": 1.5}, "fail_ratio must be between 0 and 1"),
        ({"drop_ratio": -0.1}, "drop_ratio must be between 0 and 1"),
        ({"drop_ratio": float("nan")}, "drop_ratio must be a finite number"),
        ({"fail_code": 250}, "fail_code must be a 4xx or 5xx code"),
        ({"fail_code": 451.5}, "fail_code must be a whole number"),
        ({"delay_ms": float("inf")}, "delay_ms must be a finite number"),
        ({"delay_ms": -1}, "delay_ms must not be negative"),
    ],
)
def test_bad_control_values_are_refused(control: object, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        control_faults(NO_FAULTS, control)


# --- a real sink ------------------------------------------------------------------------


def write_control(path: Path, control: dict[str, Any] | str) -> None:
    """Atomically, as the help asks: a temporary file renamed over the control file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(control if isinstance(control, str) else json.dumps(control))
    os.replace(tmp, path)


def wait_faults(sink: SinkProcess, timeout: float = 5.0, **expected: Any) -> dict[str, Any]:
    """Wait until the stats file's "faults" show every ``key=value``; return them."""
    deadline = time.monotonic() + timeout
    while True:
        faults: dict[str, Any] = sink.stats().get("faults", {})
        if all(faults.get(k) == v for k, v in expected.items()):
            return faults
        if time.monotonic() > deadline:
            raise AssertionError(f"sink faults {faults} never matched {expected}")
        time.sleep(0.02)


def send(sink: SinkProcess, n: int) -> tuple[int, bytes]:
    """One message over a fresh connection: (final reply code, text) or (0, b"") if cut."""
    try:
        with smtplib.SMTP(sink.host, sink.port, timeout=10) as smtp:
            msg = f"From: a@example.com\r\nMessage-ID: <c{n}@x>\r\n\r\nbody {n}\r\n"
            refused = smtp.sendmail("a@example.com", ["b@example.com"], msg)
            assert refused == {}
            return 250, b""
    except smtplib.SMTPDataError as exc:
        return exc.smtp_code, exc.smtp_error
    except smtplib.SMTPServerDisconnected:
        return 0, b""


@pytest.fixture
def control(tmp_path: Path) -> Path:
    return tmp_path / "control.json"


@pytest.fixture
def sink(tmp_path: Path, control: Path) -> Iterator[SinkProcess]:
    with SinkProcess(workdir=tmp_path / "sink", extra_args=["--control", str(control)]) as proc:
        yield proc


def test_control_file_switches_faults_on_and_off(sink: SinkProcess, control: Path) -> None:
    faults = wait_faults(sink, source="flags")
    assert faults == {
        "fail_ratio": 0.0, "fail_code": 451, "drop_ratio": 0.0, "delay_ms": 0,
        "source": "flags", "error": None,
    }  # fmt: skip
    assert send(sink, 1) == (250, b"")

    write_control(control, {"fail_ratio": 1})
    wait_faults(sink, source="control", fail_ratio=1.0)
    assert send(sink, 2) == (451, b"4.3.0 injected failure")

    write_control(control, {"fail_ratio": 1, "fail_code": 550})
    wait_faults(sink, fail_code=550)
    assert send(sink, 3) == (550, b"5.3.0 injected failure")

    control.unlink()  # back to the flags
    wait_faults(sink, source="flags", fail_ratio=0.0, fail_code=451)
    assert send(sink, 4) == (250, b"")
    stats = sink.wait_stats(received=2)
    assert stats["refused"] == {"451": 1, "550": 1}
    assert [r["message_id"] for r in sink.received()] == ["<c1@x>", "<c4@x>"]


def wait_error(sink: SinkProcess, contains: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        faults: dict[str, Any] = sink.stats().get("faults", {})
        if contains in (faults.get("error") or ""):
            return faults
        if time.monotonic() > deadline:
            raise AssertionError(f"sink faults {faults} never reported {contains!r}")
        time.sleep(0.02)


def test_bad_control_file_keeps_the_faults_in_force(sink: SinkProcess, control: Path) -> None:
    write_control(control, {"fail_ratio": 1, "fail_code": 452})
    wait_faults(sink, source="control", fail_code=452)

    write_control(control, "{not json")
    faults = wait_error(sink, "Expecting property name")
    assert (faults["source"], faults["fail_ratio"], faults["fail_code"]) == ("control", 1.0, 452)
    assert send(sink, 1)[0] == 452  # the last good control file still applies

    write_control(control, {"fail_ratio": 2})
    assert wait_error(sink, "fail_ratio must be between 0 and 1")["fail_code"] == 452

    write_control(control, {"fail_ratio": 0})  # a good file clears the error
    assert wait_faults(sink, fail_ratio=0.0, error=None)["source"] == "control"
    assert send(sink, 2) == (250, b"")
    assert f"sink: control file {control} ignored" in sink.output()


def test_delay_and_drop_from_the_control_file(sink: SinkProcess, control: Path) -> None:
    write_control(control, {"delay_ms": 300})
    wait_faults(sink, delay_ms=300)
    start = time.monotonic()
    assert send(sink, 1) == (250, b"")
    assert time.monotonic() - start >= 0.3

    write_control(control, {"drop_ratio": 1})
    wait_faults(sink, delay_ms=0, drop_ratio=1.0)
    assert send(sink, 2) == (0, b"")  # cut after the content, no final reply
    assert sink.wait_stats(dropped=1)["received"] == 1


def test_control_file_present_at_start_applies_from_the_first_message(
    tmp_path: Path, control: Path
) -> None:
    write_control(control, {"fail_ratio": 1, "fail_code": 421})
    extra = ["--control", str(control), "--fail-ratio", "0.5", "--seed", "1"]
    with SinkProcess(workdir=tmp_path / "s", extra_args=extra) as sink:
        assert send(sink, 1)[0] == 421
        faults = wait_faults(sink, source="control")
        assert (faults["fail_ratio"], faults["fail_code"]) == (1.0, 421)
        control.unlink()
        assert wait_faults(sink, source="flags")["fail_ratio"] == 0.5


def test_without_control_the_stats_format_is_unchanged(tmp_path: Path) -> None:
    with SinkProcess(workdir=tmp_path / "s") as sink:
        assert "faults" not in sink.stats()


def test_help_documents_the_control_file() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "engine", "sink", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--control FILE" in done.stdout
    assert "Deleting FILE restores the flags" in done.stdout
