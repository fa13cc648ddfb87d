"""A fault-injecting HTTP proxy for tests: put it in front of an S3 endpoint (the moto server).

On a seeded share of requests it answers `503 SlowDown` (a real S3 XML error body), resets the
connection (before forwarding, or after half of the upstream's answer was sent), or delays the request
before forwarding it. It injects at most `max_faults` faults and counts them by kind; it listens on
127.0.0.1 (a free port) in a background thread with its own event loop, so other processes (Ray
workers) reach it through `AWS_ENDPOINT_URL`.

`force` lists `(pattern, kind, times)` entries: the first `times` requests whose `"METHOD target"`
matches a pattern always get that fault (within `max_faults`), so a test can be sure that reads, writes,
listings and commits each met one, or that one object meets a burst longer than the storage client's
own retries. `kind` may also be `reset-before` or `reset-mid` to choose when a reset happens.

Each client request is forwarded on a fresh upstream connection (`Connection: close`) and the whole
answer is read before it is relayed, which keeps the proxy small: no streaming, no pipelining.

Example:
    with FaultProxy("http://127.0.0.1:5000", rate=0.25, max_faults=40, seed=1) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        ...
    print(proxy.injected)  # {"slowdown": 5, "reset": 4, "delay": 6}
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
import struct
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import urlsplit

__all__ = ["FaultProxy", "InjectedFault", "KINDS", "request_category"]

KINDS = ("slowdown", "reset", "delay")

_SLOWDOWN_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    "<RequestId>{rid}</RequestId><HostId>faultproxy</HostId></Error>"
)


@dataclass(slots=True, frozen=True)
class InjectedFault:
    """One fault: its kind, the request's category (see :func:`request_category`) and request line."""

    kind: str
    category: str
    method: str
    target: str
    detail: str = ""


def request_category(method: str, target: str) -> str:
    """`list`, `read`, `write`, `commit` (a Parquet part), `head` or `other`, from an S3 request line."""
    path, _, query = target.partition("?")
    if method == "GET" and ("list-type=" in query or path.count("/") <= 1):
        return "list"
    if method == "PUT" and path.endswith(".parquet"):
        return "commit"
    if method == "PUT":
        return "write"
    if method == "GET":
        return "read"
    if method == "HEAD":
        return "head"
    return "other"


@dataclass
class _Request:
    method: str
    target: str
    head: bytes  # request line + headers, as forwarded upstream
    body: bytes
    category: str = field(init=False)

    def __post_init__(self) -> None:
        self.category = request_category(self.method, self.target)


class FaultProxy:
    """The proxy; start it with `with FaultProxy(...) as p:` or :meth:`start` / :meth:`stop`.

    Args:
        upstream: The real endpoint, `http://host:port`.
        rate: The share of requests that get a random fault (while `max_faults` lasts).
        max_faults: The most faults injected in all (random and forced).
        seed: Seeds the choice of requests and kinds.
        kinds: The kinds random faults are drawn from.
        delay: (min, max) seconds a `delay` fault waits before forwarding.
        force: `(regex, kind, times)`; the first `times` requests whose "METHOD target" matches get it.
    """

    def __init__(
        self,
        upstream: str,
        *,
        rate: float = 0.25,
        max_faults: int = 40,
        seed: int = 0,
        kinds: tuple[str, ...] = KINDS,
        delay: tuple[float, float] = (0.2, 1.0),
        force: list[tuple[str, str, int]] | None = None,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"The parameter 'upstream' expected http://host:port, but got '{upstream}' instead.")
        unknown = (set(kinds) | {kind for _, kind, _ in force or []}) - set(KINDS) - {"reset-before", "reset-mid"}
        if unknown:
            raise ValueError(f"The fault kinds expected {KINDS}, but got {sorted(unknown)} instead.")
        self.upstream = (parts.hostname, parts.port)
        self.rate = rate
        self.max_faults = max_faults
        self.kinds = kinds
        self.delay = delay
        self.force = [(re.compile(p), kind) for p, kind, _ in force or []]
        self._left = [times for _, _, times in force or []]
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.faults: list[InjectedFault] = []
        self.requests: Counter[str] = Counter()  # by category, all requests seen
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._startup_error: BaseException | None = None

    # ----------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def injected(self) -> dict[str, int]:
        """Faults injected so far, by kind (every kind listed, zeros included)."""
        with self._lock:
            counts = Counter(f.kind for f in self.faults)
        return {k: counts.get(k, 0) for k in KINDS}

    def injected_by_category(self) -> dict[str, dict[str, int]]:
        """Faults injected so far: category → kind → count."""
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            for f in self.faults:
                out.setdefault(f.category, {}).setdefault(f.kind, 0)
                out[f.category][f.kind] += 1
        return out

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start within 10 s")
        if self._startup_error is not None:
            raise RuntimeError("fault proxy failed to start") from self._startup_error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:  # noqa: BLE001 - reported to start()
            self._startup_error = e
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        async with self._server:
            await self._stopped.wait()
            self._server.close()
            # Connections still open (a client's keep-alive pool) are dropped with the loop.
            for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                task.cancel()

    # ----------------------------------------------------------------- decisions

    def _decide(self, req: _Request) -> InjectedFault | None:
        """The fault for this request, if any (recorded); `detail` says forced/random and, for resets, when."""
        with self._lock:
            self.requests[req.category] += 1
            if len(self.faults) >= self.max_faults:
                return None
            line = f"{req.method} {req.target}"
            forced = next((i for i, (p, _) in enumerate(self.force) if self._left[i] and p.search(line)), None)
            if forced is not None:
                self._left[forced] -= 1
                kind, how = self.force[forced][1], "forced"
            elif self._rng.random() >= self.rate:
                return None
            else:
                kind, how = self._rng.choice(self.kinds), "random"
            if kind in ("reset-before", "reset-mid"):
                kind, how = "reset", how + (", before forwarding" if kind == "reset-before" else ", mid-response")
            elif kind == "reset":
                how += ", before forwarding" if self._rng.random() < 0.5 else ", mid-response"
            fault = InjectedFault(kind, req.category, req.method, req.target, how)
            self.faults.append(fault)
            return fault

    # ----------------------------------------------------------------- HTTP

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                req = await _read_request(reader, writer)
                if req is None:
                    break
                fault = self._decide(req)
                kind = fault.kind if fault else None
                if fault and kind == "reset" and fault.detail.endswith("before forwarding"):
                    _reset(writer)  # the server never sees the request
                    return
                if kind == "slowdown":
                    writer.write(_slowdown(req.method))
                    await writer.drain()
                    continue
                if kind == "delay":
                    await asyncio.sleep(self._rng.uniform(*self.delay))
                response = await self._forward(req)
                if kind == "reset":  # after the server acted: the client sees half an answer
                    writer.write(response[: max(1, len(response) // 2)])
                    await writer.drain()
                    _reset(writer)
                    return
                writer.write(response)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            if not writer.is_closing():
                writer.close()

    async def _forward(self, req: _Request) -> bytes:
        """Send the request upstream on a fresh connection; the whole answer, framed for keep-alive."""
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            up_writer.write(req.head + req.body)
            await up_writer.drain()
            raw = await up_reader.read()  # until the server closes (we asked for Connection: close)
        finally:
            up_writer.close()
        head, sep, body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = [h for h in lines[1:] if not h.lower().startswith((b"connection:", b"keep-alive:"))]
        names = {h.split(b":", 1)[0].strip().lower() for h in headers}
        if b"content-length" not in names and b"transfer-encoding" not in names and req.method != "HEAD":
            headers.append(b"Content-Length: %d" % len(body))
        return b"\r\n".join([lines[0], *headers]) + b"\r\n\r\n" + body


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Request | None:
    """One request from a keep-alive client connection (None at EOF); upstream gets `Connection: close`."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head[:-4].split(b"\r\n")
    method, target, _ = lines[0].decode("latin-1").split(" ", 2)
    headers: list[bytes] = []
    length, chunked, expect = 0, False, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        key = name.strip().lower()
        if key == b"content-length":
            length = int(value.strip())
        elif key == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif key == b"expect" and b"100-continue" in value.lower():
            expect = True
            continue
        if key in (b"connection", b"keep-alive"):
            continue
        headers.append(line)
    headers.append(b"Connection: close")
    if expect:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
    body = await (_read_chunked(reader) if chunked else reader.readexactly(length))
    return _Request(method, target, b"\r\n".join([lines[0], *headers]) + b"\r\n\r\n", body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """A chunked body, kept in its chunked framing (forwarded as is)."""
    out = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        out += size_line
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while True:  # trailers, up to the empty line
                line = await reader.readuntil(b"\r\n")
                out += line
                if line == b"\r\n":
                    return bytes(out)
        out += await reader.readexactly(size + 2)


def _slowdown(method: str) -> bytes:
    rid = uuid.uuid4().hex[:16].upper()
    body = b"" if method == "HEAD" else _SLOWDOWN_BODY.format(rid=rid).encode()
    head = (
        "HTTP/1.1 503 Slow Down\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"x-amz-request-id: {rid}\r\n"
        "Server: faultproxy\r\n\r\n"
    )
    return head.encode() + body


def _reset(writer: asyncio.StreamWriter) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0), not a polite FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()

