"""The predict API over WebSocket (PROTOCOL.md): one request per message, answered in order."""

import asyncio
import contextlib
import json
import logging

from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from chat import services
from chat.formatters.predict import PredictSocket
from chat.generation import Conversation
from chat.protocols import predict as wire
from chat.relay import relay
from llmsite import auth, metrics
from llmsite.errors import ApiError, QuotaExceeded, RateLimited, ServerError

log = logging.getLogger(__name__)

EOS = "<EOS>"


class PredictConsumer(AsyncWebsocketConsumer):
    """Keeps the connection's own history and system prompt; queues messages, answers one at a time."""

    async def connect(self):
        self.name = self.scope["url_route"]["kwargs"]["deployment"]
        headers = dict(self.scope.get("headers") or [])
        header = headers.get(b"authorization", b"").decode("latin-1") or None
        try:
            self.token = await services.edge(auth.authenticate, header=header)
            self.deployment = await services.edge(services.access_deployment, token=self.token, name=self.name)
        except ApiError as exc:
            metrics.refused(exc)
            # Accept, say why, and close with the protocol's code: clients see 4401/4403/4404.
            await self.accept()
            await self.send(text_data=json.dumps(exc.body()))
            await self.close(code=exc.ws_close_code or 4400)
            return
        self.history: list[list[str]] = []
        self.system_prompt = ""
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.runner = asyncio.create_task(self._run())
        await self.accept()

    async def receive(self, text_data=None, bytes_data=None):
        if not hasattr(self, "inbox"):
            return
        message = text_data if text_data is not None else bytes_data
        size = len(message.encode() if isinstance(message, str) else message)
        if size > settings.PREDICT_MAX_BODY_BYTES:
            await self._shut(1009)  # "message too big" (sent by llmsite.daphne_server)
            return
        if self.inbox.qsize() >= settings.WS_MAX_QUEUED_MESSAGES:
            limit = settings.WS_MAX_QUEUED_MESSAGES
            error = RateLimited(f"More than {limit} messages are waiting on this connection; send fewer at once.", retry_after=1)
            metrics.refused(error, deployment=self.deployment.name)
            await self.send(text_data=json.dumps(error.body()))
            await self._shut(1008)  # "policy violation"
            return
        self.inbox.put_nowait(message)

    async def _shut(self, code: int) -> None:
        """Close from our side: drop what is queued and stop the running request now, without
        waiting for the client to finish the closing handshake."""
        while not self.inbox.empty():
            self.inbox.get_nowait()
        self.runner.cancel()
        await self.close(code=code)

    async def disconnect(self, code):
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.cancel()  # the running generation's close() cancels it on the worker

    async def _run(self):
        while True:
            message = await self.inbox.get()
            try:
                self.deployment = await services.edge(self._recheck)
            except ApiError as exc:  # revoked, or the deployment disabled, while the socket was open
                metrics.refused(exc)
                await self.send(text_data=json.dumps(exc.body()))
                await self.close(code=exc.ws_close_code or 4401)
                return
            try:
                await self._answer(message)
            except asyncio.CancelledError:
                raise
            except QuotaExceeded as exc:  # the user's budget is used up: later messages would be refused too
                metrics.refused(exc, deployment=self.deployment.name)
                await self.send(text_data=json.dumps(exc.body(), ensure_ascii=False))
                await self.close(code=exc.ws_close_code)
                return
            except ApiError as exc:
                metrics.refused(exc, deployment=self.deployment.name)
                await self.send(text_data=json.dumps(exc.body(), ensure_ascii=False))
            except Exception as exc:  # one bad request never ends the connection
                log.exception("websocket request failed")
                await self.send(text_data=json.dumps(ServerError(str(exc)).body()))
            await self.send(text_data=EOS)

    def _recheck(self):
        """Each message checks the token again and reads the deployment again (one trip into sync
        code): a revocation takes effect at once, and an operator's edit at the next message."""
        auth.check_token_active(token=self.token)
        return services.access_deployment(token=self.token, name=self.name)

    async def _answer(self, message):
        fields = wire.parse_ws_message(message)
        if fields.history is not None:
            self.history = fields.pairs()
        if fields.system_prompt is not None:
            self.system_prompt = fields.system_prompt
        if not fields.prompt:
            return  # a settings-only message: answered with <EOS> alone

        conversation = Conversation(prompt=fields.prompt, system_prompt=self.system_prompt, history=list(self.history))
        prepared = await services.edge(
            services.prepare,
            token=self.token,
            deployment=self.deployment,
            conversation=conversation,
            fields=fields,
            protocol="websocket",
        )
        formatter = PredictSocket(streaming=fields.use_stream_chat is not False, return_sources=bool(fields.return_sources))
        generation = await services.dispatch(prepared)
        async with contextlib.aclosing(relay(generation, formatter)) as texts:
            async for text in texts:
                await self.send(text_data=text)
        if formatter.answer is not None:
            self.history.append([conversation.prompt, formatter.answer])
