"""``python -m gateway``: run the jobgate gateway until SIGTERM or SIGINT; SIGHUP reloads its tokens."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from common.logs import configure_logging

from .config import GatewaySettings
from .server import start

log = logging.getLogger("gateway")


async def main(settings: GatewaySettings) -> None:
    gateway = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, gateway.reload_tokens)
    await stop.wait()
    log.info("stopping: health NOT_SERVING, draining RPCs for up to %.1fs", settings.grace_s)
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal exits at once
        loop.add_signal_handler(sig, lambda: sys.exit(1))
    await gateway.stop()
    log.info("stopped")


def cli(argv: Sequence[str] | None = None) -> None:
    try:
        settings = GatewaySettings.from_env().with_args(argv).validate()
    except ValueError as exc:
        sys.exit(f"gateway: {exc}")
    configure_logging(settings.log_level, settings.log_format)
    log.info("starting with %r", settings)
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(settings))
    else:
        uvloop.run(main(settings))


if __name__ == "__main__":
    cli()
