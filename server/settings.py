"""The server's runtime configuration: one pydantic-settings class (env vars and CLI flags).

Every field is typed, defaulted and documented; `LPI_<FIELD>` sets it from the environment and
`python -m server --<field>` from the command line (flags win). Validators refuse unsafe or
contradictory values at start, before anything is loaded.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

log = logging.getLogger("server.settings")

MIB = 1024 * 1024


class Settings(BaseSettings):
    """lpi-serve: one frozen CLIP backbone, hot-swappable task prompts, Qdrant storage."""

    model_config = SettingsConfigDict(
        env_prefix="LPI_",
        cli_prog_name="python -m server",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        extra="forbid",
        frozen=True,
    )

    # -- model ----------------------------------------------------------------------------------
    backbone: str | None = Field(
        None,
        description="A checkpoint path or a preset name (tiny, ViT-B-16, ...). None: build (once) "
        "and serve the demo bundle, a tiny CLIP pretrained on synthetic data with 3 tasks.",
    )
    engine: Literal["torch", "onnx"] = Field("torch", description="Model runtime.")
    onnx_dir: Path | None = Field(
        None, description="The `python -m export onnx` folder (engine=onnx only)."
    )
    device: str = Field("cpu", description="Torch device for engine=torch: cpu, cuda, cuda:1.")
    threads: int | None = Field(None, ge=1, description="CPU threads for the model (None: all).")
    pool_slots: int = Field(64, ge=1, le=4096, description="Task prompt versions held at once.")
    pool_rank: int = Field(16, ge=1, le=1024, description="Largest folded rank R' a task may have.")

    # -- storage --------------------------------------------------------------------------------
    data_dir: Path = Field(
        Path("data"), description="Registry state, loaded artifacts, the store, the demo bundle."
    )
    artifact_dir: Path | None = Field(
        None,
        description="PUT /tasks by path reads only inside this folder (default data_dir/inbox).",
    )
    store: str = Field(
        "local",
        description="'local' (qdrant-client local mode in data_dir/qdrant), 'edge' (the Qdrant "
        "engine in-process, HNSW), 'memory', or a Qdrant server URL (http[s]://...).",
    )
    store_api_key: SecretStr | None = Field(None, description="API key of a Qdrant server.")
    layout: Literal["collection-per-task", "tenant"] = Field(
        "collection-per-task", description="One collection per task, or one tenant collection."
    )

    # -- batching and limits --------------------------------------------------------------------
    max_batch_size: int = Field(32, ge=1, le=4096, description="Rows per model batch.")
    max_wait_ms: float = Field(
        2.0, ge=0, le=1000,
        description="How long a batch waits to fill after its first row (while the model is "
        "busy, rows queue anyway and the next batch takes them all).",
    )  # fmt: skip
    max_queue_rows: int = Field(
        2048, ge=1, description="Rows waiting at most; beyond it requests get 503 + Retry-After."
    )
    max_items: int = Field(64, ge=1, le=4096, description="Texts + images (or items) per request.")
    max_body_bytes: int = Field(32 * MIB, ge=1024, description="Largest request body.")
    max_artifact_bytes: int = Field(256 * MIB, ge=1024, description="Largest uploaded artifact.")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Largest decoded image (width x height); beyond it: 413."
    )
    max_text_chars: int = Field(4096, ge=1, description="Longest text, in characters.")
    request_timeout_s: float = Field(30.0, gt=0, description="Per-request model wait limit.")

    # -- network and auth -----------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Bind address; loopback unless told otherwise.")
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = Field(
        None, description="If set, /embed, /index, /search and GET /tasks need it (Bearer)."
    )
    admin_key: SecretStr | None = Field(
        None, description="If set, loading, promoting and unloading tasks need it (Bearer)."
    )
    demo_tasks: int = Field(3, ge=1, le=4, description="Tasks in the demo bundle (1-4).")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("store")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if value in ("local", "edge", "memory") or value.startswith(("http://", "https://")):
            return value
        raise ValueError("store must be 'local', 'edge', 'memory' or an http(s):// URL")

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.engine == "onnx" and self.onnx_dir is None:
            raise ValueError("engine=onnx needs onnx_dir (a `python -m export onnx` folder)")
        if self.max_items > self.max_queue_rows:
            raise ValueError("max_items must not exceed max_queue_rows")
        if not _is_loopback(self.host) and self.admin_key is None:
            log.warning(
                "binding %s with no admin_key: anyone who reaches this port can load and "
                "unload tasks; set LPI_ADMIN_KEY",
                self.host,
            )
        return self

    @property
    def inbox(self) -> Path:
        return self.artifact_dir or self.data_dir / "inbox"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Settings from env vars, overridden by CLI flags (`--help` lists them all)."""
    return CliApp.run(Settings, cli_args=argv if argv is not None else None)
