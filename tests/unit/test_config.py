"""Settings: validation, the exit status of a bad value, and the README's table of every setting."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import SPECS, ConfigError, load

README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults_load() -> None:
    s = load({})
    assert s.port == 8080 and s.host == "127.0.0.1" and s.bus == "memory"
    assert s.message_limit == s.max_size_request


@pytest.mark.parametrize(("name", "value"), [
    ("GATEWAY_PORT", "eighty"), ("GATEWAY_PORT", "70000"), ("GATEWAY_BUS", "kafka"),
    ("GATEWAY_REQUIRE_NATIVE", "maybe"), ("GATEWAY_USERS", "nopassword"), ("GATEWAY_PUBLIC_URL", "ftp://x"),
    ("GATEWAY_PING_INTERVAL", "-1"), ("GATEWAY_JWT_PUBLIC_KEY", "/no/such/key.pem"),
])
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load({name: value})
    assert info.value.name == name and info.value.value == value
    assert name in str(info.value) and "expected" in str(info.value)


def test_cli_exits_2_with_one_line() -> None:
    env = {**os.environ, "GATEWAY_PORT": "nope"}
    proc = subprocess.run([sys.executable, "-m", "gateway"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "GATEWAY_PORT" in lines[0] and "'nope'" in lines[0]


def test_every_setting_is_in_the_readme_table() -> None:
    text = README.read_text()
    documented = set(re.findall(r"^\|\s*`(GATEWAY_[A-Z0-9_]+)`", text, flags=re.M))
    missing = [spec.name for spec in SPECS if spec.name not in documented]
    assert not missing, f"settings missing from the README table: {missing}"
    unknown = documented - {spec.name for spec in SPECS}
    assert not unknown, f"README documents settings the code does not have: {unknown}"


def test_settings_and_specs_are_one_table() -> None:
    # Every field is read from exactly one spec, so a default can only be written once (in SPECS).
    import dataclasses

    from gateway.config import Settings

    fields = {f.name for f in dataclasses.fields(Settings)}
    assert fields == {spec.attr for spec in SPECS}
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(Settings))
    assert Settings.defaults(port=1).port == 1 and Settings.defaults() == load({})


def test_the_readme_table_shows_the_defaults_of_the_specs() -> None:
    # `--help` and `jmap-gateway settings` print the SPECS table itself; the README mirrors it.
    rows = dict(re.findall(r"^\|\s*`(GATEWAY_[A-Z0-9_]+)`\s*\|\s*([^|]*?)\s*\|", README.read_text(), flags=re.M))
    for spec in SPECS:
        assert rows[spec.name] == (f"`{spec.default}`" if spec.default else "(unset)"), spec.name


def test_upstream_events_need_front_mode_and_the_memory_bus() -> None:
    front = {"GATEWAY_UPSTREAM_URL": "https://jmap.example.com/jmap/session"}
    assert load({**front, "GATEWAY_UPSTREAM_EVENTS": "eventsource"}).upstream_events == "eventsource"
    assert load(front).upstream_events == "bus"  # the default: events from GATEWAY_BUS, as before
    for env, why in (({"GATEWAY_UPSTREAM_EVENTS": "eventsource"}, "GATEWAY_UPSTREAM_URL"),
                     ({**front, "GATEWAY_UPSTREAM_EVENTS": "eventsource", "GATEWAY_BUS": "amqp"}, "GATEWAY_BUS=amqp")):
        with pytest.raises(ConfigError) as info:
            load(env)
        assert info.value.name == "GATEWAY_UPSTREAM_EVENTS" and why in str(info.value)
    with pytest.raises(ConfigError):
        load({**front, "GATEWAY_UPSTREAM_EVENTS": "websocket"})


def test_workers_with_upstream_event_streams_need_no_shared_bus() -> None:
    from gateway.cli import refusal

    front = {"GATEWAY_UPSTREAM_URL": "https://jmap.example.com/jmap/session", "GATEWAY_WORKERS": "2"}
    assert refusal(load(front)) is not None  # the memory bus would keep an injected event on one worker
    # Every worker reads the upstream streams of its own sessions.
    assert refusal(load({**front, "GATEWAY_UPSTREAM_EVENTS": "eventsource"})) is None
