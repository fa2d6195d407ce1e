"""POST /v1/classify: zero-shot classification by the model's likelihood of each label (see server/tasks/classify.py
for the scoring, calibration and label-order averaging)."""
from __future__ import annotations

from fastapi import APIRouter, Request

from server.api.deps import ReadyModel, Tracker
from server.api.errors import APIError
from server.api.protocol import ClassifyRequest, ClassifyResponse, ClassifyResult, Usage, new_id, now
from server.api.routes import ERROR_RESPONSES
from server.api.streaming import until_disconnect
from server.tasks import ClassifyOptions

router = APIRouter()
MAX_SCORING_REQUESTS = 4096


@router.post("/v1/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES,
             summary="Classify texts into candidate labels (zero-shot, calibrated label likelihood)")
async def classify(body: ClassifyRequest, served: ReadyModel, tracker: Tracker, request: Request) -> ClassifyResponse:
    served.check_model(body.model)
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts:
        raise APIError(400, "input must not be empty", param="input")
    if len(texts) > 256:
        raise APIError(400, "at most 256 inputs per request", param="input")
    unknown = set(body.label_descriptions or {}) - set(body.labels)
    if unknown:
        raise APIError(400, f"label_descriptions names labels that are not in labels: {sorted(unknown)}",
                       param="label_descriptions")
    permutations = body.permutations or served.classifier.permutations
    per_input = 2 * len(body.labels) * (2 if body.multi_label else min(permutations, max(len(body.labels), 2)))
    if per_input * (len(texts) + 3) > MAX_SCORING_REQUESTS:
        raise APIError(400, f"{len(texts)} inputs x {len(body.labels)} labels need more than {MAX_SCORING_REQUESTS} "
                            f"scoring requests; send fewer inputs or labels per request", param="input")
    opts = ClassifyOptions(multi_label=body.multi_label, calibrate=body.calibrate,
                           examples=[(e.text, e.label) for e in body.examples or []],
                           descriptions=dict(body.label_descriptions or {}),
                           permutations=permutations)
    results, usage = await until_disconnect(request, served.classifier.classify(texts, body.labels, opts,
                                                                                 tracker.deadline(body.timeout)))
    data = [ClassifyResult(index=i, label=r.label, scores=r.scores, labels=r.labels) for i, r in enumerate(results)]
    return ClassifyResponse(id=new_id("cls"), created=now(), model=served.name, data=data,
                            usage=Usage.of(usage, cached=False))
