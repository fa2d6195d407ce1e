"""HTTP routes, one module per endpoint family."""
from server.api.protocol import ErrorResponse

ERROR_RESPONSES = {
    400: {"model": ErrorResponse, "description": "malformed JSON, schema violation or a parameter out of range"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key (only when the server has one)"},
    404: {"model": ErrorResponse, "description": "unknown model"},
    413: {"model": ErrorResponse, "description": "request body over the size limit"},
    429: {"model": ErrorResponse, "description": "the waiting queue is full; see Retry-After"},
    500: {"model": ErrorResponse, "description": "internal error"},
    503: {"model": ErrorResponse, "description": "the model is loading, the engine stopped, or the server is draining"},
    504: {"model": ErrorResponse, "description": "the request's timeout passed (code `request_timeout`)"},
}

STREAMING_200 = {200: {"description": "the JSON response, or with `stream: true` server-sent events "
                                      "(`data: {chunk}` lines, then `data: [DONE]`)",
                       "content": {"text/event-stream": {"schema": {
                           "type": "object", "required": ["data"],
                           "properties": {"data": {"type": "string", "description": "a JSON chunk, or [DONE]"},
                                          "event": {"type": "string"}, "id": {"type": "string"}}}}}}}
