"""Model layer: tensors and weights, no requests. Takes a `FlatBatch` and a `KVCache`, returns hidden states/logits."""
from server.model.batch import FlatBatch, KVCache
from server.model.config import ModelConfig, UnsupportedModelError
from server.model.encoder_loader import EncoderNotFoundError, LoadedEncoder, load_encoder
from server.model.loader import LoadedModel, ModelNotFoundError, load_model
from server.model.settings import ModelSettings
from server.model.tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = [
           "EncoderNotFoundError",
           "FlatBatch",
           "IncrementalDetokenizer",
           "KVCache",
           "LoadedEncoder",
           "LoadedModel",
           "ModelConfig",
           "ModelNotFoundError",
           "ModelSettings",
           "Tokenizer",
           "UnsupportedModelError",
           "load_encoder",
           "load_model",
]
