"""Settings: parsing, errors that name the variable, and docs that cannot drift."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from proxy.settings import Settings, describe_error, env_file, readme_with_table

ROOT = Path(__file__).resolve().parents[2]


def test_lists_from_commas(monkeypatch):
    monkeypatch.setenv("PDPROXY_PREFILL_URLS", "http://a:1, http://b:2/")
    monkeypatch.setenv("PDPROXY_DECODE_URLS", "http://c:3")
    monkeypatch.setenv("PDPROXY_API_KEYS", "k1,k2")
    s = Settings()
    assert s.prefill_urls == ["http://a:1", "http://b:2"] and s.decode_urls == ["http://c:3"]
    assert s.api_keys == ["k1", "k2"] and s.port == 8000 and s.host == "0.0.0.0"


@pytest.mark.parametrize(
    "env, variable",
    [
        ({"PDPROXY_DECODE_URLS": "http://c:3"}, "PDPROXY_PREFILL_URLS"),
        (
            {"PDPROXY_PREFILL_URLS": "http://a:1/v1", "PDPROXY_DECODE_URLS": "http://c:3"},
            "PDPROXY_PREFILL_URLS",
        ),
        (
            {"PDPROXY_PREFILL_URLS": "a:1", "PDPROXY_DECODE_URLS": "http://c:3"},
            "PDPROXY_PREFILL_URLS",
        ),
        (
            {"PDPROXY_PREFILL_URLS": "http://a:1", "PDPROXY_DECODE_URLS": "http://c:80x"},
            "PDPROXY_DECODE_URLS",
        ),
        (
            {"PDPROXY_PREFILL_URLS": "http://a:70000", "PDPROXY_DECODE_URLS": "http://c:3"},
            "PDPROXY_PREFILL_URLS",
        ),
        (
            {
                "PDPROXY_PREFILL_URLS": "http://a:1",
                "PDPROXY_DECODE_URLS": "http://c:3",
                "PDPROXY_PORT": "0",
            },
            "PDPROXY_PORT",
        ),
        (
            {
                "PDPROXY_PREFILL_URLS": "http://a:1",
                "PDPROXY_DECODE_URLS": "http://c:3",
                "PDPROXY_DECODE_POLICY": "random",
            },
            "PDPROXY_DECODE_POLICY",
        ),
        (
            {
                "PDPROXY_PREFILL_URLS": "http://a:1",
                "PDPROXY_DECODE_URLS": "http://c:3",
                "PDPROXY_IDLE_TIMEOUT": "-1",
            },
            "PDPROXY_IDLE_TIMEOUT",
        ),
    ],
)
def test_bad_settings_name_the_variable(monkeypatch, env, variable):
    for key in list(os.environ):
        if key.startswith("PDPROXY_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert variable in describe_error(info.value)


def test_startup_refuses_bad_config_with_exit_2():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDPROXY_")}
    env["PDPROXY_DECODE_URLS"] = "http://c:3"
    result = subprocess.run(
        [sys.executable, "-m", "proxy"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "PDPROXY_PREFILL_URLS" in result.stderr


def test_readme_table_and_env_file_are_generated():
    readme = (ROOT / "README.md").read_text()
    assert readme_with_table(readme) == readme, "run: python -m proxy.settings write"
    assert (ROOT / "config" / "pdproxy.env").read_text() == env_file(), (
        "run: python -m proxy.settings write"
    )
    for name in Settings.model_fields:
        assert f"PDPROXY_{name.upper()}" in readme


def test_readme_connector_settings_table_is_generated():
    from dataclasses import fields

    from engine_ext import config

    readme = (ROOT / "README.md").read_text()
    assert config.readme_with_table(readme) == readme, "run: python -m engine_ext.config write"
    for field in fields(config.PDSettings):
        assert f"`{field.name}`" in readme
