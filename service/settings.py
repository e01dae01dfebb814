"""Service settings, read from the environment (prefix LEDGER_)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///./privacy-ledger.db"
DEFAULT_FINGERPRINT_KEY_FILE = "privacy-ledger.key"


class Settings(BaseSettings):
    """Everything the service reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="LEDGER_", extra="ignore")

    database_url: str = Field(
        DEFAULT_DATABASE_URL,
        description="SQLAlchemy URL: a SQLite file (default) or postgresql+psycopg://…",
    )
    admin_key: str | None = Field(
        None, description="Accepted as an admin API key (bootstrap for scripts and compose)."
    )
    secret_key: SecretStr | None = Field(
        None,
        description="Keys the HMAC of stored request fingerprints (at least 32 characters); "
        "when unset, the key file is used. Never stored in the database.",
    )
    secret_key_file: str = Field(
        DEFAULT_FINGERPRINT_KEY_FILE,
        description="Key file used when secret_key is unset: created on first start "
        "(32 random bytes as hex, mode 0600) and shared by every worker and process.",
    )
    key_cache_seconds: float = Field(
        1.0,
        ge=0,
        le=60,
        description="How long each process trusts an API key it verified without reading it "
        "again: a revoked key is refused everywhere within this bound (0: read every time).",
    )
    default_lease_seconds: int = Field(3600, ge=1, le=7 * 24 * 3600)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    log_level: str = "info"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once)."""
    return Settings()
