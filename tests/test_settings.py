"""Serving settings: combinations that could never work are refused when `graft serve` starts."""

from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from graft_cli import app
from service.settings import GraftSettings


def test_a_request_limit_over_the_queue_is_refused_naming_both_settings() -> None:
    with pytest.raises(ValidationError) as refused:
        GraftSettings(max_images_per_request=65, max_queue=64)
    message = str(refused.value)
    assert "GRAFT_MAX_IMAGES_PER_REQUEST (65)" in message
    assert "GRAFT_MAX_QUEUE (64)" in message
    assert GraftSettings(max_images_per_request=64, max_queue=64).max_queue == 64


def test_graft_serve_refuses_it_before_starting(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["serve", "--model-root", str(tmp_path)], env={"GRAFT_MAX_QUEUE": "8"}
    )
    assert result.exit_code == 2, result.output
    assert "GRAFT_MAX_IMAGES_PER_REQUEST" in result.output
    assert "GRAFT_MAX_QUEUE" in result.output
    assert not any(tmp_path.iterdir()), "nothing may be installed into a refused model root"


def test_a_short_admin_token_is_refused_and_an_empty_one_turns_management_off(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValidationError, match="has 6 characters; use at least 16"):
        GraftSettings(admin_token="s3cret")
    assert GraftSettings(admin_token="").admin_token is None
    token = GraftSettings(admin_token="0123456789abcdef").admin_token
    assert token is not None and token.get_secret_value() == "0123456789abcdef"
    result = CliRunner().invoke(
        app, ["serve", "--model-root", str(tmp_path)], env={"GRAFT_ADMIN_TOKEN": "short"}
    )
    assert result.exit_code == 2, result.output
    assert "GRAFT_ADMIN_TOKEN has 5 characters" in result.output
    assert not any(tmp_path.iterdir()), "nothing may be installed into a refused model root"


def test_bentoml_never_cuts_a_push_check_or_a_request_short() -> None:
    from service.app.entry import Graft, Inference
    from service.app.timeouts import traffic_timeouts_s

    served = GraftSettings()  # read from the same environment as service.app.entry read it
    assert Inference.config["traffic"]["timeout"] > served.push_check_timeout_s
    assert Graft.config["traffic"]["timeout"] > Inference.config["traffic"]["timeout"]
    settings = GraftSettings(request_timeout_s=1, push_check_timeout_s=600)
    inference, entry = traffic_timeouts_s(settings)
    assert inference > 600 and entry > inference
    inference, entry = traffic_timeouts_s(GraftSettings(request_timeout_s=900))
    assert inference > 900 and entry > inference


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GRAFT_BATCH_THREADS", "0"),
        ("GRAFT_BATCH_THREADS", "two"),
        ("GRAFT_BATCH_TIMEOUT_MS", "-1"),
        ("GRAFT_MAX_BATCH_SIZE", "0"),
        ("GRAFT_MAX_BATCH_PIXELS", "0"),
        ("GRAFT_MAX_BATCH_PIXELS", "1e12"),
        ("GRAFT_HEAVY_IMAGE_PIXELS", "-1"),
        ("GRAFT_HEAVY_IMAGE_PIXELS", "many"),
        ("GRAFT_MAX_REENCODED_PIXELS", "0"),
    ],
)
def test_batching_settings_out_of_range_are_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as refused:
        GraftSettings()
    assert variable.removeprefix("GRAFT_").lower() in str(refused.value)


@pytest.mark.parametrize(
    ("env", "args", "line"),
    [
        ({"GRAFT_MAX_BATCH_PIXELS": "abc"}, [], "error: GRAFT_MAX_BATCH_PIXELS: Input should be"),
        ({"GRAFT_ACCESS_LOG": "maybe"}, [], "error: GRAFT_ACCESS_LOG: Input should be a valid"),
        ({}, ["--port", "0"], "error: --port: Input should be greater than or equal to 1"),
        ({"GRAFT_ADMIN_TOKEN": "short-secret"}, [], "error: GRAFT_ADMIN_TOKEN has 12 characters"),
    ],
)
def test_a_bad_setting_stops_graft_serve_with_one_line_naming_it(
    tmp_path: Path, env: dict[str, str], args: list[str], line: str
) -> None:
    result = CliRunner().invoke(app, ["serve", "--model-root", str(tmp_path), *args], env=env)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [result.output.strip()], result.output
    assert result.output.startswith(line), result.output
    assert "short-secret" not in result.output  # a value may be the admin token: never shown
    assert not any(tmp_path.iterdir()), "nothing may be installed into a refused model root"
