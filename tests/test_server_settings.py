"""Settings: defaults, env vars, CLI flags (which win), and refusals at start."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from server.settings import Settings, parse_settings


def test_defaults_are_safe():
    settings = Settings()
    assert settings.host == "127.0.0.1"
    assert settings.admin_key is None and settings.api_key is None
    assert settings.store == "local" and settings.engine == "torch"


def test_env_vars_then_flags(monkeypatch):
    monkeypatch.setenv("LPI_PORT", "9001")
    monkeypatch.setenv("LPI_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("LPI_ADMIN_KEY", "s3cret")
    settings = parse_settings(["--port", "9002", "--store", "edge"])
    assert settings.port == 9002  # the flag wins over the environment
    assert settings.max_batch_size == 7 and settings.store == "edge"
    assert settings.admin_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)  # secrets never reach logs


@pytest.mark.parametrize(
    "values",
    [
        {"store": "ftp://x"},
        {"engine": "onnx"},  # without onnx_dir
        {"max_batch_size": 0},
        {"port": 70000},
        {"max_items": 5000, "max_queue_rows": 100},
        {"colour": "red"},
    ],
)
def test_unsafe_or_contradictory_values_are_refused(values):
    with pytest.raises(ValidationError):
        Settings(**values)


def test_server_help_lists_every_setting():
    out = subprocess.run(
        [sys.executable, "-m", "server", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for flag in ("--backbone", "--store", "--max-batch-size", "--admin-key", "--host"):
        assert flag in out.stdout


def test_the_default_store_needs_no_optional_extra(tmp_path):
    """`pip install '.[server]'` has no qdrant-edge-py: opening the local store never imports it."""
    code = (
        "import sys\n"
        "from server.app import open_store\n"
        "from server.settings import Settings\n"
        f"open_store(Settings(data_dir={str(tmp_path)!r})).close()\n"
        "print('qdrant_edge' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_help_is_for_people():
    """Every flag with its env var and default; no type noise ({str,null}, SecretStr, int)."""
    from server.settings import Settings as Fields

    out = subprocess.run(
        [sys.executable, "-m", "server", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps lines anywhere
    for name in Fields.model_fields:
        assert f"--{name.replace('_', '-')}" in text
        assert f"[env: LPI_{name.upper()}]" in text, name
    for noise in ("{str,null}", "null}", "SecretStr", " int ", " str ", " Path "):
        assert noise not in text, noise
    assert "--port PORT" in text and "(default: 8000)" in text


def test_random_weights_are_refused_unless_asked_for():
    with pytest.raises(ValidationError, match="random-weights"):
        Settings(backbone="tiny")
    assert Settings(backbone="tiny", random_weights=True).random_weights
    assert not Settings(backbone="ViT-B-16:openai").random_weights  # a name, not a preset


def test_errors_are_one_line_naming_flag_and_env_var():
    from server.settings import error_line

    with pytest.raises(ValidationError) as caught:
        parse_settings(["--port", "70000", "--max-batch-size", "0"])
    line = error_line(caught.value)
    assert "\n" not in line
    assert "--port / LPI_PORT" in line and "(got '70000')" in line
    assert "--max-batch-size / LPI_MAX_BATCH_SIZE" in line
