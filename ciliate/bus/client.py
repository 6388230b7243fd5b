"""The NATS connection every service and the CLI use: reconnects, request/reply, KV, events."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError

from ciliate.bus import codec
from ciliate.bus.errors import BadRequest, RequestFailed, error_from_reply
from ciliate.bus.kv import KV
from ciliate.bus.subjects import Bucket

log = logging.getLogger("ciliate.bus")

Handler = Callable[[Any], Awaitable[Any]]
EventCallback = Callable[[Any], Awaitable[None]]

BUCKET_HISTORY = 1
HEARTBEAT_TTL = 15.0
"""Seconds a heartbeat stays in the ``heartbeats`` bucket without being refreshed."""


class Bus:
    """One NATS connection with JetStream; survives server restarts by reconnecting forever."""

    def __init__(self, nc: NATS, name: str) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.name = name
        self._kv: dict[Bucket, KV] = {}
        self.reconnects = 0
        self.reconnected = asyncio.Event()
        self.closing = False

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        name: str,
        user: str | None = None,
        password: str | None = None,
        connect_timeout: float = 5.0,
        retry_on_failed_connect: bool = True,
    ) -> Bus:
        holder: dict[str, Bus] = {}

        async def disconnected() -> None:
            bus = holder.get("bus")
            if bus is not None and bus.closing:
                return
            log.warning("bus: disconnected from NATS at %s; reconnecting", url)

        async def reconnected() -> None:
            log.warning("bus: reconnected to NATS at %s", url)
            bus = holder.get("bus")
            if bus is not None:
                bus.reconnects += 1
                bus.reconnected.set()

        async def error(exc: Exception) -> None:
            log.warning("bus: %s", exc)

        options: dict[str, Any] = dict(
            servers=[url],
            name=name,
            user=user,
            password=password,
            connect_timeout=connect_timeout,
            reconnect_time_wait=0.25,
            max_reconnect_attempts=-1,
            allow_reconnect=True,
            ping_interval=2,
            max_outstanding_pings=3,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
        )
        delay = 0.1
        while True:
            try:
                nc = await nats.connect(**options)
                break
            except (OSError, nats.errors.Error, TimeoutError) as exc:
                if not retry_on_failed_connect:
                    raise
                log.warning("bus: NATS at %s not reachable (%s); retrying", url, exc)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
        bus = cls(nc, name)
        holder["bus"] = bus
        return bus

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    async def close(self) -> None:
        """Drain subscriptions (in-flight handlers finish) and close."""
        if self.nc.is_closed:
            return
        self.closing = True
        try:
            await asyncio.wait_for(self.nc.drain(), timeout=5)
        except (TimeoutError, nats.errors.Error):
            await self.nc.close()

    # -- plain subjects ---------------------------------------------------------------------

    async def publish(self, subject: str, payload: Any) -> None:
        await self.nc.publish(subject, codec.pack(payload))

    async def publish_raw(self, subject: str, data: bytes) -> None:
        await self.nc.publish(subject, data)

    async def subscribe(
        self, subject: str, callback: EventCallback, *, queue: str = ""
    ) -> Subscription:
        """Decoded messages to ``callback``; undecodable ones are logged and dropped."""

        async def on_msg(msg: Msg) -> None:
            try:
                payload = codec.unpack(msg.data)
            except codec.DecodeError as exc:
                log.warning("bus: dropped undecodable message on %s: %s", msg.subject, exc)
                return
            await callback(payload)

        return await self.nc.subscribe(subject, queue=queue, cb=on_msg)

    async def subscribe_raw(
        self, subject: str, callback: Callable[[Msg], Awaitable[None]], *, queue: str = ""
    ) -> Subscription:
        return await self.nc.subscribe(subject, queue=queue, cb=callback)

    # -- request/reply ----------------------------------------------------------------------

    async def request(self, subject: str, payload: Any, *, timeout: float = 5.0) -> Any:
        """Send a request; an error reply raises :class:`RequestFailed` naming the field."""
        try:
            msg = await self.nc.request(subject, codec.pack(payload), timeout=timeout)
        except nats.errors.NoRespondersError:
            raise RequestFailed(503, "", f"no service answers {subject}") from None
        except nats.errors.TimeoutError:
            raise RequestFailed(504, "", f"{subject} did not answer in {timeout}s") from None
        try:
            reply = codec.unpack(msg.data)
        except codec.DecodeError as exc:
            raise RequestFailed(502, "", f"undecodable reply from {subject}: {exc}") from None
        err = error_from_reply(reply)
        if err is not None:
            raise err
        return reply

    async def serve(self, subject: str, handler: Handler, *, queue: str = "") -> Subscription:
        """Answer requests on ``subject``: ``BadRequest`` and bad payloads become error replies."""

        async def on_msg(msg: Msg) -> None:
            reply: Any
            try:
                payload = codec.unpack(msg.data)
                reply = await handler(payload)
            except codec.DecodeError as exc:
                reply = BadRequest("", str(exc), code=400).to_reply()
            except BadRequest as exc:
                reply = exc.to_reply()
            except RequestFailed as exc:
                reply = {"error": {"code": exc.code, "field": exc.field, "message": exc.message}}
            except Exception as exc:
                log.exception("bus: handler for %s failed", subject)
                reply = {"error": {"code": 500, "field": "", "message": type(exc).__name__}}
            if msg.reply:
                try:
                    await msg.respond(codec.pack(reply))
                except nats.errors.Error as exc:
                    log.warning("bus: could not answer on %s: %s", subject, exc)

        return await self.nc.subscribe(subject, queue=queue, cb=on_msg)

    # -- key/value --------------------------------------------------------------------------

    async def kv(self, bucket: Bucket) -> KV:
        """The bucket, created on first use (idempotent across replicas)."""
        cached = self._kv.get(bucket)
        if cached is not None:
            return cached
        try:
            store = await self.js.key_value(bucket.value)
        except (BucketNotFoundError, NotFoundError):
            ttl = HEARTBEAT_TTL if bucket is Bucket.HEARTBEATS else None
            store = await self.js.create_key_value(
                bucket=bucket.value, history=BUCKET_HISTORY, ttl=ttl
            )
        kv = KV(self, bucket, store)
        self._kv[bucket] = kv
        return kv
