"""POST /v1/classify: texts into candidate labels (zero-shot, or a fine-tuned classifier's head)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool

from server.api.protocol.common import TIMEOUT_DESCRIPTION, Body, Usage


class ClassifyExample(Body):
    text: str
    label: str


class ClassifyRequest(Body):
    model: str | None = None
    input: str | list[str] = Field(..., description="a text, or several classified in one batch")
    labels: list[str] | None = Field(None, min_length=1, max_length=64,
                                     description="candidate labels (zero-shot: required; with a fine-tuned classifier: "
                                                 "optional, a subset of the model's labels)")
    multi_label: StrictBool = Field(False, description="score each label independently (yes/no) instead of one of them")
    label_descriptions: dict[str, str] | None = Field(None, description="label -> what it means")
    examples: list[ClassifyExample] | None = Field(None, max_length=32, description="few-shot examples")
    calibrate: StrictBool = Field(True, description="divide out the model's bias toward labels on a content-free input")
    permutations: int | None = Field(None, ge=1, le=8, description="label orders averaged (default: server setting)")
    timeout: float | None = Field(None, gt=0, description=TIMEOUT_DESCRIPTION)


class ClassifyResult(Body):
    index: int
    label: str
    scores: dict[str, float]
    labels: list[str] | None = Field(None, description="multi_label: every label scored at least 0.5")


class ClassifyResponse(Body):
    id: str
    object: Literal["classification"] = "classification"
    created: int
    model: str
    data: list[ClassifyResult]
    usage: Usage
