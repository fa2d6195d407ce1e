"""A lean HTTP/1.1 keep-alive client for closed-loop load generators: one connection per simulated client, the
request bytes written in one call, the response read by its Content-Length, nothing parsed beyond the status line
and headers. On a 2-core machine the load generator shares the CPU with the server it measures; httpx spends about
7.7 ms of CPU per request at 64 connections there, this 0.07 ms (BENCHMARKS.md, 2026-12-05), so what is
measured is the server. For JSON bodies with Content-Length only: no chunked responses, no TLS, no redirects."""
from __future__ import annotations

import asyncio
from urllib.parse import urlparse


class RawConnection:
    def __init__(self, base_url: str):
        url = urlparse(base_url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self._host_header = f"{self.host}:{self.port}".encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: bytes, headers: bytes = b"") -> tuple[int, bytes]:
        """POST a JSON `body`; (status, response body). `headers`: extra header lines, each ending in CRLF."""
        if self._writer is None:
            await self._connect()
        self._writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                           b"%s\r\n%s" % (path.encode(), self._host_header, len(body), headers, body))
        head = await self._reader.readuntil(b"\r\n\r\n")
        status, length, close = int(head[9:12]), None, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
            elif name == b"transfer-encoding":
                raise ValueError("chunked responses are not supported by this client")
        if length is None:
            raise ValueError("the response has no Content-Length")
        data = await self._reader.readexactly(length)
        if close:
            await self.close()
        return status, data

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
        self._reader = self._writer = None
