"""supervisor.config: app.toml -> frozen specs, and every error located by file and key."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import textwrap
from pathlib import Path

import pytest

from supervisor.config import (
    AppConfig,
    BackoffSpec,
    ConfigError,
    Evidence,
    LimitsSpec,
    LogSpec,
    OnChange,
    RestartPolicy,
    check_file,
    load,
    loads,
    parse_duration,
    parse_signal,
    parse_size,
)

# Every key of DESIGN §4, plus the keys that only have defaults there.
FULL_EXAMPLE = """\
[supervisor]
state_dir = ".gosup"
log_dir = "logs"
metrics_listen = "127.0.0.1:9109"
shutdown_timeout = "30s"

[programs.api]
command = ["./bin/api", "-config", "config/api.yaml"]
directory = "."
environment = { GOTRACEBACK = "all" }
user = "api"
group = "api"
autostart = true
restart = "on-failure"
success_exit_codes = [0]
start_seconds = "1s"
stop_signal = "SIGTERM"
stop_timeout = "10s"
reload_signal = "SIGHUP"
go_env = true

[programs.api.backoff]
initial = "250ms"
max = "30s"
multiplier = 2.0
jitter = 0.2
reset_after = "60s"
give_up_after = 10

[programs.api.logs]
max_size = "50MiB"
backups = 5

[programs.api.limits]
interval = "5s"
sustain = 3
rss = "512MiB"
open_fds = 4096
threads = 1000
connections = 2000
goroutines = 10000
heap_inuse = "1GiB"
go_metrics = "http://127.0.0.1:6060/metrics"
allow_remote_metrics = false
evidence = "pprof"
dump_max_size = "16MiB"
dump_keep = 10

[[programs.api.config_files]]
path = "config/api.yaml"
staging = "config/api.yaml.new"
validate = ["./bin/api", "-check-config", "{file}"]
validate_timeout = "30s"
on_change = "reload"
probation = "30s"

[programs.api.build]
command = ["go", "build", "-o", "bin/api", "./cmd/api"]
watch = ["**/*.go", "go.mod"]
ignore = ["vendor/**"]
directory = "."
debounce = "200ms"
"""

MINIMAL = """\
[programs.api]
command = ["./bin/api"]
"""

# Table headers to append to MINIMAL.
BACKOFF = "[programs.api.backoff]\n"
LOGS = "[programs.api.logs]\n"
LIMITS = "[programs.api.limits]\n"
BUILD = "[programs.api.build]\ncommand = ['go', 'build']\n"
CONFIG_FILE = "[[programs.api.config_files]]\npath = 'a.yaml'\n"


def write(tmp_path: Path, text: str, name: str = "app.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def errors_of(tmp_path: Path, text: str) -> list[str]:
    """The errors `load` reports for `text` written to app.toml (asserting there are some)."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.errors, "ConfigError without messages"
    assert str(info.value) == "\n".join(info.value.errors)
    assert all(message.startswith(f"{path}: ") for message in info.value.errors)
    return [message.removeprefix(f"{path}: ") for message in info.value.errors]


def one_error(tmp_path: Path, text: str) -> str:
    errors = errors_of(tmp_path, text)
    assert len(errors) == 1, errors
    return errors[0]


def program_error(tmp_path: Path, body: str) -> str:
    """The single error for a program `api` whose extra lines are `body`."""
    return one_error(tmp_path, MINIMAL + textwrap.dedent(body))


# --- the full example -------------------------------------------------------


def test_full_example_parses_to_the_documented_values(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_EXAMPLE)
    config = load(path)

    assert config.path == path
    assert config.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    sup = config.supervisor
    assert sup.state_dir == tmp_path / ".gosup"
    assert sup.log_dir == tmp_path / "logs"
    assert sup.metrics_listen == "127.0.0.1:9109"
    assert sup.shutdown_timeout == 30.0
    assert sup.nice == -10  # the default

    api = config.program("api")
    assert config.programs == (api,)
    assert api.name == "api"
    assert api.command == ("./bin/api", "-config", "config/api.yaml")
    assert api.directory == tmp_path
    assert dict(api.environment) == {"GOTRACEBACK": "all"}
    assert (api.user, api.group, api.autostart) == ("api", "api", True)
    assert api.restart is RestartPolicy.ON_FAILURE
    assert api.success_exit_codes == frozenset({0})
    assert api.start_seconds == 1.0
    assert api.stop_signal is signal.SIGTERM
    assert api.stop_timeout == 10.0
    assert api.reload_signal is signal.SIGHUP
    assert api.go_env is True
    assert api.backoff == BackoffSpec(0.25, 30.0, 2.0, 0.2, 60.0, 10)
    assert api.logs == LogSpec(max_size=50 * 2**20, backups=5)
    assert api.limits == LimitsSpec(
        interval=5.0,
        sustain=3,
        rss=512 * 2**20,
        open_fds=4096,
        threads=1000,
        connections=2000,
        goroutines=10000,
        heap_inuse=2**30,
        go_metrics="http://127.0.0.1:6060/metrics",
        allow_remote_metrics=False,
        evidence=Evidence.PPROF,
        dump_max_size=16 * 2**20,
        dump_keep=10,
    )
    (cf,) = api.config_files
    assert cf.path == tmp_path / "config" / "api.yaml"
    assert cf.staging == tmp_path / "config" / "api.yaml.new"
    assert cf.validate == ("./bin/api", "-check-config", "{file}")
    assert cf.validate_timeout == 30.0
    assert cf.on_change is OnChange.RELOAD
    assert cf.probation == 30.0
    assert api.build is not None
    assert api.build.command == ("go", "build", "-o", "bin/api", "./cmd/api")
    assert api.build.watch == ("**/*.go", "go.mod")
    assert api.build.ignore == ("vendor/**",)
    assert api.build.directory == tmp_path
    assert api.build.debounce == 0.2


def test_minimal_program_gets_defaults(tmp_path: Path) -> None:
    config = load(write(tmp_path, MINIMAL))
    api = config.program("api")
    assert api.command == ("./bin/api",)  # kept as written; spawn resolves it
    assert api.directory == tmp_path
    assert dict(api.environment) == {}
    assert api.user is None and api.group is None
    assert api.restart is RestartPolicy.ON_FAILURE
    assert api.backoff == BackoffSpec()
    assert api.logs == LogSpec()
    assert api.limits is None
    assert api.config_files == ()
    assert api.build is None
    assert config.supervisor.state_dir == tmp_path / ".gosup"
    assert config.supervisor.log_dir == tmp_path / "logs"
    assert config.supervisor.metrics_listen is None


def test_empty_config_is_valid(tmp_path: Path) -> None:
    config = load(write(tmp_path, ""))
    assert config.programs == ()
    assert check_file(tmp_path / "app.toml") == []


def test_programs_keep_file_order_and_lookup_by_name(tmp_path: Path) -> None:
    text = "".join(f'[programs."{n}"]\ncommand = ["{n}"]\n' for n in ("zeta", "alpha", "mid.v2"))
    config = load(write(tmp_path, text))
    assert [p.name for p in config.programs] == ["zeta", "alpha", "mid.v2"]
    assert config.program("alpha").command == ("alpha",)
    with pytest.raises(KeyError):
        config.program("nope")


def test_specs_are_frozen_and_hashable(tmp_path: Path) -> None:
    config = load(write(tmp_path, FULL_EXAMPLE))
    api = config.program("api")
    with pytest.raises(dataclasses.FrozenInstanceError):
        api.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        api.environment["X"] = "1"  # type: ignore[index]
    assert hash(api) == hash(load(tmp_path / "app.toml").program("api"))


def test_loads_matches_load(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_EXAMPLE)
    assert loads(FULL_EXAMPLE, path) == load(path)


def test_empty_limits_table_enables_defaults(tmp_path: Path) -> None:
    config = load(write(tmp_path, MINIMAL + "[programs.api.limits]\n"))
    assert config.program("api").limits == LimitsSpec()


def test_remote_metrics_allowed_when_asked(tmp_path: Path) -> None:
    url = "http://10.1.2.3:6060/debug/vars"
    text = MINIMAL + LIMITS + f"go_metrics = '{url}'\nallow_remote_metrics = true\n"
    limits = load(write(tmp_path, text)).program("api").limits
    assert limits is not None and limits.go_metrics == url


@pytest.mark.parametrize(
    "url", ["http://localhost:6060/metrics", "http://127.0.0.2:1/x", "http://[::1]:6060/"]
)
def test_loopback_metrics_urls_are_accepted(tmp_path: Path, url: str) -> None:
    text = MINIMAL + f'[programs.api.limits]\ngo_metrics = "{url}"\n'
    assert load(write(tmp_path, text)).program("api").limits is not None


@pytest.mark.parametrize("listen", ["127.0.0.1:9109", "[::1]:9109", "localhost:1", "0.0.0.0:65535"])
def test_metrics_listen_accepts_host_port(tmp_path: Path, listen: str) -> None:
    config = load(write(tmp_path, f'[supervisor]\nmetrics_listen = "{listen}"\n'))
    assert config.supervisor.metrics_listen == listen


# --- paths ------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    monkeypatch.chdir(tmp_path)  # not the config dir: must not matter
    text = """
[supervisor]
state_dir = "state"
log_dir = "/var/log/gosup"

[programs.api]
command = ["./bin/api"]
directory = "services/api"

[[programs.api.config_files]]
path = "../shared/api.yaml"

[programs.api.build]
command = ["go", "build"]
"""
    config = load(write(conf_dir, text))
    api = config.program("api")
    assert config.path == conf_dir / "app.toml"
    assert config.supervisor.state_dir == conf_dir / "state"
    assert config.supervisor.log_dir == Path("/var/log/gosup")
    assert api.directory == conf_dir / "services" / "api"
    assert api.config_files[0].path == tmp_path / "shared" / "api.yaml"
    assert api.build is not None
    assert api.build.directory == api.directory  # default: the program's directory


def test_relative_config_path_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, MINIMAL)
    monkeypatch.chdir(tmp_path)
    config = load("app.toml")
    assert config.path == tmp_path / "app.toml"
    assert config.program("api").directory == tmp_path


def test_symlinked_config_file_path_is_not_resolved(tmp_path: Path) -> None:
    (tmp_path / "..data").mkdir()
    (tmp_path / "..data" / "api.yaml").write_text("x: 1\n")
    (tmp_path / "api.yaml").symlink_to(tmp_path / "..data" / "api.yaml")
    text = MINIMAL + '[[programs.api.config_files]]\npath = "api.yaml"\n'
    (cf,) = load(write(tmp_path, text)).program("api").config_files
    assert cf.path == tmp_path / "api.yaml"


def test_staging_defaults_to_path_dot_new(tmp_path: Path) -> None:
    text = MINIMAL + '[[programs.api.config_files]]\npath = "config/api.yaml"\n'
    (cf,) = load(write(tmp_path, text)).program("api").config_files
    assert cf.staging == tmp_path / "config" / "api.yaml.new"
    assert cf.validate is None
    assert cf.on_change is OnChange.RELOAD


def test_staging_false_watches_the_live_file(tmp_path: Path) -> None:
    text = MINIMAL + '[[programs.api.config_files]]\npath = "api.yaml"\nstaging = false\n'
    (cf,) = load(write(tmp_path, text)).program("api").config_files
    assert cf.path == tmp_path / "api.yaml"
    assert cf.staging is None


# --- units ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("10s", 10.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("0s", 0.0),
        ("3", 3.0),
        (3, 3.0),
        (0.5, 0.5),
        (0, 0.0),
    ],
)
def test_parse_duration(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["-1s", -1, "10x", "s", "", "1.5.s", "10 s", "1S", float("inf")])
def test_parse_duration_rejects(text: str | int | float) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512MiB", 512 * 2**20),
        ("2GiB", 2 * 2**30),
        ("1KiB", 1024),
        ("100MB", 100_000_000),
        ("10KB", 10_000),
        ("1GB", 10**9),
        ("64B", 64),
        ("1.5KiB", 1536),
        ("512mib", 512 * 2**20),
        ("4096", 4096),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["-1MiB", -1, "12XB", "MiB", "", "1 2MiB"])
def test_parse_size_rejects(text: str | int) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("SIGTERM", signal.SIGTERM),
        ("TERM", signal.SIGTERM),
        ("term", signal.SIGTERM),
        ("sigterm", signal.SIGTERM),
        (15, signal.SIGTERM),
        ("15", signal.SIGTERM),
        ("HUP", signal.SIGHUP),
        ("SIGQUIT", signal.SIGQUIT),
        ("USR1", signal.SIGUSR1),
    ],
)
def test_parse_signal(value: str | int, expected: signal.Signals) -> None:
    assert parse_signal(value) is expected


def test_parse_signal_unknown() -> None:
    with pytest.raises(ValueError, match="unknown signal 'SIGFOO'"):
        parse_signal("SIGFOO")
    with pytest.raises(ValueError, match="unknown signal"):
        parse_signal(999)


# --- errors: every message names the file and the key path -----------------


@pytest.mark.parametrize(
    ("text", "key", "hint"),
    [
        ("colour = 1", "colour", ""),
        ("[supervisor]\nstate_dri = 'x'", "supervisor.state_dri", "state_dir"),
        (MINIMAL + "comand = ['x']", "programs.api.comand", "command"),
        (MINIMAL + BACKOFF + "ceiling = '1s'", "programs.api.backoff.ceiling", ""),
        (MINIMAL + LOGS + "backup = 1", "programs.api.logs.backup", "backups"),
        (MINIMAL + LIMITS + "rs = 1", "programs.api.limits.rs", "rss"),
        (MINIMAL + CONFIG_FILE + "stage = 'b'", "programs.api.config_files[0].stage", "staging"),
        (MINIMAL + BUILD + "watches = []", "programs.api.build.watches", "watch"),
    ],
)
def test_unknown_keys(tmp_path: Path, text: str, key: str, hint: str) -> None:
    suggestion = f" (did you mean {hint!r}?)" if hint else ""
    assert one_error(tmp_path, text + "\n") == f"{key}: unknown key{suggestion}"


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        ("autostart = 'yes'", "autostart", "must be true or false, not string"),
        ("user = 1000", "user", "must be a string, not integer"),
        (
            "stop_timeout = true",
            "stop_timeout",
            "must be a duration like '10s' or a number of seconds, not boolean",
        ),
        ("success_exit_codes = 0", "success_exit_codes", "must be an array of exit codes"),
        ("success_exit_codes = [256]", "success_exit_codes", "must be an array of exit codes"),
        ("environment = 'A=1'", "environment", "must be a table, not string"),
        ("environment = { PORT = 8080 }", "environment.PORT", "must be a string, not integer"),
        ("environment = { DEBUG = true }", "environment.DEBUG", "must be a string, not boolean"),
        ("backoff = 3", "backoff", "must be a table, not integer"),
        ("config_files = 'a.yaml'", "config_files", "must be an array of tables"),
        (LIMITS + "open_fds = '4096'", "limits.open_fds", "must be an integer, not string"),
        (LIMITS + "rss = 1.5", "limits.rss", "must be a size like '512MiB'"),
        (BACKOFF + "multiplier = '2'", "backoff.multiplier", "must be a number, not string"),
        (BUILD + "watch = '*.go'", "build.watch", "must be an array of strings, not string"),
    ],
)
def test_wrong_types(tmp_path: Path, body: str, key: str, message: str) -> None:
    assert program_error(tmp_path, body + "\n").startswith(f"programs.api.{key}: {message}")


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        ("stop_timeout = '10x'", "stop_timeout", "invalid duration '10x'"),
        ("start_seconds = '1 minute'", "start_seconds", "invalid duration '1 minute'"),
        (LOGS + "max_size = '50MiBs'", "logs.max_size", "invalid size '50MiBs'"),
        (LIMITS + "heap_inuse = '1G'", "limits.heap_inuse", "invalid size '1G'"),
    ],
)
def test_bad_units(tmp_path: Path, body: str, key: str, message: str) -> None:
    assert program_error(tmp_path, body + "\n").startswith(f"programs.api.{key}: {message}")


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        ("stop_timeout = '0s'", "stop_timeout", "must be > 0"),
        ("stop_timeout = '-5s'", "stop_timeout", "duration '-5s' must not be negative"),
        ("start_seconds = -1", "start_seconds", "duration -1 must not be negative"),
        (BACKOFF + "initial = 0", "backoff.initial", "must be > 0"),
        (BACKOFF + "max = '100ms'", "backoff.max", "must be >= initial (0.25s)"),
        (BACKOFF + "multiplier = 0.5", "backoff.multiplier", "must be >= 1"),
        (BACKOFF + "jitter = 1.0", "backoff.jitter", "must be >= 0 and < 1"),
        (BACKOFF + "jitter = -0.1", "backoff.jitter", "must be >= 0 and < 1"),
        (BACKOFF + "reset_after = '0s'", "backoff.reset_after", "must be > 0"),
        (BACKOFF + "give_up_after = -1", "backoff.give_up_after", "must be >= 0"),
        (LOGS + "max_size = 0", "logs.max_size", "must be > 0"),
        (LOGS + "backups = -1", "logs.backups", "must be >= 0"),
        (LIMITS + "interval = '0s'", "limits.interval", "must be > 0"),
        (LIMITS + "sustain = 0", "limits.sustain", "must be > 0"),
        (LIMITS + "rss = 0", "limits.rss", "must be > 0"),
        (LIMITS + "rss = '-1MiB'", "limits.rss", "size '-1MiB' must not be negative"),
        (LIMITS + "open_fds = -4", "limits.open_fds", "must be > 0"),
        (LIMITS + "goroutines = 0", "limits.goroutines", "must be > 0"),
        (LIMITS + "dump_keep = 0", "limits.dump_keep", "must be > 0"),
        (CONFIG_FILE + "validate_timeout = 0", "config_files[0].validate_timeout", "must be > 0"),
    ],
)
def test_out_of_range_values(tmp_path: Path, body: str, key: str, message: str) -> None:
    assert program_error(tmp_path, body + "\n") == f"programs.api.{key}: {message}"


def test_backoff_zero_give_up_means_never(tmp_path: Path) -> None:
    text = MINIMAL + BACKOFF + "give_up_after = 0\n"
    assert load(write(tmp_path, text)).program("api").backoff.give_up_after == 0


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        ("restart = 'sometimes'", "restart", "'always', 'on-failure', 'never', not 'sometimes'"),
        (LIMITS + "evidence = 'core'", "limits.evidence", "'pprof', 'sigquit', 'none', not 'core'"),
        (
            CONFIG_FILE + "on_change = 'now'",
            "config_files[0].on_change",
            "'reload', 'restart', 'none', not 'now'",
        ),
    ],
)
def test_bad_enum_values_list_the_allowed_ones(
    tmp_path: Path, body: str, key: str, message: str
) -> None:
    error = program_error(tmp_path, body + "\n")
    assert error == f"programs.api.{key}: must be one of {message}"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("stop_signal = 'SIGFOO'", "programs.api.stop_signal: unknown signal 'SIGFOO'"),
        ("reload_signal = 'BOGUS'", "programs.api.reload_signal: unknown signal 'BOGUS'"),
        ("reload_signal = 999", "programs.api.reload_signal: unknown signal 999"),
    ],
)
def test_unknown_signals(tmp_path: Path, body: str, expected: str) -> None:
    assert program_error(tmp_path, body + "\n") == expected


def test_signal_names_in_any_spelling(tmp_path: Path) -> None:
    text = MINIMAL + "stop_signal = 'int'\nreload_signal = 10\n"
    api = load(write(tmp_path, text)).program("api")
    assert api.stop_signal is signal.SIGINT
    assert api.reload_signal is signal.SIGUSR1


NO_SHELL = "must be an array of strings (argv; no shell)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[programs.api]\ndirectory = '.'", "programs.api.command: is required"),
        ("[programs.api]\ncommand = []", "programs.api.command: must not be empty"),
        ("[programs.api]\ncommand = './bin/api -v'", f"programs.api.command: {NO_SHELL}"),
        ("[programs.api]\ncommand = ['./bin/api', 1]", f"programs.api.command: {NO_SHELL}"),
        (
            MINIMAL + "[programs.api.build]\ncommand = 'go'",
            f"programs.api.build.command: {NO_SHELL}",
        ),
        (MINIMAL + "[programs.api.build]\nwatch = []", "programs.api.build.command: is required"),
        (
            MINIMAL + "[[programs.api.config_files]]\non_change = 'none'",
            "programs.api.config_files[0].path: is required",
        ),
    ],
)
def test_missing_or_bad_command(tmp_path: Path, text: str, expected: str) -> None:
    assert one_error(tmp_path, text + "\n").startswith(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[supervisor]\nmetrics_listen = '9109'", "supervisor.metrics_listen: must be 'host:port'"),
        ("[supervisor]\nmetrics_listen = 'h:0'", "supervisor.metrics_listen: must be 'host:port'"),
        (
            "[supervisor]\nmetrics_listen = '::1:80'",
            "supervisor.metrics_listen: must be 'host:port'",
        ),
        (
            "[supervisor]\nmetrics_listen = 'h:70000'",
            "supervisor.metrics_listen: must be 'host:port'",
        ),
        ("[supervisor]\nshutdown_timeout = '0s'", "supervisor.shutdown_timeout: must be > 0"),
        ("[supervisor]\nnice = 20", "supervisor.nice: must be a nice value from -20 to 19, got 20"),
        ("[supervisor]\nnice = -21", "supervisor.nice: must be a nice value from -20 to"),
        ("[supervisor]\nnice = 'high'", "supervisor.nice: must be an integer, not string"),
        ("supervisor = 1", "supervisor: must be a table, not integer"),
        ("programs = []", "programs: must be a table, not array"),
        ("[programs]\napi = 'x'", "programs.api: must be a table, not string"),
        ('[programs."my api"]\ncommand = ["x"]', 'programs."my api": program names are'),
        ('[programs."-api"]\ncommand = ["x"]', "programs.-api: program names are"),
    ],
)
def test_supervisor_and_program_table_errors(tmp_path: Path, text: str, expected: str) -> None:
    assert one_error(tmp_path, text + "\n").startswith(expected)


def test_remote_go_metrics_need_permission(tmp_path: Path) -> None:
    text = MINIMAL + "[programs.api.limits]\ngo_metrics = 'http://10.0.0.7:6060/metrics'\n"
    error = one_error(tmp_path, text)
    assert error.startswith("programs.api.limits.go_metrics: 10.0.0.7 is not loopback")
    assert "allow_remote_metrics" in error


def test_go_metrics_must_be_an_http_url(tmp_path: Path) -> None:
    text = MINIMAL + "[programs.api.limits]\ngo_metrics = '127.0.0.1:6060'\n"
    assert one_error(tmp_path, text).startswith("programs.api.limits.go_metrics: must be an http")


def test_duplicate_config_file_paths(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + """
[[programs.api.config_files]]
path = "config/api.yaml"
[[programs.api.config_files]]
path = "./config/../config/api.yaml"
"""
    )
    assert one_error(tmp_path, text) == (
        f"programs.api.config_files[1].path: {tmp_path / 'config' / 'api.yaml'} "
        "is already watched by programs.api.config_files[0].path"
    )


def test_staging_must_be_a_path_or_false(tmp_path: Path) -> None:
    error = one_error(tmp_path, MINIMAL + CONFIG_FILE + "staging = true\n")
    assert error == (
        "programs.api.config_files[0].staging: "
        "must be a path, or false to watch the live file itself"
    )


def test_staging_equal_to_path_is_an_error(tmp_path: Path) -> None:
    text = MINIMAL + "[[programs.api.config_files]]\npath = 'a.yaml'\nstaging = './a.yaml'\n"
    assert one_error(tmp_path, text).startswith("programs.api.config_files[0].staging: must differ")


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    text = '[programs.api]\ncommand = ["x"]\nrestart = = "always"\n'
    error = one_error(tmp_path, text)
    assert error.startswith("line 3, column ")
    assert "Invalid value" in error


def test_toml_error_at_end_of_document_names_a_line(tmp_path: Path) -> None:
    assert one_error(tmp_path, '[programs.api]\ncommand = ["x"').startswith("line 2")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.errors == [f"{path}: cannot read: No such file or directory"]
    assert check_file(path) == info.value.errors


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=str(tmp_path)):
        load(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "app.toml"
    path.write_bytes(b"# \xff\n")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load(path)


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    text = """
colour = "blue"

[supervisor]
shutdown_timeout = "0s"

[programs.api]
comand = ["./bin/api"]
restart = "sometimes"
stop_signal = "SIGFOO"
environment = { PORT = 8080 }

[programs.api.backoff]
max = "-1s"

[programs.worker]
command = "./bin/worker --fast"

[programs.worker.limits]
rss = "lots"
"""
    errors = errors_of(tmp_path, text)
    assert errors == [
        "colour: unknown key",
        "supervisor.shutdown_timeout: must be > 0",
        "programs.api.comand: unknown key (did you mean 'command'?)",
        "programs.api.command: is required",
        "programs.api.environment.PORT: must be a string, not integer",
        "programs.api.restart: must be one of 'always', 'on-failure', 'never', not 'sometimes'",
        "programs.api.stop_signal: unknown signal 'SIGFOO'",
        "programs.api.backoff.max: duration '-1s' must not be negative",
        "programs.worker.command: must be an array of strings (argv; no shell)",
        "programs.worker.limits.rss: invalid size 'lots' (e.g. '512MiB', '2GiB', '100MB', 4096)",
    ]
    assert check_file(tmp_path / "app.toml") == [f"{tmp_path / 'app.toml'}: {e}" for e in errors]


def test_loads_names_the_given_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        loads("bogus = 1\n", Path("app.toml"))
    assert info.value.errors == ["app.toml: bogus: unknown key"]


def test_config_error_is_an_exception_with_all_messages() -> None:
    error = ConfigError(["a: x: bad", "a: y: worse"])
    assert error.errors == ["a: x: bad", "a: y: worse"]
    assert str(error) == "a: x: bad\na: y: worse"


def test_app_config_type(tmp_path: Path) -> None:
    config = load(os.fspath(write(tmp_path, MINIMAL)))
    assert isinstance(config, AppConfig)
