"""The guard settings (KeepAliveTimeoutS ... CorsOrigins): their forms, their checks, and what the
Host guard allows by default. What they do to real clients is in test_hostile.py."""

from __future__ import annotations

import pytest

from easyserve import Config, ConfigError
from easyserve.browsers import HOSTS_REMEMBERED, BrowserGuard


def test_defaults():
    config = Config()
    assert (config.keep_alive_timeout_s, config.header_timeout_s, config.body_timeout_s) == (15, 10, 30)
    assert (config.max_buffered_mb, config.allowed_hosts, config.cors_origins) == (512, None, ())


def test_buffered_mb_below_max_body_mb_is_a_config_error():
    with pytest.raises(ConfigError, match=r"MaxBufferedMB \(8\) is below MaxBodyMB \(16\)"):
        Config.from_dict({"MaxBufferedMB": 8})


@pytest.mark.parametrize("key,value,allowed", [
    ("KeepAliveTimeoutS", 0, "a number from 0.01 to 86400"),
    ("HeaderTimeoutS", -1, "a number from 0.01 to 86400"),
    ("BodyTimeoutS", "soon", "a number from 0.01 to 86400"),
    ("MaxBufferedMB", 0, "a number from 0.001 to 1048576"),
    ("AllowedHosts", "http://api.example.com", "host names such as"),
    ("AllowedHosts", 5, "a list of host names"),
    ("CorsOrigins", "app.example.com", "origins such as"),
    ("CorsOrigins", ["https://app.example.com/page"], "origins such as"),
])
def test_wrong_guard_settings_name_key_value_and_what_is_allowed(key, value, allowed):
    with pytest.raises(ConfigError) as info:
        Config.from_dict({key: value})
    assert str(info.value).startswith(f"{key}: got {value!r}; expected ") and allowed in str(info.value)


@pytest.mark.parametrize("value,expected", [
    ("api.example.com, Other.example:8443", ("api.example.com", "other.example:8443")),
    (["api.example.com"], ("api.example.com",)), ("*", ("*",)), (["a.example", "*"], ("*",)), (None, None),
])
def test_allowed_hosts_forms(value, expected):
    assert Config.from_dict({"AllowedHosts": value}).allowed_hosts == expected


def test_cors_origins_forms():
    assert Config.from_dict({"CorsOrigins": "https://App.example.com/, http://localhost:3000"}).cors_origins == (
        "https://app.example.com", "http://localhost:3000")
    assert Config().cors_origins == () and Config.from_dict({"CorsOrigins": "*"}).cors_origins == ("*",)
    # a scheme's own port, which a browser leaves out of the origin it sends: written in, it never matched
    assert Config.from_dict({"CorsOrigins": "https://app.example.com:443, http://web.example:80, "
                                            "http://web.example, https://app.example.com:8443"}).cors_origins == (
        "https://app.example.com", "http://web.example", "https://app.example.com:8443")


@pytest.mark.parametrize("bind,host,allowed", [
    ("127.0.0.1", "evil.example", False), ("::1", "evil.example", False), ("localhost", "evil.example", False),
    ("0.0.0.0", "evil.example", True), ("10.1.2.3", "anything.example:80", True), ("::", "x.example", True),
])
def test_default_allowed_hosts_follow_the_bind_address(bind, host, allowed):
    assert BrowserGuard(bind, None, ()).host_allowed(host) is allowed


def test_host_verdicts_are_remembered_up_to_a_bound():
    guard = BrowserGuard("127.0.0.1", ("api.example.com",), ())
    for i in range(HOSTS_REMEMBERED * 3):
        host = f"n{i}.evil.example" if i % 2 else f"127.0.0.{i % 250 + 1}"
        assert [guard.host_allowed(host) for _ in range(2)] == [i % 2 == 0] * 2, host
        assert len(guard._hosts) <= HOSTS_REMEMBERED
    assert guard.host_allowed("API.example.com:443") and not guard.host_allowed("evil.example")
