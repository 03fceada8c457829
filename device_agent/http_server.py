"""The agent's local inference endpoint: the standard library's threading HTTP server over the engine.

    server = InferenceServer(engine, host="127.0.0.1", port=8700)   # port 0 picks a free port
    server.start(); server.url; server.stop()

Routes (errors are JSON `{"detail": message, "error": class name}` with the error's `http_status`):

    POST /v1/infer   Content-Type: application/json (the default; also for curl -d's form type)
                       {"inputs": {name: nested list}}
                       -> {"outputs": {name: nested list}, "bundle_id": ..., "latency_ms": ...}
                     Content-Type: application/x-npy, for a model with one input: the body is
                       `np.save` bytes -> `np.save` bytes of the first output
                     Content-Type: application/x-npz: `np.savez` of every input by name
                       -> `np.savez` of every output by name
                     Every answer carries X-Edgepack-Bundle (the bundle that answered, even during a
                     switch) and X-Edgepack-Latency-Ms (the engine's time, without HTTP and parsing).
    GET  /healthz    200 {"status": "ok", "bundle_id"} while a model is loaded, else 503
    GET  /v1/model   200 {"bundle_id", "name", "version", "runtime", "io"} (the manifest's io), else 503

Bodies need a Content-Length no larger than `max_body_bytes` (411 / 413 otherwise; a refused body
is not read and the connection is closed); npz members may not unpack to more than that either.
HTTP/1.1 keep-alive; one daemon thread per connection, so a stuck client cannot block shutdown.
TCP_NODELAY on the server side; a client that writes headers and body separately (http.client does)
should set it too, as urllib3/requests do, or each request waits out a delayed ACK.
Request arrays are read by a small .npy parser of our own (numeric dtypes, never pickle): numpy's
np.load is not safe from several threads on CPython 3.11 (see `_parse_npy`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from device_agent.inference import InferenceEngine, InferenceError, InvalidInput, NoActiveModel

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
NPY = "application/x-npy"
NPZ = "application/x-npz"
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"


class _RequestRefused(Exception):
    """An HTTP-level refusal (length, media type, route) with its status; not an engine error."""

    def __init__(self, status: int, message: str, *, close: bool = False, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        self.headers = headers or {}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], engine: InferenceEngine, max_body_bytes: int) -> None:
        super().__init__(address, _Handler)
        self.engine = engine
        self.max_body_bytes = max_body_bytes


class InferenceServer:
    """Serves `engine` over HTTP on `host:port` from a background thread."""

    def __init__(self, engine: InferenceEngine, *, host: str = "127.0.0.1", port: int = 8700,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.engine = engine
        self.host = host
        self.requested_port = port
        self.max_body_bytes = max_body_bytes
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the inference server is not started")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind and serve in a daemon thread; OSError (e.g. port in use) when the address cannot be bound."""
        if self._httpd is not None:
            return
        self._httpd = _Server((self.host, self.requested_port), self.engine, self.max_body_bytes)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"inference-http-{self.port}", daemon=True)
        self._thread.start()
        log.info("serving inference on %s", self.url)

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes; with Nagle on, the body waits for the client's delayed
    # ACK of the headers (40 ms on Linux) on a keep-alive connection.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        log.debug("%s %s", self.address_string(), format % args)

    # -- routes --------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/healthz":
                model = self.server.engine.model
                if model is None:
                    return self._send_json(503, {"status": "no model", "bundle_id": None})
                return self._send_json(200, {"status": "ok", "bundle_id": model.bundle_id})
            if path == "/v1/model":
                model = self.server.engine.model
                if model is None:
                    raise NoActiveModel("no model is active on this device yet")
                manifest = model.manifest
                return self._send_json(200, {"bundle_id": model.bundle_id, "name": manifest.name,
                                             "version": manifest.version, "runtime": model.runtime, "io": model.io()})
            if path == "/v1/infer":
                raise _RequestRefused(405, "use POST for /v1/infer", headers={"Allow": "POST"})
            raise _RequestRefused(404, f"no route {path}")
        except (InferenceError, _RequestRefused) as exc:
            self._send_error(exc)

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path != "/v1/infer":
                if path in ("/healthz", "/v1/model"):
                    raise _RequestRefused(405, f"use GET for {path}", headers={"Allow": "GET"}, close=True)
                raise _RequestRefused(404, f"no route {path}", close=True)
            media_type = (self.headers.get("Content-Type") or JSON).split(";", 1)[0].strip().lower()
            if media_type == FORM:  # what `curl -d` sends when told nothing else
                media_type = JSON
            if media_type not in (JSON, NPY, NPZ):
                raise _RequestRefused(415, f"Content-Type {media_type} is not served: use {JSON}, {NPY} or {NPZ}", close=True)
            body = self._read_body()
            if media_type == JSON:
                self._infer_json(body)
            elif media_type == NPY:
                self._infer_npy(body)
            else:
                self._infer_npz(body)
        except (InferenceError, _RequestRefused) as exc:
            self._send_error(exc)
        except Exception:  # a bug here must answer 500 and leave the server running
            log.exception("inference request failed unexpectedly")
            self._send_json(500, {"detail": "internal error in the agent (see its log)", "error": "InternalError"})

    def _infer_json(self, body: bytes) -> None:
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"body is not valid JSON: {exc}") from None
        if not isinstance(document, dict) or not isinstance(document.get("inputs"), dict):
            raise InvalidInput('body must be a JSON object {"inputs": {name: nested list}}')
        result = self.server.engine.infer_detailed(document["inputs"])
        self._send_json(200, {"outputs": {name: value.tolist() for name, value in result.outputs.items()},
                              "bundle_id": result.bundle_id, "latency_ms": round(result.latency_ms, 4)},
                        headers=_result_headers(result))

    def _infer_npy(self, body: bytes) -> None:
        model = self.server.engine.model
        if model is not None and len(model.inputs) != 1:
            raise InvalidInput(f"bundle {model.bundle_id[:12]} takes {len(model.inputs)} inputs "
                               f"{list(model.input_names)}: send them as {NPZ}")
        # A bare array: the engine feeds it to the only input of the model this request gets, so a
        # switch to a bundle with another input name between these lines cannot fail the request.
        result = self.server.engine.infer_detailed(_load_npy(body))
        first = next(iter(result.outputs.values()))
        self._send_bytes(200, NPY, _npy_bytes(first), headers=_result_headers(result))

    def _infer_npz(self, body: bytes) -> None:
        arrays = _load_npz(body, self.server.max_body_bytes)
        result = self.server.engine.infer_detailed(arrays)
        buffer = io.BytesIO()
        np.savez(buffer, **result.outputs)
        self._send_bytes(200, NPZ, buffer.getvalue(), headers=_result_headers(result))

    # -- plumbing ------------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise _RequestRefused(411, "chunked bodies are not accepted: send a Content-Length", close=True)
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise _RequestRefused(411, "a Content-Length is required", close=True)
        try:
            length = int(raw)
        except ValueError:
            raise _RequestRefused(400, f"bad Content-Length {raw!r}", close=True) from None
        if length < 0:
            raise _RequestRefused(400, f"bad Content-Length {raw!r}", close=True)
        if length > self.server.max_body_bytes:
            raise _RequestRefused(413, f"body of {length} bytes is larger than the {self.server.max_body_bytes} bytes "
                                       "this agent accepts", close=True)
        body = self.rfile.read(length)
        if len(body) != length:
            raise _RequestRefused(400, f"body ended after {len(body)} of {length} bytes", close=True)
        return body

    def _send_error(self, exc: InferenceError | _RequestRefused) -> None:
        if isinstance(exc, _RequestRefused):
            status, message, kind, close, headers = exc.status, exc.message, "RequestRefused", exc.close, exc.headers
        else:
            status, message, kind, close, headers = exc.http_status, exc.message, type(exc).__name__, False, {}
            if isinstance(exc, NoActiveModel):
                headers = {"Retry-After": "5"}
        if close:
            self.close_connection = True
            headers = {**headers, "Connection": "close"}
        self._send_json(status, {"detail": message, "error": kind}, headers=headers)

    def _send_json(self, status: int, document: dict, *, headers: dict[str, str] | None = None) -> None:
        self._send_bytes(status, JSON, json.dumps(document).encode(), headers=headers)

    def _send_bytes(self, status: int, content_type: str, body: bytes, *, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)


def _result_headers(result: Any) -> dict[str, str]:
    return {"X-Edgepack-Bundle": result.bundle_id, "X-Edgepack-Latency-Ms": f"{result.latency_ms:.4f}"}


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# .npy bodies are parsed here rather than by np.load: numpy reads the header with ast.literal_eval, and
# CPython 3.11's ast is not safe from several threads at once ("AST constructor recursion depth
# mismatch"), which this server's handler threads would hit. The header is the dict numpy.save
# writes: {'descr': '<f4', 'fortran_order': False, 'shape': (1, 3, 48, 192), }.
_NPY_MAGIC = b"\x93NUMPY"
_NPY_DESCR = re.compile(r"""['"]descr['"]\s*:\s*['"]([<>|=]?[biufc][0-9]{1,2})['"]""")
_NPY_FORTRAN = re.compile(r"""['"]fortran_order['"]\s*:\s*(True|False)""")
_NPY_SHAPE = re.compile(r"""['"]shape['"]\s*:\s*\(([0-9,\s]*)\)""")


def _parse_npy(data: bytes, what: str = "body") -> np.ndarray:
    """The array in .npy bytes (numeric dtypes only; never pickle), or InvalidInput saying what is wrong."""
    if not data.startswith(_NPY_MAGIC) or len(data) < 10:
        raise InvalidInput(f"{what} is not a .npy array (no \\x93NUMPY magic)")
    major = data[6]
    if major == 1:
        header_len, start = int.from_bytes(data[8:10], "little"), 10
    elif major in (2, 3):
        header_len, start = int.from_bytes(data[8:12], "little"), 12
    else:
        raise InvalidInput(f"{what}: .npy format version {major} is not supported")
    header = data[start:start + header_len].decode("utf-8" if major == 3 else "latin-1", errors="replace")
    descr, fortran, shape_text = _NPY_DESCR.search(header), _NPY_FORTRAN.search(header), _NPY_SHAPE.search(header)
    if descr is None or fortran is None or shape_text is None:
        raise InvalidInput(f"{what}: .npy header not understood (numeric arrays written by numpy.save are): {header.strip()[:120]!r}")
    try:
        dtype = np.dtype(descr.group(1))
        shape = tuple(int(d) for d in shape_text.group(1).replace(" ", "").split(",") if d)
    except TypeError as exc:
        raise InvalidInput(f"{what}: .npy dtype {descr.group(1)!r} not understood: {exc}") from None
    count = math.prod(shape)
    offset = start + header_len
    if len(data) - offset != count * dtype.itemsize:
        raise InvalidInput(f"{what}: .npy data has {len(data) - offset} bytes, its header announces "
                           f"{count * dtype.itemsize} ({list(shape)} of {dtype.name})")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    if fortran.group(1) == "True":
        return flat.reshape(shape[::-1]).transpose()
    return flat.reshape(shape)


def _load_npy(body: bytes) -> np.ndarray:
    return _parse_npy(body)


def _load_npz(body: bytes, max_bytes: int) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            members = archive.infolist()
            unpacked = sum(info.file_size for info in members)
            if unpacked > max_bytes:  # a compressed archive must not unpack past the body limit
                raise InvalidInput(f"npz archive unpacks to {unpacked} bytes, more than the {max_bytes} bytes this agent accepts")
            arrays = {}
            for info in members:
                name = info.filename.removesuffix(".npy")
                arrays[name] = _parse_npy(archive.read(info), what=f"npz member {info.filename!r}")
            return arrays
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as exc:
        raise InvalidInput(f"body is not a .npz archive: {exc}") from None
