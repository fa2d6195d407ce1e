"""Engine layer: owns all request state. AsyncEngine (asyncio face) -> EngineCore (step loop) -> Scheduler +
BlockManager + Sampler + ModelRunner."""
from server.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from server.engine.engine_core import EngineCore
from server.engine.outputs import EngineStats, RequestOutput
from server.engine.sampling_params import InvalidRequestError, SamplingParams
from server.engine.settings import EngineSettings

__all__ = [
           "AsyncEngine",
           "EngineCore",
           "EngineDeadError",
           "EngineSettings",
           "EngineStats",
           "InvalidRequestError",
           "QueueFullError",
           "RequestOutput",
           "SamplingParams",
]
