"""Model-layer configuration: which checkpoint, on what device, in what dtype."""
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ModelSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOOM_", extra="ignore", protected_namespaces=())

    model: str = Field("default", description="HF directory, GGUF file, 'default', or 'dummy:<preset|config.json>'")
    served_model_name: str | None = Field(None, description="name clients use; defaults to the model's own")
    dtype: str = Field("auto", pattern="^(auto|float32|bfloat16|float16)$")
    quantization: str = Field("auto", pattern="^(auto|gguf|q4|q8|none)$",
                              description="CPU weights: 'auto' runs a GGUF's own blocks (unless dtype is float32) and "
                                          "leaves safetensors as they are; 'q4'/'q8' quantize at load; 'none'")
    kernel_calibration: bool = Field(True, description="measure the fastest kernel per linear and batch size at load "
                                                        "(cached per CPU); off: a fixed heuristic")
    linear_kernels: str = Field("auto", pattern="^(auto|quantized)$",
                                description="'auto': the measured fastest per batch size (may keep a dense bf16/fp32 "
                                            "copy for large batches); 'quantized': 4/8-bit forms only (least memory)")
    weight_memory: float = Field(1.3, ge=1.0, description="quantized linears hold at most this multiple of their "
                                                           "stored bytes; more lets calibration keep dense copies "
                                                           "for large batches")
    activations: str = Field("auto", pattern="^(auto|float|int8)$",
                             description="'int8': linears over GGUF blocks may quantize their input to int8 (per 32 "
                                         "or 256 values, llama.cpp's CPU dot products) where calibration measures "
                                         "it faster; 'auto': the same in decode-only steps on CPUs without native "
                                         "bf16, prompts in float; 'float': activations stay float32/bfloat16")
    cpu_isa: str = Field("auto", pattern="^(auto|avx2)$",
                         description="'avx2': take the AVX2-only kernel and dtype choices on any CPU (testing the "
                                     "path other CPUs take; pair with ATEN_CPU_CAPABILITY=avx2)")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda[:N]'")
    cache_dir: Path = Field(Path("~/.cache/loom").expanduser(),
                            description="tokenizers read from GGUFs, kernel plans, q4/q8 quantizations")
    dummy_seed: int = Field(0, description="seed of the random weights of `dummy:` models")
    embedding_model: str = Field("none", description="encoder served beside the generator for /v1/embeddings, "
                                                    "/v1/rerank, /v1/score: 'default' (all-MiniLM-L6-v2), a Hugging "
                                                    "Face directory (BERT family), or 'none'")
    classifier_model: str | None = Field(None, description="a *ForSequenceClassification directory (BERT family): "
                                                           "/v1/classify answers from its head")
    encoder_dtype: str = Field("auto", pattern="^(auto|float32|bfloat16)$",
                               description="encoders' dtype: 'auto' = bfloat16 where the CPU has it in hardware")
