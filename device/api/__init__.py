"""The OpenAI-compatible local API.

holder = ModelHolder(Engine.from_bundle(...))
app = create_app(holder, ApiSettings(port=8080))       # FastAPI app
ApiServer(app, port=8080).start()                       # uvicorn in a thread (or `nanofleet device serve`)
holder.swap(new_engine)      # drains: in-flight requests finish on the old engine, which is then closed
holder.stats.snapshot()      # {"decode_tok_s", "ttft_p50_ms", "ttft_p95_ms", "requests", "errors", ...}
"""

from .app import create_app
from .errors import ApiError
from .holder import DrainTimeoutError, ModelHolder, NoModelError
from .server import ApiServer
from .settings import ApiSettings
from .stats import RequestRecord, ServingStats

APISettings = ApiSettings  # alias

__all__ = [
    "ApiError",
    "ApiServer",
    "APISettings",
    "ApiSettings",
    "DrainTimeoutError",
    "ModelHolder",
    "NoModelError",
    "RequestRecord",
    "ServingStats",
    "create_app",
]
