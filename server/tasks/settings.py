"""Task-layer configuration (pydantic-settings, `LOOM_*` environment variables, overridden by `loom serve` flags)."""
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class TaskSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOOM_", extra="ignore")

    summarize_chunk_tokens: int = Field(1536, ge=64, description="largest document piece summarized in one call")
    summarize_max_input_chars: int = Field(2_000_000, ge=1000, description="longest document /v1/summarize takes "
                                                                        "(larger ones answer 400 before any work)")
    summarize_max_tokens: int = Field(200, ge=1, description="default length of a summary")
    classify_permutations: int = Field(2, ge=1, le=8, description="label orders /v1/classify averages by default")
