"""The web server: Daphne, with a bound on what it buffers for each slow client, and no Nagle delay.

Daphne hands every reply straight to Twisted, which keeps whatever the client has not read yet
in memory without limit, so a client that reads slowly (or not at all) would grow the web
process by the whole stream. Here a reply waits while its connection still has more than
WEB_SEND_BUFFER_BYTES unsent: the slow stream holds itself back, and nothing else waits for it.
`python -m llmsite.daphne_server` takes Daphne's own command-line arguments; it first raises its
soft limit of open files (one per client) toward the hard limit.
"""

import asyncio
import logging
import resource

from daphne.cli import CommandLineInterface
from daphne.server import Server

DRAIN_POLL_SECONDS = 0.05
OPEN_FILES_WANTED = 65536

log = logging.getLogger(__name__)


def unsent_bytes(transport) -> int:
    """What a Twisted socket transport holds that the client has not taken yet (0 if unknown)."""
    buffered = getattr(transport, "dataBuffer", b"")
    return len(buffered) - getattr(transport, "offset", 0) + getattr(transport, "_tempDataLen", 0)


# RFC 6455's "policy violation" and "message too big": Daphne's WebSocket library (autobahn)
# refuses them from an application (it allows 1000 and 3000-4999), so they are sent here as the
# protocol-level close frames they are.
PROTOCOL_CLOSE_CODES = {1008, 1009}


class FlowControlledServer(Server):
    def protocol_connected(self, protocol):
        """Small writes go out at once (TCP_NODELAY): a stream sends a token per write, and Nagle's
        algorithm would hold each one back until the client acknowledged the one before."""
        super().protocol_connected(protocol)
        transport = getattr(protocol, "transport", None) or getattr(getattr(protocol, "channel", None), "transport", None)
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)

    async def handle_reply(self, protocol, message):
        if (
            message.get("type") == "websocket.close"
            and message.get("code") in PROTOCOL_CLOSE_CODES
            and getattr(protocol, "state", None) == getattr(protocol, "STATE_OPEN", object())
        ):
            protocol.sendCloseFrame(code=message["code"], isReply=False)
            return
        await super().handle_reply(protocol, message)
        from django.conf import settings

        limit = settings.WEB_SEND_BUFFER_BYTES
        transport = getattr(protocol, "transport", None)
        while limit and transport is not None and unsent_bytes(transport) > limit:
            if protocol not in self.connections or self.connections[protocol].get("disconnected"):
                return
            await asyncio.sleep(DRAIN_POLL_SECONDS)


class WebCommandLine(CommandLineInterface):
    server_class = FlowControlledServer


def raise_open_files_limit(wanted: int = OPEN_FILES_WANTED) -> int:
    """Raise this process's soft limit of open files toward its hard limit (the most a process may
    take without privileges), up to `wanted`; return the soft limit now. Each client's socket is an
    open file, and many systems start processes with a soft limit of 1024, which would refuse a web
    process's clients past about a thousand ("Too many open files")."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            log.warning("could not raise the open files limit from %d to %d", soft, target, exc_info=True)
    return soft


if __name__ == "__main__":
    raise_open_files_limit()
    WebCommandLine.entrypoint()
