"""POST /v1/classify: from a fine-tuned classifier's head when one is served (`--classifier-model`), else zero-shot
classification by the generator's likelihood of each label (see server/tasks/classify.py for the scoring,
calibration and label-order averaging)."""
from __future__ import annotations

from fastapi import APIRouter, Request

from server.api.deps import ReadyModel, Tracker
from server.api.encoding import encoders_for, pick_encoder, token_inputs
from server.api.errors import APIError
from server.api.lifecycle import ServedModel
from server.api.protocol import ClassifyRequest, ClassifyResponse, ClassifyResult, Usage, new_id, now
from server.api.routes import ERROR_RESPONSES
from server.api.streaming import until_disconnect
from server.api.tracking import RequestTracker
from server.tasks import ClassifyOptions, head_classification

router = APIRouter()
MAX_SCORING_REQUESTS = 4096


@router.post("/v1/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES,
             summary="Classify texts into candidate labels (zero-shot, calibrated label likelihood)")
async def classify(body: ClassifyRequest, served: ReadyModel, tracker: Tracker, request: Request) -> ClassifyResponse:
    if encoders_for(served, "classify") and (body.model is None or body.model != served.name):
        return await classify_with_head(body, served, tracker, request)
    served.check_model(body.model)
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts:
        raise APIError(400, "input must not be empty", param="input")
    if body.labels is None:
        raise APIError(400, "labels is required: this server classifies zero-shot (it has no --classifier-model)",
                       param="labels")
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
    with tracker.task():
        results, usage = await until_disconnect(request, served.classifier.classify(texts, body.labels, opts,
                                                                                     tracker.deadline(body.timeout)))
    data = [ClassifyResult(index=i, label=r.label, scores=r.scores, labels=r.labels) for i, r in enumerate(results)]
    return ClassifyResponse(id=new_id("cls"), created=now(), model=served.name, data=data,
                            usage=Usage.of(usage, cached=False))


async def classify_with_head(body: ClassifyRequest, served: ServedModel, tracker: RequestTracker,
                             request: Request) -> ClassifyResponse:
    """The fine-tuned head's probabilities: softmax over its labels (renormalized over `labels` when a subset is
    asked for), or a sigmoid per label for a multi-label checkpoint (server/tasks/classify.head_classification)."""
    enc = pick_encoder(served, body.model, "classify")
    if body.examples or body.label_descriptions:
        raise APIError(400, "examples and label_descriptions are for zero-shot classification; this model has a "
                            "fine-tuned head", param="examples" if body.examples else "label_descriptions")
    own = enc.labels
    wanted = list(body.labels or own)
    unknown = [label for label in wanted if label not in own]
    if unknown:
        raise APIError(400, f"labels {unknown} are not labels of the model {enc.name!r}; its labels are {own}",
                       param="labels")
    if len(set(wanted)) != len(wanted):
        raise APIError(400, "labels must not repeat", param="labels")
    inputs = await token_inputs(enc, body.input, None, allow_empty_text=True)
    rows = await until_disconnect(request, tracker.encode(enc.name, inputs, "classify",
                                                          tracker.deadline(body.timeout)))
    results = [head_classification(row, own, wanted, enc.multi_label) for row in rows]
    data = [ClassifyResult(index=i, label=r.label, scores=r.scores, labels=r.labels) for i, r in enumerate(results)]
    tokens = sum(map(len, inputs))
    return ClassifyResponse(id=new_id("cls"), created=now(), model=enc.name, data=data,
                            usage=Usage(prompt_tokens=tokens, total_tokens=tokens))
