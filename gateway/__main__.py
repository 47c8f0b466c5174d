"""``python -m gateway``: run the jobgate gateway until SIGTERM or SIGINT; SIGHUP reloads its tokens.
With ``processes`` above 1, it forks that many gateways on one address and watches over them."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from common import gc_tuning
from common.logs import configure_logging

from .config import GatewaySettings
from .server import start

log = logging.getLogger("gateway")

PASSED_ON = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


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


def serve(settings: GatewaySettings) -> None:
    """Runs one gateway in this process until it is told to stop."""
    gc_tuning.tune()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(settings))
    else:
        uvloop.run(main(settings))


def supervise(settings: GatewaySettings) -> int:
    """Forks ``settings.processes`` gateways serving one address, then waits for them.

    They are forked before any server, channel or event loop exists, as gRPC requires; each binds
    ``listen`` with SO_REUSEPORT, so the kernel spreads new connections over them. SIGTERM, SIGINT
    and SIGHUP are passed on to every one (a second SIGTERM, as with one process, makes them exit at
    once). A gateway that exits on its own stops the others: the supervisor then exits with 1, for
    the service manager to restart the whole. Returns the exit status.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {*PASSED_ON, signal.SIGCHLD})
    children: dict[int, int] = {}
    for index in range(settings.processes):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's status is what the tests check
            os._exit(_child(settings, index))
        children[pid] = index
    log.info("%d gateway processes on %s: pids %s", len(children), settings.listen, ", ".join(map(str, children)))
    status, stopping = 0, False
    while children:
        info = signal.sigtimedwait({*PASSED_ON, signal.SIGCHLD}, 1.0)
        if info is not None and info.si_signo in PASSED_ON:
            stopping = stopping or info.si_signo != signal.SIGHUP
            _tell(children, info.si_signo)
        while children:
            pid, code = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            index = children.pop(pid)
            if not stopping:
                log.error("gateway process %d (pid %d) exited (%s): stopping the others", index, pid, _how(code))
                status, stopping = 1, True
                _tell(children, signal.SIGTERM)
            elif os.waitstatus_to_exitcode(code) != 0:
                status = 1
    log.info("every gateway process has stopped")
    return status


def _child(settings: GatewaySettings, index: int) -> int:
    """Runs gateway process ``index``; returns its exit status."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {*PASSED_ON, signal.SIGCHLD})
    try:
        log.info("gateway process %d of %d (pid %d)", index, settings.processes, os.getpid())
        serve(settings.for_process(index))
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("gateway process %d failed", index)
        return 1
    finally:
        logging.shutdown()


def _tell(children: dict[int, int], sig: int) -> None:
    for pid in children:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _how(code: int) -> str:
    exit_code = os.waitstatus_to_exitcode(code)
    return f"signal {signal.Signals(-exit_code).name}" if exit_code < 0 else f"status {exit_code}"


def cli(argv: Sequence[str] | None = None) -> None:
    try:
        settings = GatewaySettings.from_env().with_args(argv).validate()
    except ValueError as exc:
        sys.exit(f"gateway: {exc}")
    configure_logging(settings.log_level, settings.log_format)
    log.info("starting with %r", settings)
    if settings.processes > 1:
        sys.exit(supervise(settings))
    serve(settings)


if __name__ == "__main__":
    cli()
