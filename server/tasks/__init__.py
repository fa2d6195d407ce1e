"""Tasks built on the engine API (no HTTP here): map-reduce summarization and zero-shot classification by label
likelihood. Both take a `generate` callable shaped like AsyncEngine.generate, so the API layer can pass its tracked
wrapper and tests can pass the engine itself. Engine errors raise through them unchanged."""
from server.tasks.classify import Classification, Classifier, ClassifyOptions, head_classification
from server.tasks.common import Generate
from server.tasks.settings import TaskSettings
from server.tasks.summarize import Summarizer, SummaryEvent

__all__ = [
           "Classification",
           "Classifier",
           "ClassifyOptions",
           "Generate",
           "Summarizer",
           "SummaryEvent",
           "TaskSettings",
           "head_classification",
]
