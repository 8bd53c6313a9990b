"""``lego serve``'s server: the engine (:class:`EngineAPI`) and the OpenAI spec on a LitServer, and its shutdown.

SIGTERM drains: new requests get 503 at once, those admitted finish (within ``grace_period``
seconds), then LitServe stops its API process and worker and the command exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

import litserve as ls
from fastapi import HTTPException
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError

from lego_lightning.serve.spec import OpenAISpec, error_response
from lego_lightning.serve.worker import EngineAPI

log = logging.getLogger(__name__)


def build_server(
    api: EngineAPI,
    accelerator: str = "auto",
    devices: int | str = 1,
    max_body_bytes: int = 1_000_000,
) -> ls.LitServer:
    """A LitServer for ``api``: one worker on ``devices``, bodies bounded, a malformed body a 400 that names its
    fields (FastAPI's own answer is a 422 in its own format), and every refusal in OpenAI's error body."""
    if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes={max_body_bytes!r}: allowed a positive integer (bytes)")
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        devices=devices,
        timeout=False,
        max_payload_size=max_body_bytes,
        healthcheck_path="/health",
        disable_openapi_url=True,
    )

    async def malformed(request: HTTPRequest, error: RequestValidationError):
        fields = ", ".join(field_of(e) for e in error.errors())
        reasons = "; ".join(e["msg"] for e in error.errors())
        return error_response(400, f"malformed request ({fields}): {reasons}", fields or None)

    async def refused(request: HTTPRequest, error: HTTPException):  # 401, 413...: in OpenAI's error body too
        return error_response(error.status_code, str(error.detail), kind="invalid_request_error")

    server.app.add_exception_handler(RequestValidationError, malformed)
    server.app.add_exception_handler(HTTPException, refused)
    return server


def field_of(error: dict[str, Any]) -> str:
    """The field a validation error is about, as a client wrote it (``prompt``, ``messages.0.content``); a body that
    is not JSON at all is ``body``."""
    if error["type"] == "json_invalid":
        return "body"
    return ".".join(str(p) for p in error["loc"] if p != "body") or "body"


def run_server(
    server: ls.LitServer, spec: OpenAISpec, host: str = "127.0.0.1", port: int = 8000, grace_period: float = 30.0
) -> None:
    """Serve until SIGTERM (or Ctrl-C): on SIGTERM the admitted requests finish within ``grace_period`` seconds,
    new ones get 503, then everything stops and this returns."""
    if not isinstance(grace_period, (int, float)) or grace_period < 0:
        raise ValueError(f"grace_period={grace_period!r}: allowed seconds >= 0")

    def drain() -> None:
        deadline = time.monotonic() + grace_period
        while spec.in_flight.value > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if spec.in_flight.value > 0:
            log.warning("%d requests unfinished after the grace period of %ss", spec.in_flight.value, grace_period)
        while server._shutdown_event is None:  # a signal during start-up: stop once it is up
            time.sleep(0.05)
        server._shutdown_event.set()

    def on_sigterm(signum: int, frame: Any) -> None:
        if not spec.draining.is_set():
            log.info("SIGTERM: finishing the requests in flight (grace period %ss), refusing new ones", grace_period)
            spec.draining.set()
            threading.Thread(target=drain, name="lego-serve-drain", daemon=True).start()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        server.run(host=host, port=port, num_api_servers=1, generate_client_file=False, log_level="warning")
    finally:
        signal.signal(signal.SIGTERM, previous)
