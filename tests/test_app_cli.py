"""The serve and connect commands' answers to bad options and unreachable services (no server started)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from labelassist.backend.cli import cli
from labelassist.backend.embedded import free_port


@pytest.mark.parametrize("args, env, fragment", [
    (["serve", "--scoring", '{"nope": 1}'], {}, "LABELASSIST_SCORING"),
    (["serve", "--proposals", "not json"], {}, "LABELASSIST_PROPOSALS"),
    (["serve", "--predict-wait", "120"], {}, "PREDICT_WAIT_S"),
    (["serve"], {"LABELASSIST_WEB_THREADS": "0"}, "WEB_THREADS"),
])
def test_serve_rejects_bad_settings_before_starting_anything(args, env, fragment):
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code == 2 and fragment in result.output, result.output


def test_connect_names_what_is_missing():
    result = CliRunner().invoke(cli, ["connect", "--ls-url", "http://127.0.0.1:1"], env={"LABELASSIST_LS_TOKEN": ""})
    assert result.exit_code == 2 and "--token" in result.output


def test_connect_says_when_the_backend_is_unreachable():
    port = free_port()
    env = {"LABELASSIST_LS_TOKEN": "tok-123456", "LABELASSIST_PROJECT": "1", "LABELASSIST_BACKEND_URL": f"http://127.0.0.1:{port}"}
    result = CliRunner().invoke(cli, ["connect", "--ls-url", "http://127.0.0.1:1", "--wait", "0"], env=env)
    assert result.exit_code == 1
    assert "cannot reach the backend" in result.output and "labelassist serve" in result.output


def test_connect_rejects_bad_extra_params():
    port = free_port()
    result = CliRunner().invoke(cli, ["connect", "--ls-url", "http://127.0.0.1:1", "--token", "tok-123456", "--project", "1",
                                      "--backend-url", f"http://127.0.0.1:{port}", "--extra-params", "[1]"])
    assert result.exit_code == 1 and "--extra-params" in result.output
