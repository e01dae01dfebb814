"""Service settings, read from the environment (prefix LEDGER_)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///./privacy-ledger.db"


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
    default_lease_seconds: int = Field(3600, ge=1, le=7 * 24 * 3600)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    log_level: str = "info"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once)."""
    return Settings()
