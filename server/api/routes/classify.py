"""POST /v1/classify: zero-shot classification by the model's likelihood of each label (see server/tasks/classify.py
for the scoring, calibration and label-order averaging)."""
from __future__ import annotations

import functools

from fastapi import APIRouter, Request

from server.api.errors import APIError
from server.api.protocol import ClassifyRequest, ClassifyResponse, ClassifyResult, Usage, new_id, now
from server.api.routes import ERROR_RESPONSES
from server.api.serving import ReadyServing, Serving
from server.api.streaming import until_disconnect
from server.tasks import Classifier, ClassifyOptions, TaskError

router = APIRouter()
MAX_SCORING_REQUESTS = 4096


def classifier_of(serving: Serving) -> Classifier:
    """One Classifier per served model, so its calibration cache lasts across requests."""
    if getattr(serving, "classifier", None) is None:
        serving.classifier = Classifier(functools.partial(serving.generate, endpoint="classify"), serving.tokenizer,
                                        serving.max_model_len)
    return serving.classifier


@router.post("/v1/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES,
             summary="Classify texts into candidate labels (zero-shot, calibrated label likelihood)")
async def classify(body: ClassifyRequest, serving: ReadyServing, request: Request) -> ClassifyResponse:
    serving.check_model(body.model)
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts:
        raise APIError(400, "input must not be empty", param="input")
    if len(texts) > 256:
        raise APIError(400, "at most 256 inputs per request", param="input")
    unknown = set(body.label_descriptions or {}) - set(body.labels)
    if unknown:
        raise APIError(400, f"label_descriptions names labels that are not in labels: {sorted(unknown)}",
                       param="label_descriptions")
    permutations = body.permutations or serving.settings.classify_permutations
    per_input = 2 * len(body.labels) * (2 if body.multi_label else min(permutations, max(len(body.labels), 2)))
    if per_input * (len(texts) + 3) > MAX_SCORING_REQUESTS:
        raise APIError(400, f"{len(texts)} inputs x {len(body.labels)} labels need more than {MAX_SCORING_REQUESTS} "
                            f"scoring requests; send fewer inputs or labels per request", param="input")
    opts = ClassifyOptions(multi_label=body.multi_label, calibrate=body.calibrate,
                           examples=[(e.text, e.label) for e in body.examples or []],
                           descriptions=dict(body.label_descriptions or {}),
                           permutations=permutations)
    classifier = classifier_of(serving)
    try:
        results, usage = await until_disconnect(request, classifier.classify(texts, body.labels, opts))
    except TaskError as exc:
        raise APIError(500, str(exc), code="engine_error") from exc
    data = [ClassifyResult(index=i, label=r.label, scores=r.scores, labels=r.labels) for i, r in enumerate(results)]
    return ClassifyResponse(id=new_id("cls"), created=now(), model=serving.model_name, data=data,
                            usage=Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=0,
                                        total_tokens=usage.prompt_tokens))
