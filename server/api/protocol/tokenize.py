"""POST /tokenize and /detokenize (vLLM's shapes)."""
from __future__ import annotations

from typing import Any

from pydantic import Field, StrictBool, StrictInt, model_validator

from server.api.protocol.chat import ChatMessage
from server.api.protocol.common import Body


class TokenizeRequest(Body):
    model: str | None = None
    prompt: str | None = Field(None, description="text to tokenize (or `messages`)")
    messages: list[ChatMessage] | None = Field(None, description="a conversation, rendered with the chat template")
    add_special_tokens: StrictBool = Field(True, description="for `prompt`: add the tokenizer's special tokens (BOS...)")
    add_generation_prompt: StrictBool = Field(True, description="for `messages`: end with the assistant's turn opening")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="for `messages`: the template's variables")

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` and `messages`")
        return self


class TokenizeResponse(Body):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[StrictInt] = Field(..., description="token ids")


class DetokenizeResponse(Body):
    prompt: str
