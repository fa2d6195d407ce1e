"""OpenAI's Responses API on top of the chat pipeline: the translation of a Responses request into the internal chat
request (`convert`), output items and the streamed event sequence (`events`), and the bounded in-memory store behind
`previous_response_id` and GET/DELETE (`store`). The route is server/api/routes/responses.py."""
