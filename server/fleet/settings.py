"""`python -m server.fleet`'s settings: the server's, plus where the fleet runs and how big.

Every `python -m server` flag and LPI_* variable works the same; the fleet adds its own
(LPI_FLEET_* is not needed: these are LPI_ADDRESS, LPI_REPLICAS, ... like the rest).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import CliApp, CliSettingsSource, SettingsConfigDict

from server.fleet.artifacts import filesystem, split_location
from server.settings import Settings, _add_argument


class FleetSettings(Settings):
    """lpi-serve as a Ray Serve fleet: N engine replicas behind Ray's HTTP proxy."""

    model_config = SettingsConfigDict(
        **{**Settings.model_config, "cli_prog_name": "python -m server.fleet"}
    )

    address: str | None = Field(
        None,
        description="A Ray cluster to join (host:6379 of its head, or auto inside a "
        "cluster node); unset: start a local one for this process, stopped when it exits.",
    )
    replicas: int = Field(2, ge=1, le=1024, description="Engine replicas (fixed count).")
    min_replicas: int | None = Field(
        None, ge=0, description="With max_replicas: autoscale between them instead."
    )
    max_replicas: int | None = Field(None, ge=1, description="Autoscaling's upper bound.")
    target_requests: float = Field(
        8.0, gt=0, description="Autoscaling: requests in flight per replica it aims for."
    )
    max_ongoing_requests: int = Field(
        256,
        ge=1,
        description="Requests Ray's proxy lets one replica hold at once (Ray's "
        "default, 5, starves the batcher: requests queue in the proxy instead of batching).",
    )
    working_set: int | None = Field(
        None,
        ge=1,
        description="Tasks one replica holds at most: a request on another catalog "
        "task gets 409 + Retry-After while it loads, the least recently used leave (keep "
        "2 x working_set <= pool_slots: a task may hold two versions). Unset: every task.",
    )
    replica_cpus: float = Field(
        1.0, gt=0, description="Ray CPUs each replica reserves (placement; not a thread cap)."
    )
    fleet_dir: Path | None = Field(
        None,
        description="Shared by every replica: the artifact store, the task catalog and "
        "(embedded stores) the vectors. On a multi-node cluster, a shared mount. Default: "
        "data_dir/fleet.",
    )
    artifacts: str | None = Field(
        None,
        description="The artifact store every replica reads task artifacts from: a shared "
        "directory, file://..., or an fsspec URL (s3://bucket/prefix, gs://bucket/prefix, "
        "az://container/prefix: needs s3fs, gcsfs or adlfs; credentials from their usual "
        "environment). Not --artifact-dir (where PUT /tasks paths are read). Default: "
        "fleet_dir/artifacts.",
    )

    @model_validator(mode="after")
    def _fleet_consistent(self) -> FleetSettings:
        if self.backbone is None:
            raise ValueError("the fleet needs --backbone (the demo bundle is for python -m server)")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("give both min_replicas and max_replicas, or neither")
        if self.min_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if self.store == "memory":
            raise ValueError("store=memory cannot be shared by replicas: use local, edge or a URL")
        protocol = split_location(self.artifacts or "")[0]
        if protocol == "memory":
            raise ValueError("artifacts=memory:// is one process's own: use a folder or a bucket")
        if protocol != "file":
            filesystem(self.artifacts)  # a missing package is named at start, not per replica
        return self

    @property
    def shared_dir(self) -> Path:
        return self.fleet_dir or self.data_dir / "fleet"

    @property
    def artifact_store(self) -> str:
        """The artifact store's location (a folder or a URL); the catalog stays in
        shared_dir/artifacts/catalog, held by one actor."""
        return self.artifacts or str(self.shared_dir / "artifacts")

    def serve_logging(self) -> dict:
        """Ray Serve's own logs (proxy and replicas) at the server's level; its access log
        (one record per request in two processes) follows --access-log."""
        return {"log_level": self.log_level.upper(), "enable_access_log": self.access_log}

    def replica_settings(self) -> Settings:
        """What each replica's app gets: the server's settings, inbox made explicit (the
        replica's data_dir is its own scratch folder)."""
        fields = {k: getattr(self, k) for k in Settings.model_fields}
        fields["artifact_dir"] = self.inbox
        return Settings.model_construct(**fields)


def parse_fleet_settings(argv: list[str] | None = None) -> FleetSettings:
    source = CliSettingsSource(
        FleetSettings,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        cli_show_env_vars=True,
        cli_exit_on_error=False,
        add_argument_method=_add_argument,
    )
    return CliApp.run(FleetSettings, cli_args=argv, cli_settings_source=source)
