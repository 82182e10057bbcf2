"""The history file: writer and reader (supervisor.history), follower and the
human format (supervisor.cli.historyview)."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

from supervisor import history as hist
from supervisor.cli import historyview
from supervisor.core.gopanic import Crash
from supervisor.history import History

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "history.jsonl"


@pytest.fixture
def history(path: Path) -> Iterator[History]:
    with History(path) as h:
        yield h


# ---------------------------------------------------------------- writing


def test_now_rfc3339() -> None:
    assert TS.fullmatch(hist.now_rfc3339())


def test_event_names_cover_design() -> None:
    assert {"started", "exited", "backoff", "fatal", "config_rolled_back"} <= hist.EVENT_NAMES
    assert "supervisor_lost" in hist.EVENT_NAMES  # a predecessor that died (docs/history.md)
    assert {"probe_failed", "evidence_failed", "config_confirmed"} <= hist.EVENT_NAMES
    assert "restart_failed" in hist.EVENT_NAMES  # an overlap restart (docs/zero-downtime.md)
    assert len(hist.EVENT_NAMES) == 25


def test_record_writes_one_parsable_line(path: Path, history: History) -> None:
    crash = Crash("panic", "runtime error: índex", "main.f at /x/main.go:12")
    rec = history.record("exited", "api", pid=123, exit_code=2, signal=None, crash=crash)

    [line] = path.read_text(encoding="utf-8").splitlines()
    assert "índex" in line  # ensure_ascii=False
    assert ", " not in line.split('"message"')[0]  # compact separators
    on_disk = json.loads(line)
    assert list(on_disk) == ["ts", "program", "event", "pid", "exit_code", "signal", "crash"]
    assert TS.fullmatch(on_disk["ts"])
    assert on_disk["crash"] == crash.to_dict()
    assert rec == on_disk


def test_parent_dir_is_private(tmp_path: Path) -> None:
    path = tmp_path / "new" / "history.jsonl"
    History(path).close()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_supervisor_wide_record_has_no_program(path: Path, history: History) -> None:
    history.record("supervisor_started", version="0.1.0", config_sha256="ab" * 32)
    history.record("restart_requested", "api", reason="operator", where=Path("/x"))
    first, second = lines(path)
    assert "program" not in first
    assert first["event"] == "supervisor_started"
    assert second["where"] == "/x"


def test_record_is_visible_to_another_reader_at_once(path: Path, history: History) -> None:
    history.record("started", "api", pid=1, attempt=1)
    with open(path, encoding="utf-8") as reader:
        reader.read()
        history.record("running", "api", pid=1)  # the writer stays open
        assert json.loads(reader.readline())["event"] == "running"


def test_record_appends_to_an_existing_file(path: Path) -> None:
    with History(path) as h:
        h.record("started", "api", pid=1)
    with History(path) as h:
        h.record("running", "api", pid=1)
    assert [r["event"] for r in lines(path)] == ["started", "running"]


def test_unknown_event_is_rejected(path: Path, history: History) -> None:
    with pytest.raises(ValueError, match="restrated"):
        history.record("restrated", "api")
    with pytest.raises(ValueError, match="ts"):
        history.record("started", "api", ts="yesterday")
    assert path.read_text() == ""


def test_listeners_get_the_record(history: History) -> None:
    seen: list[dict[str, object]] = []
    history.add_listener(seen.append)
    rec = history.record("backoff", "api", attempt=2, delay_s=0.5)
    history.remove_listener(seen.append)
    history.record("started", "api", pid=2)
    assert seen == [rec]


def test_failing_listener_does_not_break_recording(path: Path) -> None:
    errors: list[BaseException] = []
    seen: list[dict[str, object]] = []

    def broken(rec: dict[str, object]) -> None:
        raise RuntimeError("listener bug")

    with History(path, on_listener_error=errors.append) as h:
        h.add_listener(broken)
        h.add_listener(seen.append)
        h.record("fatal", "api", attempts=10)
        assert h.listener_errors == 1
    assert [str(e) for e in errors] == ["listener bug"]
    assert len(seen) == 1
    assert lines(path)[0]["event"] == "fatal"


def test_failing_listener_without_handler_is_counted(history: History) -> None:
    def broken(rec: dict[str, object]) -> None:
        raise KeyError("x")

    history.add_listener(broken)
    history.record("started", "api")
    history.record("running", "api")
    assert history.listener_errors == 2


# ---------------------------------------------------------------- reading


def write_many(path: Path, count: int) -> None:
    with History(path) as h:
        for i in range(count):
            h.record("started", ("api", "worker", None)[i % 3], pid=i, attempt=1)


def read(path: Path, n: int | None = None, program: str | None = None) -> list[dict[str, Any]]:
    """The last ``n`` records (all when None), oldest first, as every reader gets them."""
    with hist.Last(path, sys.maxsize if n is None else n, program, scan_limit=None) as last:
        return list(last)


def test_read_last_n_and_filter(path: Path) -> None:
    write_many(path, 10_000)
    assert [r["pid"] for r in read(path, n=5)] == [9995, 9996, 9997, 9998, 9999]
    assert [r["pid"] for r in read(path, n=3, program="api")] == [9993, 9996, 9999]
    assert [r["pid"] for r in read(path, n=2, program="worker")] == [9994, 9997]
    assert len(read(path)) == 10_000
    assert len(read(path, program="api")) == 3334
    assert read(path, n=0) == []
    assert len(read(path, n=20_000)) == 10_000
    assert read(path, n=5, program="nobody") == []


def test_read_skips_garbage_and_a_truncated_last_line(path: Path) -> None:
    write_many(path, 30)
    with open(path, "ab") as f:
        f.write(b"not json at all\n\xff\xfe binary\n[1, 2]\n\n")
    write_many(path, 2)
    with open(path, "ab") as f:
        f.write(b'{"ts":"2026-11-26T23:48:48.123Z","program":"api","event":"exi')
    assert [r["pid"] for r in read(path, n=3)] == [29, 0, 1]
    assert len(read(path)) == 32
    assert [r["pid"] for r in read(path, n=1, program="api")] == [0]


def test_read_lines_longer_than_a_block(path: Path) -> None:
    with History(path) as h:
        h.record("build_failed", command=["go", "build"], output_tail="x" * 200_000)
        h.record("build_failed", command=["go", "build"], output_tail="y" * 100_000)
        h.record("build_succeeded", command=["go", "build"], duration_s=1.5)
    tails = [r.get("output_tail", "")[:1] for r in read(path, n=3)]
    assert tails == ["x", "y", ""]


def test_read_missing_file(tmp_path: Path) -> None:
    # No history yet (or only backups after a deletion): no records, no error.
    assert read(tmp_path / "nope.jsonl", n=10) == []
    assert read(tmp_path / "nope.jsonl") == []


# ---------------------------------------------------------------- following


class Follower:
    """follow() in a thread; `polls` counts completed polls."""

    def __init__(self, path: Path, **kwargs: Any) -> None:
        self.records: list[dict[str, Any]] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(path,), kwargs=kwargs)
        self._thread.start()

    def _should_stop(self) -> bool:
        self.polls += 1
        return self._stop.is_set()

    def _run(self, path: Path, **kwargs: Any) -> None:
        for rec in historyview.follow(path, poll=0.005, stop=self._should_stop, **kwargs):
            self.records.append(rec)

    def settle(self, polls: int = 2) -> None:
        """Wait until it has polled again, so it has seen what is on disk."""
        target = self.polls + polls
        wait_for(lambda: self.polls >= target)

    def pids(self) -> list[Any]:
        return [r.get("pid") for r in self.records]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        assert not self._thread.is_alive()


@pytest.fixture
def follower_factory() -> Iterator[Callable[..., Follower]]:
    started: list[Follower] = []

    def make(path: Path, **kwargs: Any) -> Follower:
        started.append(Follower(path, **kwargs))
        return started[-1]

    yield make
    for f in started:
        f.stop()


def test_follow_yields_appended_records(
    path: Path, history: History, follower_factory: Callable[..., Follower]
) -> None:
    history.record("started", "api", pid=1)
    follower = follower_factory(path)
    follower.settle()
    history.record("running", "api", pid=2)
    history.record("started", "worker", pid=3)
    wait_for(lambda: follower.pids() == [2, 3])


def test_follow_from_start_and_by_program(
    path: Path, history: History, follower_factory: Callable[..., Follower]
) -> None:
    history.record("started", "api", pid=1)
    history.record("started", "worker", pid=2)
    follower = follower_factory(path, from_end=False, program="api")
    history.record("exited", "api", pid=1, exit_code=0)
    wait_for(lambda: len(follower.records) == 2)
    assert [r["event"] for r in follower.records] == ["started", "exited"]


def test_follow_holds_a_partial_line_until_complete(
    path: Path, history: History, follower_factory: Callable[..., Follower]
) -> None:
    follower = follower_factory(path)
    follower.settle()
    line = json.dumps({"ts": hist.now_rfc3339(), "event": "started", "pid": 7}) + "\n"
    with open(path, "ab", buffering=0) as raw:
        raw.write(line[:20].encode())
        follower.settle()
        assert follower.records == []
        raw.write(line[20:].encode())
        wait_for(lambda: follower.pids() == [7])
    history.record("running", pid=8)
    wait_for(lambda: follower.pids() == [7, 8])


def test_follow_waits_for_the_file(path: Path, follower_factory: Callable[..., Follower]) -> None:
    follower = follower_factory(path)  # from_end, but the file is new: read it all
    follower.settle()
    with History(path) as h:
        h.record("supervisor_started", version="0.1.0")
        h.record("started", "api", pid=1)
    wait_for(lambda: follower.pids() == [None, 1])


def test_follow_reopens_after_truncation(
    path: Path, follower_factory: Callable[..., Follower]
) -> None:
    write_many(path, 5)
    follower = follower_factory(path)
    follower.settle()
    with open(path, "w", encoding="utf-8") as f:  # copytruncate-style rotation
        f.write(json.dumps({"event": "started", "pid": 100}) + "\n")
    wait_for(lambda: follower.pids() == [100])
    write_many(path, 1)
    wait_for(lambda: follower.pids() == [100, 0])


def test_follow_reopens_after_replacement(
    path: Path, history: History, follower_factory: Callable[..., Follower]
) -> None:
    follower = follower_factory(path)
    follower.settle()
    history.record("started", "api", pid=1)
    replacement = path.with_name("history.jsonl.tmp")
    write_many(replacement, 2)
    os.replace(replacement, path)
    wait_for(lambda: follower.pids() == [1, 0, 1])
    with History(path) as h:
        h.record("running", "api", pid=2)
    wait_for(lambda: follower.pids() == [1, 0, 1, 2])


def test_follow_survives_removal(path: Path, follower_factory: Callable[..., Follower]) -> None:
    write_many(path, 1)
    follower = follower_factory(path)
    follower.settle()
    path.unlink()
    follower.settle()
    write_many(path, 2)
    wait_for(lambda: follower.pids() == [0, 1])


# ---------------------------------------------------------------- formatting


def test_format_record_exited_with_crash() -> None:
    rec = {
        "ts": "2026-11-26T23:48:48.123Z",
        "program": "api",
        "event": "exited",
        "crash": {
            "kind": "panic",
            "message": "runtime error: index out of range [5] with length 3",
            "frame": "main.f at /x/main.go:12",
        },
        "uptime_s": 0.4,
        "signal": None,
        "exit_code": 2,
        "pid": 123,
    }
    line = historyview.format_record(rec)
    assert line.startswith("2026-11-26 23:48:48.123Z  api ")
    assert line.split()[4:] == [
        "pid=123",
        "exit_code=2",
        "uptime_s=0.4",
        "crash=panic:",
        "runtime",
        "error:",
        "index",
        "out",
        "of",
        "range",
        "[5]",
        "with",
        "length",
        "3",
        "(main.f",
        "at",
        "/x/main.go:12)",
    ]


def test_format_record_columns_line_up() -> None:
    header = historyview.format_header()
    a = historyview.format_record(
        {"ts": "2026-11-26T23:48:48.123Z", "event": "supervisor_reloaded"}
    )
    b = historyview.format_record(
        {"ts": "2026-11-26T23:48:48.123Z", "program": "api", "event": "backoff", "attempt": 3}
    )
    assert a.split()[2] == "-"
    assert header.index("PROGRAM") == b.index("api") == a.index("-  ")
    assert header.index("EVENT") == b.index("backoff") == a.index("supervisor_reloaded")
    assert header.index("DETAILS") == b.index("attempt=3")


def test_format_record_values() -> None:
    line = historyview.format_record(
        {
            "ts": "2026-11-26T23:48:48.123Z",
            "program": "api",
            "event": "config_rejected",
            "path": "config/api.yaml",
            "reason": "checksum_mismatch",
            "expected": "a" * 64,
            "actual": "b" * 64,
            "note": "two words",
            "killed": True,
        }
    )
    assert "reason=checksum_mismatch killed=true path=config/api.yaml" in line
    assert "expected=aaaaaaaaaaaa actual=bbbbbbbbbbbb" in line
    assert line.endswith('note="two words"')

    build = historyview.format_record(
        {
            "ts": "2026-11-26T23:48:48.123Z",
            "event": "build_failed",
            "command": ["go", "build", "./cmd/api"],
            "duration_s": 2.5,
            "exit_code": 1,
            "output_tail": "# example/api\n./main.go:5:2: undefined: x\n",
        }
    )
    assert build.endswith(
        'exit_code=1 duration_s=2.5 command=["go","build","./cmd/api"] '
        'output_tail="./main.go:5:2: undefined: x"'
    )
    assert "\n" not in build


def test_read_program_filter_is_exact(path: Path) -> None:
    with History(path) as h:
        h.record("started", "api", pid=1)
        h.record("restart_requested", "api-v2", reason="api")
        h.record("signal_sent", "worker", signal="SIGHUP", reason="api")
    assert [r["program"] for r in read(path, n=5, program="api")] == ["api"]
    assert [r["program"] for r in read(path, program="api-v2")] == ["api-v2"]
