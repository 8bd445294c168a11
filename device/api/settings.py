"""API settings. Defaults suit a 2-4 core board: one generation at a time, a short queue."""

from __future__ import annotations

from pydantic import AliasChoices, BaseModel, ConfigDict, Field


class ApiSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    api_key: str | None = Field(
        default=None,
        validation_alias=AliasChoices("api_key", "token"),
        description="if set, /v1/* needs 'Authorization: Bearer <key>' (alias: token)",
    )
    max_concurrency: int = Field(default=1, ge=1, description="generations running at once")
    max_queue: int = Field(default=8, ge=0, description="requests waiting for a slot before 429/503")
    queue_full_status: int = Field(default=429, description="429 or 503")
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    default_max_tokens: int = Field(default=512, ge=1, description="when a request gives no max_tokens")
    model_aliases: tuple[str, ...] = Field(
        default=(), description="extra model ids accepted besides the name"
    )
    ready_probe_interval_s: float = 10.0
