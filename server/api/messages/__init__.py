"""Anthropic's Messages API on top of the chat pipeline: its error shape (`errors`), the translation of a Messages
request into the internal chat request and of the answer back into content blocks (`convert`), and the streamed
event sequence (`events`). The route is server/api/routes/messages.py."""
