"""Tool-call formats, one module each, and the registry that picks one: by `--tool-call-parser`, else by the
markers of the chat template, else Hermes (also the format of the tools prompt for templates that cannot render
tools). See server/api/tools.py for what is common to all of them."""
from __future__ import annotations

from server.api.tool_formats import hermes, llama3, mistral, pythonic, qwen3_coder
from server.api.tool_formats.base import Event, Fmt, ToolPlan, new_call_id
from server.api.tool_formats.format import ToolFormat

# most specific first: Qwen3-Coder's template also writes <tool_call>, Llama 3.2's pythonic one also says ipython
FORMATS: dict[str, ToolFormat] = {f.name: f for f in (qwen3_coder.FORMAT, hermes.FORMAT, mistral.FORMAT,
                                                      pythonic.FORMAT, llama3.FORMAT)}
PARSERS: dict[str, Fmt] = {"hermes": "hermes", "llama3_json": "llama3", "qwen3_coder": "qwen3_coder",
                           "pythonic": "pythonic", "mistral": "mistral"}  # --tool-call-parser names


def detect_format(template: str) -> Fmt:
    """The format a chat template writes calls in (Hermes when it shows none)."""
    return next((f.name for f in FORMATS.values() if f.detect(template)), "hermes")


def dialect(fmt: Fmt, template: str) -> str:
    """The variant of `fmt` the template writes (see ToolPlan.dialect)."""
    return "args" if fmt == "mistral" and mistral.ARGS in template else ""


__all__ = ["FORMATS", "PARSERS", "Event", "ToolFormat", "ToolPlan", "detect_format", "dialect", "new_call_id"]
