"""The server's runtime configuration: one pydantic-settings class (env vars and CLI flags).

Every field is typed, defaulted and documented; `LPI_<FIELD>` sets it from the environment and
`python -m server --<field>` from the command line (flags win). Validators refuse unsafe or
contradictory values at start, before anything is loaded.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, CliApp, CliSettingsSource, SettingsConfigDict

from server.locations import default_data_dir

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
        description="A checkpoint path; a model name from the Hugging Face cache: an open_clip "
        "tag (ViT-B-32:openai, ViT-B-16:laion2b_s34b_b88k), hf-hub:ORG/NAME or a CLIPModel id "
        "ORG/NAME (@REVISION pins one); or a preset of random weights (tiny, ViT-B-16, ...: "
        "needs --random-weights). Unset: build (once) and serve the demo bundle, a tiny CLIP "
        "pretrained on synthetic data.",
    )
    allow_download: bool = Field(
        False,
        description="Let a model name be fetched from the Hugging Face hub into its cache "
        "(HF_HUB_CACHE / HF_HOME); off, only cached files are used.",
    )
    random_weights: bool = Field(
        False,
        description="Allow serving a preset's random weights (tests, load runs): "
        "vectors from them mean nothing.",
    )
    engine: Literal["torch", "onnx"] = Field("torch", description="Model runtime.")
    onnx_dir: Path | None = Field(
        None, description="The `python -m export onnx` folder (engine=onnx only)."
    )
    device: str = Field("cpu", description="Torch device for engine=torch: cpu, cuda, cuda:1.")
    threads: int | None = Field(
        None,
        ge=1,
        description="Intra-op CPU threads for the model (None: the cores this "
        "process may use less one, left to the batcher and event loop; at least 1).",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="engine=torch weights and task slots: auto = bfloat16 on CUDA and "
        "on CPUs with AVX512-BF16 or AMX, float32 elsewhere; a dtype the hardware lacks falls "
        "back to float32 (logged, shown on /readyz).",
    )
    onnx_precision: Literal["auto", "float32", "float16", "int8"] = Field(
        "auto",
        description="engine=onnx graphs: auto = int8 where the export holds it "
        "(python -m export onnx --quantize int8), else float32.",
    )
    cuda_graphs: bool = Field(
        False,
        description="Replay the towers' forward passes from CUDA graphs, one per batch "
        "size bucket up to max_batch_size (engine=torch on CUDA only).",
    )
    pool_slots: int = Field(64, ge=1, le=4096, description="Task prompt versions held at once.")
    pool_rank: int = Field(16, ge=1, le=1024, description="Largest folded rank R' a task may have.")

    # -- storage --------------------------------------------------------------------------------
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Registry state, loaded artifacts, the store, the demo bundle. Default: "
        "data/ of the repository checkout the server runs in, else the per-user data folder "
        "$XDG_DATA_HOME/lpi-serve (~/.local/share/lpi-serve).",
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
    # HNSW and memory (edge and Qdrant servers; local mode searches by brute force). Defaults
    # measured by benchmarks/store.py: recall@10 >= 0.99 at 1M points (README).
    hnsw_m: int = Field(32, ge=4, le=128, description="HNSW graph degree of new collections.")
    hnsw_ef_construct: int = Field(
        256, ge=4, le=4096, description="HNSW build candidate list of new collections."
    )
    hnsw_ef: int = Field(
        1024, ge=1, le=4096, description="HNSW search candidate list (a search's hnsw_ef wins)."
    )
    exact_below: int = Field(
        20_000,
        ge=0,
        le=10_000_000,
        description="Collections under this many points are searched exactly (no graph is used).",
    )
    quantization: Literal["none", "int8"] = Field(
        "int8",
        description="int8: a 1-byte copy of each vector in RAM searched first, the best "
        "candidates rescored on the float32 originals.",
    )
    vectors_on_disk: bool = Field(
        False, description="Keep float32 vectors in memory-mapped files (RAM: the int8 copy)."
    )
    shards: int = Field(1, ge=1, le=1024, description="Shards per collection (Qdrant server).")
    replicas: int = Field(
        1, ge=1, le=16, description="Replication factor per collection (Qdrant cluster)."
    )
    background_builds: bool = Field(
        True,
        description="edge: build HNSW graphs and payload indexes in a child process as "
        "collections grow (searches keep answering meanwhile).",
    )
    payload_indexes: list[str] = Field(
        default_factory=list,
        description="Payload indexes to create, TASK:FIELD:KIND (TASK * "
        "for every task; KIND keyword, integer or bool), e.g. *:split:keyword.",
    )
    warn_unindexed_above: int = Field(
        100_000,
        ge=0,
        description="A filter on a field with no payload index over more points "
        "than this answers with a warning, and the index is built in the background.",
    )

    # -- batching and limits --------------------------------------------------------------------
    max_batch_size: int = Field(32, ge=1, le=4096, description="Rows per model batch.")
    max_wait_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="How long a batch waits to fill after its first row (while the model is "
        "busy, rows queue anyway and the next batch takes them all).",
    )
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
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free one).")
    api_key: SecretStr | None = Field(
        None, description="If set, /embed, /index, /search and GET /tasks need it (Bearer)."
    )
    admin_key: SecretStr | None = Field(
        None, description="If set, loading, promoting and unloading tasks need it (Bearer)."
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins a browser page may call this API from "
        "(CORS), e.g. https://app.example.com, or * for any; empty: CORS off.",
    )
    thumbnail_max_side: int = Field(
        160, ge=16, le=512, description="Largest side of an index-time thumbnail, in pixels."
    )
    thumbnail_max_bytes: int = Field(
        24_576, ge=1024, le=49_152, description="Largest index-time thumbnail (JPEG bytes)."
    )
    demo_tasks: int = Field(3, ge=1, le=4, description="Tasks in the demo bundle (1-4).")
    demo_size: Literal["full", "quick"] = Field(
        "full",
        description="How much the demo bundle trains: 'full' (about a minute on 2 CPU cores) or "
        "'quick' (seconds, recall near chance: for smoke tests).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Least severe log record written."
    )
    log_format: Literal["json", "text"] | None = Field(
        None,
        description="json: one JSON object per line; text: for people. Unset: json "
        "unless stderr is a terminal.",
    )
    access_log: bool = Field(True, description="One log record per HTTP request (uvicorn's).")

    @field_validator("store")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if value in ("local", "edge", "memory") or value.startswith(("http://", "https://")):
            return value
        raise ValueError("store must be 'local', 'edge', 'memory' or an http(s):// URL")

    @field_validator("payload_indexes")
    @classmethod
    def _index_specs(cls, value: list[str]) -> list[str]:
        for spec in value:
            parts = spec.split(":")
            if len(parts) != 3 or not all(parts) or parts[2] not in ("keyword", "integer", "bool"):
                raise ValueError(f"payload_indexes: {spec!r} is not TASK:FIELD:KIND")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.engine == "onnx" and self.onnx_dir is None:
            raise ValueError("engine=onnx needs onnx_dir (a `python -m export onnx` folder)")
        if self.cuda_graphs and (self.engine != "torch" or not self.device.startswith("cuda")):
            raise ValueError("cuda_graphs needs engine=torch on a CUDA device")
        if self.max_items > self.max_queue_rows:
            raise ValueError("max_items must not exceed max_queue_rows")
        if self.backbone and not self.random_weights and _is_preset(self.backbone):
            raise ValueError(
                f"backbone {self.backbone!r} is a preset of random weights, whose vectors mean "
                f"nothing: name pretrained weights (e.g. ViT-B-16:openai with --allow-download) "
                f"or pass --random-weights to serve it anyway"
            )
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


def _is_preset(backbone: str) -> bool:
    # Imported here: a bad flag is reported without waiting for torch to import.
    from lpi.checkpoint import source_kind

    return source_kind(backbone) == "preset"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


S = TypeVar("S", bound=Settings)


def parse_settings(argv: list[str] | None = None, model: type[S] = Settings) -> S:
    """Settings (`model`: Settings or a subclass) from env vars, overridden by CLI flags
    (`--help` lists them all).

    Raises SettingsError (an unknown or malformed flag) or ValidationError (a bad value);
    `error_line` turns either into the one line `python -m server` prints.
    """
    source = CliSettingsSource(
        model,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        cli_show_env_vars=True,
        cli_exit_on_error=False,
        add_argument_method=_add_argument,
    )
    return CliApp.run(model, cli_args=argv, cli_settings_source=source)


# pydantic-settings names a flag's value by its type ("--port int"); people read "--port PORT".
_TYPE_METAVARS = {"str", "int", "float", "Path", "SecretStr"}


def _add_argument(parser, *names, **kwargs):
    if kwargs.get("metavar") in _TYPE_METAVARS and kwargs.get("dest"):
        kwargs["metavar"] = kwargs["dest"].upper().replace("-", "_")
    return parser.add_argument(*names, **kwargs)


def error_line(err: Exception) -> str:
    """One line naming each bad setting (flag and env var), for a start-up failure."""
    if not isinstance(err, ValidationError):
        return str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    parts = []
    for item in err.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        where = f"--{field.replace('_', '-')} / LPI_{field.upper()}: " if field else ""
        message = item["msg"].removeprefix("Value error, ")
        shown = field and "key" not in field  # never echo a secret
        parts.append(f"{where}{message} (got {item['input']!r})" if shown else where + message)
    return "; ".join(parts)
