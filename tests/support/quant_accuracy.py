"""Accuracy of the quantized CPU path against the de-quantized float32 model of the same weights: teacher-forced
top-1 agreement on greedy continuations, and perplexity of a fixed English text, both through the engine's prompt
logprobs (`max_tokens=0`, as a user measures it). `python -m tests.support.quant_accuracy` runs the full-size check
(32 prompts x 64 tokens); tests/model/test_quant.py runs a smaller one."""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from server.engine import EngineCore, EngineSettings, SamplingParams
from server.engine.offline import generate

TEXT = Path(__file__).parent / "data" / "english.txt"
TOPICS = ["the capital of France", "hash tables", "better sleep", "autumn leaves", "the water cycle", "black holes",
          "how bread rises", "the French revolution", "photosynthesis", "learning a new language", "chess openings",
          "the history of the loom", "sorting algorithms", "volcanoes", "healthy breakfasts", "the moon landing",
          "why the sky is blue", "saving money", "the Roman empire", "how vaccines work", "writing a cover letter",
          "jazz music", "the rules of football", "climate change", "the printing press", "honey bees",
          "electric cars", "the human heart", "ocean tides", "public speaking", "the internet", "mountain hiking"]


def chat_prompts(lm, n: int) -> list[list[int]]:
    tok = lm.tokenizer
    return [tok.encode_chat([{"role": "user", "content": f"Tell me about {t}."}]) for t in TOPICS[:n]]


def engine(lm) -> EngineCore:
    return EngineCore(lm, EngineSettings(kv_cache_memory=0.25))


def greedy(lm, prompts: list[list[int]], n_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True)
    return [r[0].token_ids for r in generate(engine(lm), prompts, params)]


def prompt_top1(lm, sequences: list[list[int]]) -> list[list[tuple[int, float]]]:
    """Per sequence, for every token after the first: (the model's top-1 token, the logprob of the actual token)."""
    params = SamplingParams(max_tokens=0, prompt_logprobs=1)
    out = generate(engine(lm), sequences, params)
    return [[(lp.top[0][0], lp.logprob) for lp in r[0].prompt_logprobs[1:]] for r in out]


def agreement(conts: list[list[int]], lm, prompts: list[list[int]]) -> float:
    """Fraction of the reference's greedy continuations `conts` whose tokens `lm` also ranks first, fed the same
    prefix."""
    tops = prompt_top1(lm, [p + c for p, c in zip(prompts, conts)])
    hits = total = 0
    for p, c, top in zip(prompts, conts, tops):
        predicted = [t for t, _ in top[len(p) - 1:]]  # the prediction of token i comes from position i - 1
        hits += sum(a == b for a, b in zip(predicted, c))
        total += len(c)
    return hits / total


def perplexity(lm, ids: list[int]) -> float:
    (row,) = prompt_top1(lm, [ids])
    return math.exp(-sum(lp for _, lp in row) / len(row))


@dataclass
class Reference:
    """The float32 model's side of the check, computed once for every model scored against it."""
    prompts: list[list[int]]
    continuations: list[list[int]]
    text_ids: list[int]
    perplexity: float

    @classmethod
    def of(cls, ref_lm, n_prompts: int, n_tokens: int, text_tokens: int | None = None) -> "Reference":
        prompts = chat_prompts(ref_lm, n_prompts)
        ids = ref_lm.tokenizer.encode(TEXT.read_text())[:text_tokens]
        return cls(prompts, greedy(ref_lm, prompts, n_tokens), ids, perplexity(ref_lm, ids))

    def score(self, lm) -> tuple[float, float]:
        """`lm`'s top-1 agreement with the reference's greedy tokens, and its perplexity as a multiple of the
        reference's."""
        return agreement(self.continuations, lm, self.prompts), perplexity(lm, self.text_ids) / self.perplexity


@contextlib.contextmanager
def every_linear_on(lm, backend: str, decode: str | None = None):
    """Every linear (the head too) run by `backend` at every M, and in decode-only steps by `decode` (default
    `backend`), where it has that form (the GGUF-block kinds share one GGUFBlocks; `gguf_q8k` runs only K-quant
    weights, the others take `gguf_q8`); restored after."""
    from loom_kernels.quant import Q8K_TYPES
    from server.model.weights.quant import QuantLinear
    saved = {m: (m.forms, m.plan, m.decode_plan) for m in lm.model.modules() if isinstance(m, QuantLinear)}

    def kind_for(form, wanted: str) -> str:
        if wanted == "gguf_q8k" and any(qtype not in Q8K_TYPES for qtype in form.qtypes):
            return "gguf_q8"
        return wanted
    for mod, (forms, *_) in saved.items():
        form = forms.get(backend) or (next(f for b, f in forms.items() if b.startswith("gguf"))
                                      if backend.startswith("gguf") else None)
        if form is not None:
            kinds = (kind_for(form, backend), kind_for(form, decode or backend))
            mod.forms = dict.fromkeys(kinds, form)
            mod.plan, mod.decode_plan = [(1 << 30, kinds[0])], [(1 << 30, kinds[1])]
    try:
        yield lm
    finally:
        for mod, (forms, plan, decode_plan) in saved.items():
            mod.forms, mod.plan, mod.decode_plan = forms, plan, decode_plan


def main(argv: list[str]) -> None:
    """`[--model PATH] [dtype ...]`: the GGUF's blocks as Loom runs them against the same file de-quantized to
    float32 (default: the default model; e.g. a Q4_K_M re-quantization made by loadtests/make_gguf.py). `int8`:
    every linear (the head too, as served) on its blocks against int8 activations per 32 values (gguf_q8); `int8k`:
    the K-quant ones against int8 activations per 256 values (gguf_q8k, what `--activations int8` runs prompts on)."""
    from server.model import ModelSettings, load_model
    model = "default"
    if argv[:1] == ["--model"]:
        model, argv = argv[1], argv[2:]
    ref_lm = load_model(ModelSettings(model=model, dtype="float32", quantization="none"), progress=False)
    ref = Reference.of(ref_lm, 32, 64)
    print(f"{model}: text {len(ref.text_ids)} tokens; float32 de-quantized perplexity {ref.perplexity:.4f}")
    for mode in argv or ["auto", "float32"]:
        dtype = "float32" if mode.startswith("int8") else mode
        lm = load_model(ModelSettings(model=model, dtype=dtype, quantization="gguf"), progress=False)
        started = time.perf_counter()
        backend = {"int8": "gguf_q8", "int8k": "gguf_q8k"}.get(mode)
        with every_linear_on(lm, backend) if backend else contextlib.nullcontext():
            agree, ratio = ref.score(lm)
        acts = mode if backend else lm.dtype
        print(f"quantized ({lm.quantization}, activations {acts}): top-1 agreement {agree:.4f} over 32 x 64; "
              f"perplexity {ratio * ref.perplexity:.4f} ({100 * (ratio - 1):+.2f}%) "
              f"[{time.perf_counter() - started:.0f} s]")


if __name__ == "__main__":
    main(sys.argv[1:])
