"""A free TCP port on loopback (its own module: the fake OpenAI server imports it without pulling in torch)."""
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
