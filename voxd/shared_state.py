"""State that must be shared beyond one process: which stream tokens are used, which
assistant calls the webhook created early (so a stream that lands elsewhere claims it), and
what a call's `<Connect action>` request is to be answered (the stream ended on one worker or
host; Twilio's request may land on another).

Three scopes, chosen by how voxd runs:
- one process: `LocalTokens`, in memory;
- `server.workers > 1` on one host: `DirectoryTokens`, one file per used token in a directory
  the supervisor gives every worker (created with O_EXCL: the first worker to claim wins);
- several hosts: `RedisState` (`[state] redis_url`), a Redis every host shares: used tokens are
  `SET NX` keys that expire with the token, and an early-created call is published under its
  CallSid for whichever host gets the stream to take (`GETDEL`: exactly one host takes it).

redis-py's client is synchronous (its asyncio client cannot run under trio), so every command
runs in a worker thread with a short socket timeout. When Redis cannot be reached, voxd keeps
taking calls: it falls back to this process's own knowledge and says so (a throttled error
line and `voxd_errors_total{kind="state"}`), since refusing every call would hurt more than a
replay that the signature and the token's short life already limit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import trio

from voxd.observability import metrics
from voxd.observability.throttled import ThrottledLog
from voxd.twilio.stream_token import CALL_SID, TokenRejected

log = logging.getLogger("voxd.state")

REDIS_TIMEOUT: Final = 1.0
"""Seconds one Redis command may take before voxd goes on without it."""
KEY_PREFIX: Final = "voxd:"
PENDING: Final = "pending"


class TokenLedger(Protocol):
    """Where used stream tokens are remembered until they expire."""

    async def claim(self, mac: str, expiry: int, now: float) -> None:
        """Mark the token with this MAC used; TokenRejected if it was already."""
        ...


class LocalTokens:
    """Tokens used in this process (by MAC), remembered until they expire."""

    def __init__(self) -> None:
        self._used: dict[str, int] = {}

    def claim_now(self, mac: str, expiry: int, now: float) -> None:
        """`claim` without waiting."""
        if len(self._used) > 1000:
            self._used = {t: e for t, e in self._used.items() if e >= now}
        if mac in self._used:
            raise TokenRejected("used", "stream token was already used (a replayed stream)")
        self._used[mac] = expiry

    async def claim(self, mac: str, expiry: int, now: float) -> None:
        """Mark the token with this MAC used; TokenRejected if it was already."""
        self.claim_now(mac, expiry, now)
        await trio.lowlevel.checkpoint()


class DirectoryTokens:
    """Tokens used by any worker of this host: one empty file per MAC in `directory` (the
    supervisor's private scratch directory), its modification time the token's expiry."""

    PRUNE_EVERY: Final = 200

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._claims = 0

    async def claim(self, mac: str, expiry: int, now: float) -> None:
        """Mark the token with this MAC used; TokenRejected if any worker did already."""
        await trio.lowlevel.checkpoint()
        path = self.directory / mac  # the MAC is URL-safe base64: a safe file name
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            raise TokenRejected("used", "stream token was already used (a replayed stream)") \
                from None
        os.close(fd)
        os.utime(path, (expiry, expiry))
        self._claims += 1
        if self._claims % self.PRUNE_EVERY == 0:
            self._prune(now)

    def _prune(self, now: float) -> None:
        for entry in os.scandir(self.directory):
            try:
                if entry.stat().st_mtime < now:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass  # another worker pruned it


class AfterStream(Protocol):
    """A short-lived word per call, put by one process and taken once by whichever takes it:
    what a call's `<Connect action>` request is answered, or an outbound call's
    answering-machine verdict."""

    async def put(self, call_sid: str, text: str, seconds: float) -> bool:
        """Keep `text` for `call_sid` for `seconds`; False (after one line and a count) if it
        could not be kept."""
        ...

    async def take(self, call_sid: str) -> str | None:
        """What was put for `call_sid` (once), or None."""
        ...


class LocalAfterStream:
    """Words per call of this process, in memory (at most MAX_ENTRIES: the oldest go)."""

    MAX_ENTRIES: Final = 10_000

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, str]] = {}

    def put_now(self, call_sid: str, text: str, seconds: float) -> None:
        """`put` without waiting."""
        now = trio.current_time()
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries = {k: v for k, v in self._entries.items() if v[0] >= now}
            while len(self._entries) >= self.MAX_ENTRIES:
                del self._entries[next(iter(self._entries))]
        self._entries[call_sid] = (now + seconds, text)

    def take_now(self, call_sid: str) -> str | None:
        """`take` without waiting."""
        entry = self._entries.pop(call_sid, None)
        if entry is None or entry[0] < trio.current_time():
            return None
        return entry[1]

    async def put(self, call_sid: str, text: str, seconds: float) -> bool:
        """Keep `text` for `call_sid` for `seconds`."""
        self.put_now(call_sid, text, seconds)
        await trio.lowlevel.checkpoint()
        return True

    async def take(self, call_sid: str) -> str | None:
        """What was put for `call_sid` (once), or None."""
        await trio.lowlevel.checkpoint()
        return self.take_now(call_sid)


class DirectoryAfterStream:
    """Words per call for any worker of this host: one file per call (`{kind}-CA...`) in the
    workers' shared directory, its modification time its expiry. Expired files of this kind
    are removed every PRUNE_EVERY puts (and with the tokens), so the directory stays bounded
    whatever is put."""

    PRUNE_EVERY: Final = 200

    def __init__(self, directory: Path, kind: str = "after",
                 what: str = "what follows the call's stream") -> None:
        self.directory = directory
        self.kind = kind
        self.what = what
        self._puts = 0

    async def put(self, call_sid: str, text: str, seconds: float) -> bool:
        """Keep `text` for `call_sid` for `seconds`."""
        await trio.lowlevel.checkpoint()
        if not CALL_SID.fullmatch(call_sid):
            return False
        path = self.directory / f"{self.kind}-{call_sid}"
        partial = path.with_suffix(f".{os.getpid()}")
        try:
            self._puts += 1
            if self._puts % self.PRUNE_EVERY == 0:
                self._prune(time.time())
            partial.write_text(text, encoding="utf-8")
            expiry = time.time() + seconds
            os.utime(partial, (expiry, expiry))
            os.replace(partial, path)
        except OSError as exc:
            metrics.ERRORS.labels(kind="state").inc()
            log.error("cannot keep %s in %s: %s", self.what, self.directory,
                      exc.strerror or exc)
            return False
        return True

    def _prune(self, now: float) -> None:
        prefix = self.kind + "-"
        for entry in os.scandir(self.directory):
            if entry.name.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):  # another worker took it
                    if entry.stat().st_mtime < now:
                        os.unlink(entry.path)

    async def take(self, call_sid: str) -> str | None:
        """What was put for `call_sid` (once), or None."""
        await trio.lowlevel.checkpoint()
        if not CALL_SID.fullmatch(call_sid):
            return None
        path = self.directory / f"{self.kind}-{call_sid}"
        try:
            expired = path.stat().st_mtime < time.time()
            text = path.read_text(encoding="utf-8")
            path.unlink()
        except FileNotFoundError:
            return None
        except OSError as exc:
            metrics.ERRORS.labels(kind="state").inc()
            log.error("cannot read %s in %s: %s", self.what, self.directory,
                      exc.strerror or exc)
            return None
        return None if expired else text


@dataclass(frozen=True)
class EarlyCall:
    """An assistant call the webhook created, as another host needs it to take it over."""

    id: str
    websocket_call_url: str


class RedisState:
    """Used tokens and early-created calls in a Redis all hosts share."""

    def __init__(self, url: str, fallback: LocalTokens | None = None) -> None:
        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT,
                                            socket_connect_timeout=REDIS_TIMEOUT,
                                            decode_responses=True)
        self._fallback = fallback or LocalTokens()
        self._after = RedisMessages(self, "after", "what follows a call's stream")
        self._errors = ThrottledLog(log)

    async def _run(self, what: str, command: str, *args: Any, **kwargs: Any) -> Any:
        """One Redis command in a worker thread; None (after one throttled line and a
        counted error) when Redis does not answer."""
        import redis

        call = getattr(self._client, command)
        try:
            with trio.fail_after(2 * REDIS_TIMEOUT + 1):
                return await trio.to_thread.run_sync(lambda: call(*args, **kwargs),
                                                     abandon_on_cancel=True)
        except (redis.RedisError, OSError, trio.TooSlowError) as exc:
            metrics.ERRORS.labels(kind="state").inc()
            self._errors.error("redis", "shared state (Redis) failed while %s: %s: %s; going "
                               "on with this process's own state", what, type(exc).__name__,
                               str(exc)[:200])
            raise _Unavailable from None

    async def claim(self, mac: str, expiry: int, now: float) -> None:
        """Mark the token used for every host (SET NX, expiring with it)."""
        try:
            fresh = await self._run("claiming a stream token", "set", f"{KEY_PREFIX}token:{mac}",
                                    "1", ex=max(1, int(expiry - now) + 1), nx=True)
        except _Unavailable:
            self._fallback.claim_now(mac, expiry, now)
            return
        if not fresh:
            raise TokenRejected("used", "stream token was already used (a replayed stream, "
                                "on this host or another)")
        self._fallback.claim_now(mac, expiry, now)

    async def announce_early(self, call_sid: str, seconds: float) -> None:
        """The webhook is creating an assistant call for `call_sid`: a stream elsewhere waits
        for it instead of creating another."""
        with contextlib.suppress(_Unavailable):
            await self._run("announcing an early call", "set", self._early_key(call_sid),
                            PENDING, ex=int(seconds) + 1, nx=True)

    async def publish_early(self, call_sid: str, call: EarlyCall | None, seconds: float) -> None:
        """The early call is created (or failed: None): hand it to whichever host takes it."""
        key = self._early_key(call_sid)
        try:
            if call is None:
                await self._run("withdrawing an early call", "delete", key)
            else:
                value = json.dumps({"id": call.id, "url": call.websocket_call_url})
                await self._run("publishing an early call", "set", key, value,
                                ex=int(seconds) + 1)
        except _Unavailable:
            pass

    async def take_early(self, call_sid: str, wait: float) -> EarlyCall | None:
        """Take the early call published for `call_sid` (waiting up to `wait` s while it is
        still being created); None if there is none, or another host took it."""
        key = self._early_key(call_sid)
        deadline = trio.current_time() + wait
        try:
            while True:
                value = await self._run("taking an early call", "get", key)
                if value is None:
                    return None
                if value != PENDING:
                    value = await self._run("taking an early call", "getdel", key)
                    if value is None or value == PENDING:
                        return None
                    data = json.loads(value)
                    return EarlyCall(str(data["id"]), str(data["url"]))
                if trio.current_time() >= deadline:
                    return None
                await trio.sleep(0.05)
        except (_Unavailable, ValueError, KeyError, TypeError):
            return None

    def _early_key(self, call_sid: str) -> str:
        return f"{KEY_PREFIX}early:{call_sid}"

    async def put(self, call_sid: str, twiml: str, seconds: float) -> bool:
        """Answer `twiml` to the action request of `call_sid`, on whichever host it lands
        (on this one at least, when Redis does not answer)."""
        return await self._after.put(call_sid, twiml, seconds)

    async def take(self, call_sid: str) -> str | None:
        """The TwiML put for `call_sid` by any host (once), or None."""
        return await self._after.take(call_sid)

    def messages(self, kind: str, what: str) -> RedisMessages:
        """Another kind of word per call kept here (`what` names it in error lines)."""
        return RedisMessages(self, kind, what)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await trio.to_thread.run_sync(self._client.close)


class RedisMessages:
    """One kind of short-lived word per call (`voxd:{kind}:{CallSid}`) in the shared Redis;
    kept in this process while Redis does not answer."""

    def __init__(self, redis: RedisState, kind: str, what: str) -> None:
        self._redis = redis
        self._key = f"{KEY_PREFIX}{kind}:"
        self._what = what
        self._local = LocalAfterStream()

    async def put(self, call_sid: str, text: str, seconds: float) -> bool:
        """Keep `text` for `call_sid` for `seconds`, for whichever host takes it."""
        try:
            await self._redis._run(f"keeping {self._what}", "set", self._key + call_sid,
                                   text, ex=max(1, int(seconds)))
        except _Unavailable:
            self._local.put_now(call_sid, text, seconds)
        return True

    async def take(self, call_sid: str) -> str | None:
        """What any host put for `call_sid` (once), or None."""
        local = self._local.take_now(call_sid)  # kept here while Redis did not answer
        try:
            shared = await self._redis._run(f"reading {self._what}", "getdel",
                                            self._key + call_sid)
        except _Unavailable:
            return local
        return shared if isinstance(shared, str) else local


class _Unavailable(Exception):
    """Redis did not answer (already logged and counted)."""


def token_ledger(redis: RedisState | None, directory: str | None) -> TokenLedger:
    """The ledger for how voxd runs: Redis if configured, else the workers' shared directory
    (`server.workers > 1`), else this process's memory."""
    if redis is not None:
        return redis
    if directory:
        return DirectoryTokens(Path(directory))
    return LocalTokens()


def after_stream_store(redis: RedisState | None, directory: str | None) -> AfterStream:
    """Where after-stream TwiML is kept: Redis if configured, else the workers' shared
    directory (`server.workers > 1`), else this process's memory."""
    if redis is not None:
        return redis
    if directory:
        return DirectoryAfterStream(Path(directory))
    return LocalAfterStream()


def answered_by_store(redis: RedisState | None, directory: str | None) -> AfterStream:
    """Where outbound calls' answering-machine results wait for their call (the callback may
    land on another worker or host than the call's stream, or before it starts)."""
    if redis is not None:
        return redis.messages("amd", "an answering-machine verdict")
    if directory:
        return DirectoryAfterStream(Path(directory), "amd", "an answering-machine verdict")
    return LocalAfterStream()
