"""One settings object for the whole appliance (DESIGN.md, "Configuration").

Sources, highest priority first: init arguments, ``APPLIANCE_*`` environment variables, the TOML
file named by ``APPLIANCE_CONFIG`` (the local stack writes ``var/appliance.toml``), defaults.
Secrets are ``SecretStr`` so they never print; they come from files, never from the command line.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_VAR_DIR = Path(os.environ.get("APPLIANCE_VAR_DIR", "var"))


class ModelSpec(BaseModel):
    """A face-embedding model: its own dimension, index and decision threshold."""

    dim: int = Field(gt=0, le=4096)
    threshold: float = Field(ge=-1.0, le=1.0)  # a single frame's decision
    # The fused decision of a track (several frames, vector.fusion); None: the single-frame threshold.
    track_threshold: float | None = Field(default=None, ge=-1.0, le=1.0)

    @property
    def fused_threshold(self) -> float:
        """The threshold a track's fused decision applies by default."""
        return self.threshold if self.track_threshold is None else self.track_threshold


DEFAULT_MODELS: dict[str, ModelSpec] = {
    # FAR <= 1 % per query, and per stranger track for the fused decision (95 % upper bounds, counted over
    # people) on 1,570 LFW people: bench/thresholds.py reproduces both (docs/configuration.md, "What the
    # default thresholds promise").
    "dlib-resnet-v1": ModelSpec(dim=128, threshold=0.9656, track_threshold=0.9578),
    # NOT calibrated: no ArcFace embeddings exist here. Run `appliance models calibrate` on the site's data.
    "arcface-r100": ModelSpec(dim=512, threshold=0.40),
}


class Settings(BaseSettings):
    """Every endpoint, credential and tunable of the appliance; each is in docs/configuration.md (tested)."""

    model_config = SettingsConfigDict(
        env_prefix="APPLIANCE_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    # --- process ---
    var_dir: Path = DEFAULT_VAR_DIR
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    log_level: str = "INFO"
    log_json: bool = True
    access_log_matches: bool = False
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)

    # --- PostgreSQL ---
    database_url: SecretStr = SecretStr("postgresql://appliance@127.0.0.1:5432/appliance")
    # Owner role used only by `appliance migrate` and maintenance (VACUUM, partition drops).
    database_admin_url: SecretStr | None = None
    db_pool_min: int = Field(default=1, ge=0)
    db_pool_max: int = Field(default=8, ge=1)
    db_connect_timeout: float = Field(default=3.0, gt=0)
    # Bounds on every wait for PostgreSQL (docs/operations.md, "Bounded waits"); CLI jobs on their own
    # connections have none.
    db_request_timeout: float = Field(default=3.0, gt=0)
    db_statement_timeout: float = Field(default=2.5, gt=0)
    db_lock_timeout: float = Field(default=1.0, gt=0)
    db_commit_guard: float = Field(default=1.0, gt=0)
    db_job_timeout: float = Field(default=300.0, gt=0)
    db_tcp_user_timeout: float = Field(default=10.0, ge=0)

    # --- Redis ---
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    redis_timeout: float = Field(default=1.0, gt=0)

    # --- S3 object store ---
    s3_endpoint: str = "127.0.0.1:8333"
    s3_access_key: SecretStr = SecretStr("")
    s3_secret_key: SecretStr = SecretStr("")
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    s3_bucket: str = "appliance-media"
    s3_backup_bucket: str = "appliance-backups"
    s3_timeout: float = Field(default=5.0, gt=0)

    # --- hot index and enrolment ---
    index_exact_max: int = Field(default=20_000, ge=0)
    index_hnsw_m: int = Field(default=16, ge=4, le=128)
    index_hnsw_ef_construction: int = Field(default=40, ge=8)
    index_hnsw_ef_search: int | None = Field(default=None, ge=8)  # None: measured per index
    index_hnsw_recall_target: float = Field(default=0.99, gt=0, lt=1)
    index_cold_timeout: float = Field(default=2.0, ge=0, le=60)
    index_rebuild_dead_fraction: float = Field(default=0.1, gt=0, lt=1)
    index_snapshot_dir: Path | None = None
    index_snapshot_interval: float = Field(default=300.0, gt=0)
    index_resync_interval: float = Field(default=30.0, gt=0)
    index_tombstone_file: Path | None = None
    index_redis_tombstone_probe: bool = False
    # --- track fusion (docs/configuration.md, "Track fusion"; the rule: vector/fusion.py) ---
    track_window: int = Field(default=10, ge=1, le=100)
    track_min_frames: int = Field(default=2, ge=1, le=100)
    track_idle_timeout: float = Field(default=10.0, gt=0, le=3600)
    track_max_tracks: int = Field(default=10_000, ge=1, le=1_000_000)
    track_store: Literal["auto", "memory", "redis"] = "auto"
    bulk_chunk_size: int = Field(default=1000, ge=1, le=10_000)
    bulk_max_body_bytes: int = Field(default=2 << 30, gt=0)

    # --- media ---
    media_max_image_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    media_max_clip_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    media_max_image_pixels: int = Field(default=50_000_000, gt=0)
    media_decode_budget_bytes: int = Field(default=256 * 1024 * 1024, ge=16 * 1024 * 1024)
    media_decode_wait: float = Field(default=30.0, gt=0)
    media_part_size: int = Field(default=5 * 1024 * 1024, ge=5 * 1024 * 1024)
    media_retention_image_days: float | None = Field(default=30.0, gt=0)
    media_retention_clip_days: float | None = Field(default=7.0, gt=0)
    media_retention_enrolment_days: float | None = Field(default=None, gt=0)

    # --- audit ---
    audit_queue_size: int = Field(default=100_000, gt=0)
    audit_batch_max: int = Field(default=5000, gt=0)
    audit_flush_interval: float = Field(default=0.2, gt=0)
    audit_checkpoint_interval: float = Field(default=60.0, gt=0)
    audit_partitions_ahead: int = Field(default=3, ge=1, le=24)
    audit_match_retention_days: int = Field(default=90, gt=0)
    audit_retention_days: int = Field(default=365, gt=0)

    # --- visits and retention of faces (docs/configuration.md, "Visits and retention") ---
    visits_retention_days: int = Field(default=30, gt=0, le=3650)
    visits_flush_interval: float = Field(default=1.0, gt=0, le=60)
    visits_buffer_size: int = Field(default=100_000, ge=100)
    subject_retention_days: int | None = Field(default=730, gt=0)

    # --- keys ---
    key_provider: Literal["vault", "local"] = "local"
    vault_addr: str = "http://127.0.0.1:8200"
    vault_role_id: SecretStr = SecretStr("")
    vault_secret_id: SecretStr = SecretStr("")
    vault_transit_mount: str = "transit"
    vault_kek_name: str = "appliance-kek"
    vault_signing_key_name: str = "appliance-signing"
    vault_owned_key_prefix: str = Field(default="appliance-owned-", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    vault_timeout: float = Field(default=2.0, gt=0)
    local_key_dir: Path | None = None
    dek_cache_size: int = Field(default=10_000, gt=0)
    dek_cache_ttl: float = Field(default=300.0, gt=0)
    # The retention sweep re-keys the template key of every model that had an erasure since its last
    # re-key and destroys the old seed, so stale copies of erased templates stop being invertible.
    template_rekey_after_erasure: bool = True

    # --- auth ---
    apikey_cache_ttl: float = Field(default=0.5, gt=0, le=1.0)

    # --- models ---
    models: dict[str, ModelSpec] = Field(default_factory=lambda: dict(DEFAULT_MODELS))
    # Each API worker re-reads the applied calibrated thresholds this often (the fallback when the
    # Redis feed message of `appliance models calibrate --apply` is lost).
    model_threshold_refresh_interval: float = Field(default=5.0, gt=0)

    @field_validator("var_dir", mode="after")
    @classmethod
    def _absolute_var_dir(cls, v: Path) -> Path:
        return v.resolve()

    @model_validator(mode="after")
    def _commit_guard_below_request_bound(self) -> Settings:
        """A COMMIT that reached a stopped server must be refused there before the client gives up on it."""
        if self.db_commit_guard >= self.db_request_timeout:
            raise ValueError("db_commit_guard must be below db_request_timeout (docs/operations.md, 'Bounded waits')")
        return self

    @model_validator(mode="after")
    def _track_can_name_someone(self) -> Settings:
        if self.track_min_frames > self.track_window:
            raise ValueError("track_min_frames must not exceed track_window: no track could ever be named")
        return self

    @property
    def key_dir(self) -> Path:
        """Where the local key provider keeps its 0600 KEK and signing key."""
        return self.local_key_dir or (self.var_dir / "keys")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config = os.environ.get("APPLIANCE_CONFIG")
        if config and Path(config).is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config))
        sources.append(file_secret_settings)
        return tuple(sources)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings; tests build their own ``Settings`` instead of patching this."""
    return Settings()
