"""Engine layer: owns all request state. AsyncEngine (asyncio face) -> EngineCore (step loop) -> Scheduler +
BlockManager + Sampler + ModelRunner, with the OutputProcessor beside the core. Callers use what is exported here:
the engine, its settings, `SamplingParams`, the output types and the typed errors."""
from server.engine.async_engine import AsyncEngine
from server.engine.encoder import EncodeBatchStats, EncoderBatcher
from server.engine.engine_core import EngineCore
from server.engine.errors import (
    EngineDeadError,
    EngineError,
    InternalEngineError,
    InvalidRequestError,
    QueueFullError,
    RequestTimeoutError,
    ServerBusyError,
)
from server.engine.gather import collect, gather_all
from server.engine.grammar import Grammar, GrammarSpec
from server.engine.outputs import (
    CompletionOutput,
    EngineStats,
    Liveness,
    RequestOutput,
    StepStats,
    TokenLogprob,
    TokenUsage,
)
from server.engine.sampling_params import SamplingParams
from server.engine.settings import EngineSettings
from server.engine.step_hooks import StepObserver

__all__ = [
           "AsyncEngine",
           "CompletionOutput",
           "EncodeBatchStats",
           "EncoderBatcher",
           "EngineCore",
           "EngineDeadError",
           "EngineError",
           "EngineSettings",
           "EngineStats",
           "Grammar",
           "GrammarSpec",
           "InternalEngineError",
           "InvalidRequestError",
           "Liveness",
           "QueueFullError",
           "RequestOutput",
           "RequestTimeoutError",
           "SamplingParams",
           "ServerBusyError",
           "StepObserver",
           "StepStats",
           "TokenLogprob",
           "TokenUsage",
           "collect",
           "gather_all",
]
