"""Zero-shot classification by label likelihood.

The model reads an instruction naming the candidate labels and the text, and we measure how likely it is to answer
with each label: the prompt is the rendered chat up to the assistant's turn followed by the label's tokens
(optionally the end-of-turn marker too), scored by one prefill-only engine request (`max_tokens=0,
prompt_logprobs=0`). Every label of every input, in every label order, is submitted at once (up to 256 in flight),
so the engine batches them.

Scores are length-normalized: a multi-token label scores the *mean* log-probability per token of its answer tokens,
not the sum, so long labels are not penalized for their length.

Small models are biased (toward a favourite label, toward the first label listed), so by default we also:
- score surface forms: the label as given, capitalized and lower-cased ("positive", "Positive"), their
  probabilities added up, because the model's answer may be spelled either way (it prefers "Positive");
- calibrate (Zhao et al. 2021, "Calibrate before use"): the same prompts with content-free inputs ("N/A", "",
  "[MASK]") measure the bias per label, which is subtracted from every input's scores (a division in probability
  space); the bias depends only on the labels and options, so it is cached across requests;
- average over label orders: the instruction lists the labels in `permutations` different orders;
- accept few-shot `examples` (prior user/assistant turns) and label descriptions, which anchor what labels mean.
On tests/support/data/classify_eval.jsonl (40 clear-cut items, SmolLM2-135M) naive scoring gets 38% right and the
defaults 88% (see tools/eval_classify.py).
Probabilities are a softmax over labels of the corrected scores. With `multi_label` each label is instead asked as
an independent yes/no question and its probability is P(yes) / (P(yes) + P(no)), calibrated the same way.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

from server.engine import InvalidRequestError, TokenUsage, gather_all
from server.tasks.common import MAX_IN_FLIGHT, Generate, score_prompt

CONTENT_FREE = ("N/A", "", "[MASK]")
BIAS_CACHE_SIZE = 256
MULTI_LABEL_THRESHOLD = 0.5  # multi-label: a label applies when its probability is at least this
SYSTEM = "You are a text classifier. Answer with the category only."
SINGLE = "Classify the text into one of these categories: {labels}.{descriptions}\n\nText: {text}\n\nCategory:"
MULTI = "Does the following text belong to the category \"{label}\"?{description} Answer yes or no.\n\nText: {text}"


@dataclass
class ClassifyOptions:
    multi_label: bool = False
    examples: list[tuple[str, str]] = field(default_factory=list)  # (text, label)
    descriptions: dict[str, str] = field(default_factory=dict)
    calibrate: bool = True
    permutations: int | None = None  # None: the classifier's default
    end_marker: bool = False  # also score the end-of-turn token after the label (measured: hurts on the default model)
    surface_forms: bool = True  # also score the label capitalized / lower-cased, and add up their probabilities


@dataclass
class Classification:
    label: str
    scores: dict[str, float]
    labels: list[str] | None = None  # multi_label: every label with probability >= MULTI_LABEL_THRESHOLD


def label_orders(labels: list[str], k: int) -> list[list[str]]:
    """Up to k distinct orders: as given, reversed, then rotations (each label moves off the first place)."""
    candidates = [labels, labels[::-1]]
    for shift in range(1, len(labels)):
        rotated = labels[shift:] + labels[:shift]
        candidates += [rotated, rotated[::-1]]
    orders: list[list[str]] = []
    for order in candidates:
        if order not in orders:
            orders.append(order)
    return orders[:max(k, 1)]


def surface_forms(answer: str, enabled: bool = True) -> list[str]:
    """The answer as given, capitalized and lower-case: a model may prefer "Positive" where we ask for "positive"."""
    if not enabled:
        return [answer]
    forms = [answer, answer[:1].upper() + answer[1:], answer.lower()]
    return list(dict.fromkeys(forms))


def logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def softmax(scores: list[float]) -> list[float]:
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def check_labels(labels: list[str], opts: ClassifyOptions) -> None:
    if len(set(labels)) != len(labels) or any(not lab.strip() for lab in labels):
        raise InvalidRequestError("labels must be distinct, non-empty strings", "labels")
    if not opts.multi_label and len(labels) < 2:
        raise InvalidRequestError("single-label classification needs at least two labels", "labels")
    for _, label in opts.examples:
        if label not in labels:
            raise InvalidRequestError(f"example label {label!r} is not one of the labels", "examples")


def decide(labels: list[str], corrected: list[float], multi_label: bool) -> Classification:
    """Probabilities from calibrated scores: a softmax over the labels, or with `multi_label` a sigmoid of each
    label's log-odds; the most likely label, and with `multi_label` every label at least MULTI_LABEL_THRESHOLD."""
    if multi_label:
        probs = [1.0 / (1.0 + math.exp(-max(min(s, 50.0), -50.0))) for s in corrected]
    else:
        probs = softmax(corrected)
    scores = {lab: round(p, 6) for lab, p in zip(labels, probs)}
    best = labels[max(range(len(labels)), key=probs.__getitem__)]
    chosen = [lab for lab, p in scores.items() if p >= MULTI_LABEL_THRESHOLD] if multi_label else None
    return Classification(label=best, scores=scores, labels=chosen)


def head_classification(row: list[float], model_labels: list[str], wanted: list[str],
                        multi_label: bool) -> Classification:
    """A fine-tuned classifier head's answer for one input, from its probabilities `row` over `model_labels`:
    restricted to `wanted` (a subset; renormalized to sum to 1, unless the head is multi-label and each
    probability stands alone), the most likely label, and with `multi_label` every label at least
    MULTI_LABEL_THRESHOLD."""
    probs = {label: row[model_labels.index(label)] for label in wanted}
    if not multi_label and len(wanted) < len(model_labels):
        total = sum(probs.values()) or 1.0
        probs = {label: p / total for label, p in probs.items()}
    best = max(wanted, key=probs.__getitem__)
    chosen = [label for label in wanted if probs[label] >= MULTI_LABEL_THRESHOLD] if multi_label else None
    return Classification(label=best, scores=probs, labels=chosen)


class Classifier:
    def __init__(self, generate: Generate, tokenizer, max_model_len: int, permutations: int = 2):
        self.generate, self.tok, self.max_model_len = generate, tokenizer, max_model_len
        self.permutations = permutations  # label orders averaged when the options do not say
        self.end = self._end_of_turn()
        self._bias: OrderedDict[tuple, dict[str, float]] = OrderedDict()  # calibration per labels + options

    def _end_of_turn(self) -> str:
        """What the chat template puts after a message's content (e.g. `<|im_end|>`), found by rendering one."""
        if not self.tok.has_chat_template:
            return ""
        marker = "\u2063classify-probe\u2063"
        rendered = self.tok.render_chat([{"role": "user", "content": marker}], add_generation_prompt=False)
        after = rendered.split(marker, 1)[-1] if marker in rendered else ""
        return after.strip().split("\n")[0].strip()

    # -- prompts --------------------------------------------------------------------------------------------
    def _instruction(self, text: str, order: list[str], label: str | None, opts: ClassifyOptions) -> str:
        if label is not None:  # multi-label yes/no question
            desc = opts.descriptions.get(label)
            return MULTI.format(label=label, description=f" ({desc})" if desc else "", text=text)
        descriptions = "".join(f"\n- {lab}: {opts.descriptions[lab]}" for lab in order if opts.descriptions.get(lab))
        return SINGLE.format(labels=", ".join(order), descriptions=descriptions, text=text)

    def _context(self, text: str, order: list[str], label: str | None, opts: ClassifyOptions) -> str:
        """The rendered conversation up to where the assistant's answer starts."""
        if not self.tok.has_chat_template:
            shots = "".join(f"{self._instruction(t, order, label, opts)} {a}\n\n" for t, a in opts.examples)
            return shots + self._instruction(text, order, label, opts) + " "
        messages = [{"role": "system", "content": SYSTEM}]
        for example_text, example_label in opts.examples:
            answer = example_label if label is None else ("yes" if example_label == label else "no")
            messages += [{"role": "user", "content": self._instruction(example_text, order, label, opts)},
                         {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": self._instruction(text, order, label, opts)})
        return self.tok.render_chat(messages)

    def _scored_prompt(self, context: str, answer: str, opts: ClassifyOptions) -> tuple[list[int], int]:
        """Token ids of context + answer, and where the answer's tokens start."""
        base = self.tok.encode(context, add_special_tokens=False)
        full = self.tok.encode(context + answer + (self.end if opts.end_marker else ""), add_special_tokens=False)
        start = 0
        while start < min(len(base), len(full)) and base[start] == full[start]:
            start += 1
        if len(full) >= self.max_model_len:
            raise InvalidRequestError(f"This model's maximum context length is {self.max_model_len} tokens, but a "
                                      f"classification prompt has {len(full)} tokens; shorten the input", "input")
        return full, max(start, 1)

    async def _score(self, context: str, answer: str, opts: ClassifyOptions, usage: TokenUsage,
                     deadline: float | None) -> float:
        """Mean log-probability per token of `answer` (plus end marker) after `context`: length-normalized."""
        ids, start = self._scored_prompt(context, answer, opts)
        logprobs = await score_prompt(self.generate, ids, usage, start, deadline)
        values = [lp.logprob for lp in logprobs[start:] if lp is not None]
        return sum(values) / len(values) if values else -1e9

    # -- classification -------------------------------------------------------------------------------------
    async def classify(self, texts: list[str], labels: list[str], opts: ClassifyOptions | None = None,
                       deadline: float | None = None) -> tuple[list[Classification], TokenUsage]:
        """Every scoring request shares `deadline` (time.monotonic()); the first to miss it fails the whole call."""
        opts = opts or ClassifyOptions()
        check_labels(labels, opts)
        usage = TokenUsage()
        orders = [labels] if opts.multi_label else label_orders(labels, opts.permutations or self.permutations)
        bias_key = (tuple(labels), tuple(map(tuple, orders)), opts.multi_label, tuple(opts.examples),
                    tuple(sorted(opts.descriptions.items())), opts.surface_forms, opts.end_marker)
        cached_bias = self._bias.get(bias_key) if opts.calibrate else None
        inputs = list(texts) + (list(CONTENT_FREE) if opts.calibrate and cached_bias is None else [])
        score = await self._label_scores(inputs, labels, orders, opts, usage, deadline)
        if cached_bias is not None:
            bias = cached_bias
            self._bias.move_to_end(bias_key)
        elif opts.calibrate:  # from the content-free inputs, scored after the texts
            cf = range(len(texts), len(inputs))
            bias = self._bias[bias_key] = {lab: sum(score[(c, lab)] for c in cf) / len(cf) for lab in labels}
            while len(self._bias) > BIAS_CACHE_SIZE:
                self._bias.popitem(last=False)
        else:
            bias = dict.fromkeys(labels, 0.0)
        results = [decide(labels, [score[(i, lab)] - bias[lab] for lab in labels], opts.multi_label)
                   for i in range(len(texts))]
        return results, usage

    async def _label_scores(self, inputs: list[str], labels: list[str], orders: list[list[str]],
                            opts: ClassifyOptions, usage: TokenUsage,
                            deadline: float | None) -> dict[tuple[int, str], float]:
        """(input, label) -> the label's score for that input: the log-likelihood of answering with it (multi-label:
        the log-odds of yes over no), its surface forms' probabilities added up, averaged over label orders."""
        answers = [(lab, a) for lab in labels for a in ("yes", "no")] if opts.multi_label \
            else [(lab, lab) for lab in labels]
        jobs = [(i, key, o, form) for i in range(len(inputs)) for o in range(len(orders)) for key in answers
                for form in surface_forms(key[1], opts.surface_forms)]
        contexts: dict[tuple[int, int, str], str] = {}
        coros = []
        for i, (lab, _), o, form in jobs:
            ctx_key = (i, o, lab if opts.multi_label else "")
            if ctx_key not in contexts:
                contexts[ctx_key] = self._context(inputs[i], orders[o], lab if opts.multi_label else None, opts)
            coros.append(self._score(contexts[ctx_key], form, opts, usage, deadline))
        values = await gather_all(coros, MAX_IN_FLIGHT)
        forms: dict[tuple, list[float]] = {}  # (input, answer, order) -> score per surface form
        for (i, key, o, _), v in zip(jobs, values):
            forms.setdefault((i, key, o), []).append(v)
        per_order: dict[tuple, list[float]] = {}  # (input, answer) -> score per label order
        for (i, key, _), v in forms.items():
            per_order.setdefault((i, key), []).append(logsumexp(v))
        answer_score = {k: sum(v) / len(v) for k, v in per_order.items()}
        if opts.multi_label:
            return {(i, lab): answer_score[(i, (lab, "yes"))] - answer_score[(i, (lab, "no"))]
                    for i in range(len(inputs)) for lab in labels}
        return {(i, lab): answer_score[(i, (lab, lab))] for i in range(len(inputs)) for lab in labels}
