"""Engine configuration: KV cache size, batching limits and speculative decoding."""
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class EngineSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOOM_", extra="ignore")

    block_size: int = Field(16, ge=1, le=256, description="tokens per KV-cache block")
    kv_cache_memory: float | None = Field(None, gt=0, description="GiB of KV cache on CPU; None: sized from the model "
                                                                "(max_num_seqs full contexts, capped by the fraction)")
    kv_cache_memory_fraction: float = Field(0.1, gt=0, le=0.9, description="CPU: the most of the machine's (or the "
                                                                          "cgroup's) memory a model-sized KV cache takes")
    kv_cache_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="KV cache element type: auto = the model's dtype, but float16 for quantized models "
                            "computing in float32 on CPU (half the bytes to keep and read each step)")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="fraction of GPU memory Loom may use")
    num_kv_blocks: int | None = Field(None, ge=1, description="exact number of KV blocks (overrides the budgets)")
    max_num_seqs: int = Field(64, ge=1, description="most sequences in one step")
    max_num_batched_tokens: int | None = Field(None, ge=1, description="most tokens in one step (prefill chunk "
                                                                       "budget); None: 1024 on CPU, 2048 on GPU")
    max_prefill_chunk: int | None = Field(None, ge=1, description="most prompt tokens of one sequence per step; "
                                                                  "None: 256 on CPU, the whole step budget on GPU")
    max_model_len: int | None = Field(None, ge=1, description="context window; defaults to the model's")
    max_waiting: int = Field(1024, ge=0, description="waiting sequences beyond which new requests are refused (429); "
                                                     "0: no cap")
    max_waiting_tokens: int = Field(0, ge=0, description="prompt tokens not yet prefilled beyond which new requests "
                                                         "are refused (429); 0: no cap")
    priority_step_seconds: float = Field(10.0, gt=0, description="waiting time one priority level is worth: lower "
                                                                 "priorities go first, none starves")
    encoder_batch_tokens: int = Field(1024, ge=1, description="most real tokens in one encoder batch (embeddings, "
                                                               "classifier heads); while streams decode, a batch "
                                                               "is also held to about one decode step's time")
    enable_prefix_caching: bool = True
    seed: int | None = Field(None, description="seed of the engine's sampler for unseeded requests")
    grammar_compile_timeout: float = Field(10.0, gt=0, description="seconds a grammar (JSON schema, regex, tools) "
                                                                   "may compile before it is stopped (400), and a "
                                                                   "request may wait for a compile worker (503)")
    grammar_compile_workers: int = Field(2, ge=1, description="grammar compile processes (each compiles one grammar "
                                                              "at a time)")
    grammar_compile_queue: int = Field(64, ge=1, description="new grammars waiting for a compile worker beyond which "
                                                            "requests get 503 grammar_compiler_busy")
    grammar_cache_size: int = Field(256, ge=1, description="distinct compiled grammars kept (LRU)")
    grammar_warmup: bool = Field(True, description="start the compile processes once the server is ready, so "
                                                   "the first structured request does not wait for them")
    cuda_graphs: bool = Field(True, description="capture decode steps in CUDA graphs on GPU")
    enable_lora: bool = Field(False, description="serve LoRA adapters (implied by --lora): slots for --max-loras "
                                                 "adapters beside every q/k/v/o and gate/up/down projection")
    max_loras: int = Field(4, ge=1, le=64, description="most distinct LoRA adapters in one step; requests of further "
                                                       "adapters wait for a slot")
    max_lora_rank: int = Field(16, ge=1, le=256, description="largest LoRA rank an adapter may have")
    speculative: Literal["auto", "ngram", "none"] = Field(
        "auto", description="speculative decoding from n-grams of the prompt and output: auto = where it pays on this "
                            "machine and batch size (measured) and per request while its drafts are accepted; "
                            "ngram = whenever a draft is found; none = off")
    num_speculative_tokens: int = Field(5, ge=1, le=16, description="most draft tokens verified per sequence and step")
    ngram_min: int = Field(2, ge=1, le=16, description="shortest suffix n-gram looked up for a draft")
    ngram_max: int = Field(4, ge=1, le=16, description="longest suffix n-gram looked up for a draft (tried first)")

    @model_validator(mode="after")
    def _ngram_range(self) -> "EngineSettings":
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min ({self.ngram_min}) must not exceed ngram_max ({self.ngram_max})")
        return self
