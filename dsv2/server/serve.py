"""``dsv2 serve``: load the model, start the engine thread, run uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import uvicorn

from dsv2.engine.async_engine import AsyncEngine
from dsv2.engine.llm import LLM
from dsv2.server.app import create_app

log = logging.getLogger("dsv2.server")


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
          api_key: str | None = None, max_body_bytes: int = 4 * 2**20, graceful_shutdown_s: float = 10.0,
          **engine_args: Any) -> None:
    """Serve ``model`` until interrupted. On SIGINT/SIGTERM uvicorn stops accepting connections, lets in-flight
    requests finish for up to ``graceful_shutdown_s`` seconds (then cancels them), and the engine thread stops."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    llm = LLM(model=model, **engine_args)
    if llm.tokenizer is None:
        raise SystemExit(f"dsv2 serve: {model} has no tokenizer.json; the API needs one")
    engine = AsyncEngine(llm.engine)
    name = served_model_name or Path(model).name
    app = create_app(engine, llm.tokenizer, name, api_key=api_key, max_body_bytes=max_body_bytes)
    log.info("serving %s as %r on http://%s:%d/v1 (max_model_len %d)", model, name, host, port,
             llm.engine.config.max_model_len)
    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_level="info",
                            timeout_graceful_shutdown=graceful_shutdown_s)
    # uvicorn handles SIGINT/SIGTERM while it runs, then re-raises the signal; these handlers receive that re-raise,
    # so the engine is stopped and the process exits normally instead of dying by the signal.
    previous = {sig: signal.signal(sig, _after_shutdown) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(config).run()
    finally:
        engine.shutdown()
        log.info("engine stopped")
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _after_shutdown(signum: int, frame: Any) -> None:
    log.info("%s: server shut down", signal.Signals(signum).name)
