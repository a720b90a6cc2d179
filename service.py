"""The service layer: every operation a client can ask for, free of any transport.

Each operation takes plain arguments, checks what the caller may do, commits through the store,
fans out through the hub, and *returns* a result; the socket handlers (``handlers.py``) and,
later, HTTP handlers turn results into replies. Errors the caller should see are raised as
``protocol.ProtocolError`` with the wire code (``forbidden``, ``invalid_message``, ...).

``origin`` arguments name the connection a request came in on, when it came over a socket: that
connection gets the reply instead of the fan-out frame (``message_sent`` instead of
``new_message``). ``None`` (HTTP, the backend) means every connection gets the fan-out.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

import protocol as p
from config import Config
from conversations import Conversations
from delivery import DeliveryLog
from hub import Client, Hub
from limits import TokenBucket
from metrics import Metrics
from rows import (
    ConversationRow,
    ConversationSummary,
    EventKind,
    MessageDetail,
    MessageRow,
    PendingEvent,
)
from store import (
    ConstraintViolation,
    DuplicateRequest,
    KeyedLock,
    NewMessage,
    Store,
    StoreError,
    Unavailable,
)
from typing_indicators import TypingTracker

log = logging.getLogger("pitchey.service")

NOT_A_PARTICIPANT = "Not a participant of this conversation"
# The largest inbox page (PROTOCOL.md 8), and the most messages one "mark all read" changes.
INBOX_MAX = 200
INBOX_DEFAULT = 50
READ_ALL_MAX = 1000
CREATED_BY_BACKEND = "Conversations on this server are created by the backend, not by clients"
NO_DIRECT = ("No conversation with this user yet; conversations on this server are created by"
             " the backend, not by clients")


def store_error_reply(exc: StoreError) -> tuple[str, str, int | None]:
    """The one mapping from the store's errors to the wire, for every door (socket, HTTP):
    (code, message, retryAfterMs).

    Unavailable (disk full, read-only, the file gone) is ``unavailable`` with a retry hint:
    nothing was stored and the client may retry. Anything else is ``internal``."""
    if isinstance(exc, Unavailable):
        return (p.UNAVAILABLE, "The database cannot take writes right now; nothing was stored",
                max(1, math.ceil(exc.retry_after * 1000)))
    return p.INTERNAL, "Internal error", None


class Sent(NamedTuple):
    """A stored message: its wire fields (``protocol.message_fields``) and whether a
    recipient's connection was written to. ``repeated``: an earlier send with the same
    requestId stored it, and nothing was fanned out now."""

    fields: dict[str, Any]
    delivered: bool
    repeated: bool


@dataclass(frozen=True, slots=True)
class Created:
    conversation: ConversationRow
    repeated: bool


@dataclass(frozen=True, slots=True)
class Read:
    """A read that changed something: who was told (or will be, on their next connection)."""

    message: MessageRow
    read_at: str
    notified: bool


class Service:
    def __init__(
        self,
        config: Config,
        store: Store,
        hub: Hub,
        conversations: Conversations,
        typing: TypingTracker,
        deliveries: DeliveryLog,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.store = store
        self.hub = hub
        self.conversations = conversations
        self.typing = typing
        self.deliveries = deliveries
        self.metrics = metrics
        # (kind, user, requestId) of sends and creations under way: a retry waits for the first.
        self.in_flight = KeyedLock()
        # (sender, requestId) -> messageId of messages this process stored, newest last: a
        # retry is answered without asking the database (the unique index is the backstop).
        self.recent_requests: OrderedDict[tuple[int, str], int] = OrderedDict()
        # (message, reader) reads under way, so two tabs cannot both see it unread.
        self.reads_in_flight: set[tuple[int, int]] = set()
        self.clients_create = config.conversations.create_policy == "any"
        # user -> delivery budget (limits.deliveries_*), least recently used first. Bounded like
        # the hub's frame buckets; a dropped bucket would have refilled by then in practice.
        self.delivery_buckets: OrderedDict[int, TokenBucket] = OrderedDict()

    # -- budgets ---------------------------------------------------------------------------

    def charge_deliveries(self, user_id: int, recipients: int) -> TokenBucket:
        """Charge ``recipients`` deliveries to the user's budget before the work is done, or
        raise ``rate_limited`` (with retryAfterMs). The caller gives them back
        (``bucket.refund``) when the work then fails, so only what was stored is charged.
        (Not a context manager: this is on the send path, and a generator per send costs.)"""
        bucket = self.delivery_buckets.pop(user_id, None)
        if bucket is None:
            limits = self.config.limits
            bucket = TokenBucket(limits.deliveries_per_second, limits.deliveries_burst)
        self.delivery_buckets[user_id] = bucket
        if len(self.delivery_buckets) > self.config.limits.max_connections:
            self.delivery_buckets.popitem(last=False)
        wait = bucket.take(recipients)
        if wait > 0:
            raise p.ProtocolError(
                p.RATE_LIMITED,
                f"Too many deliveries: this would reach {recipients} recipient(s); slow down",
                retry_after_ms=math.ceil(wait * 1000),
            )
        return bucket

    # -- membership ------------------------------------------------------------------------

    async def member_of(self, conversation_id: int, user_id: int) -> ConversationRow:
        """The conversation, or ``forbidden`` (the same whether or not it exists)."""
        row = await self.conversations.member_of(conversation_id, user_id)
        if row is None:
            raise p.ProtocolError(p.FORBIDDEN, NOT_A_PARTICIPANT)
        return row

    # -- messages --------------------------------------------------------------------------

    async def send_message(
        self,
        sender: int,
        sender_name: str,
        conversation_id: int | None,
        recipient_id: int | None,
        content: str,
        message_type: str = "text",
        attachments: list[dict[str, Any]] | None = None,
        pitch_id: int | None = None,
        subject: str | None = None,
        request_id: str | None = None,
        origin: Client | None = None,
    ) -> Sent:
        """Store, then fan out (PROTOCOL.md 4.1); idempotent on ``(sender, request_id)``."""
        if request_id is None:
            return await self._send(sender, sender_name, conversation_id, recipient_id, content,
                                    message_type, attachments or [], pitch_id, subject, None,
                                    origin)
        # The same request may be under way right now (another tab, or a fast retry): wait
        # for it, then answer from what it stored (if it stored anything).
        key = ("message", sender, request_id)
        await self.in_flight.claim(key)
        try:
            known = self.recent_requests.get((sender, request_id))
            if known is not None:
                repeat = await self._repeat(sender, request_id, known)
                if repeat is not None:
                    return repeat
            try:
                return await self._send(sender, sender_name, conversation_id, recipient_id,
                                        content, message_type, attachments or [], pitch_id,
                                        subject, request_id, origin)
            except DuplicateRequest:
                # Stored before this process remembered it (e.g. before a restart).
                repeat = await self._repeat(sender, request_id, None)
                if repeat is None:
                    raise StoreError("duplicate request with no stored message") from None
                return repeat
        finally:
            self.in_flight.release(key)

    async def _repeat(self, sender: int, request_id: str, message_id: int | None) -> Sent | None:
        """The original message of a repeated requestId; None if there is none."""
        if message_id is not None:
            row = await self.store.message(message_id)
        else:
            row = await self.store.message_by_request(sender, request_id)
        if row is None:
            return None
        delivered = await self.store.delivered_any(row.id)
        return Sent(p.row_fields(row), delivered, True)

    async def _send(
        self,
        sender: int,
        sender_name: str,
        conversation_id: int | None,
        recipient_id: int | None,
        content: str,
        message_type: str,
        attachments: list[dict[str, Any]],
        pitch_id: int | None,
        subject: str | None,
        request_id: str | None,
        origin: Client | None,
    ) -> Sent:
        # The hot path: the conversation usually comes from memory, and the only await is the
        # group commit.
        now = p.now_iso()
        if conversation_id is not None:
            conversation = self.conversations.cached(conversation_id)
            if conversation is None:
                conversation = await self.conversations.get(conversation_id)
            if conversation is None or sender not in conversation.members:
                raise p.ProtocolError(p.FORBIDDEN, NOT_A_PARTICIPANT)
        else:
            assert recipient_id is not None
            if recipient_id == sender:
                raise p.ProtocolError(p.INVALID_MESSAGE, "recipientId must be another user")
            if self.clients_create:
                conversation = await self.conversations.direct(sender, recipient_id, now)
            else:
                found = await self.conversations.existing_direct(sender, recipient_id)
                if found is None:
                    raise p.ProtocolError(p.FORBIDDEN, NO_DIRECT)
                conversation = found
            if sender not in conversation.members:
                raise p.ProtocolError(p.FORBIDDEN, NOT_A_PARTICIPANT)
            self.hub.add_contacts(conversation.members)
        members = conversation.members
        recipients = [m for m in members if m != sender]
        receiver = recipients[0] if not conversation.is_group and len(recipients) == 1 else None
        budget = self.charge_deliveries(sender, len(recipients))
        try:
            message_id = await self.store.add_message(NewMessage(
                conversation.id, sender, receiver, recipients, content, message_type,
                attachments, pitch_id, subject, request_id, now,
            ))
        except BaseException:
            budget.refund(len(recipients))
            raise
        self.metrics.messages_stored += 1
        if request_id is not None:
            self.recent_requests[(sender, request_id)] = message_id
            if len(self.recent_requests) > self.config.database.cache_request_ids:
                self.recent_requests.popitem(last=False)
        fields = p.message_fields(message_id, conversation.id, sender, sender_name, content,
                                  attachments, message_type, now)
        reached = self.hub.send_to(
            members, p.new_message(fields), (EventKind.MESSAGE, message_id, None), skip=origin
        )
        self.metrics.frames_out["new_message"] += len(reached)
        self.typing.stop(conversation.id, sender)
        return Sent(fields, len(reached) > (sender in reached), False)  # a recipient reached

    # -- conversations ---------------------------------------------------------------------

    async def create_conversation(
        self,
        creator: int,
        participant_ids: tuple[int, ...] | list[int],
        title: str | None = None,
        request_id: str | None = None,
        pitch_id: int | None = None,
        origin: Client | None = None,
        *,
        by_backend: bool = False,
    ) -> Created:
        """A new conversation of the creator and ``participant_ids``; ``conversation_created``
        to every other connection of every participant. Idempotent on ``request_id``.

        ``forbidden`` when ``conversations.create_policy`` is ``backend``, unless
        ``by_backend`` (the backend's own API, which is not subject to it)."""
        if not self.clients_create and not by_backend:
            raise p.ProtocolError(p.FORBIDDEN, CREATED_BY_BACKEND)
        others = [uid for uid in dict.fromkeys(participant_ids) if uid != creator]
        if not others:
            raise p.ProtocolError(
                p.INVALID_MESSAGE, "participantIds must name at least one other user"
            )
        members = [creator, *others]
        cap = self.config.limits.max_participants
        if len(members) > cap:
            raise p.ProtocolError(p.INVALID_MESSAGE, f"at most {cap} participants")
        if request_id is None:
            row = await self._create(creator, members, title, None, pitch_id)
        else:
            async with self.in_flight.hold(("conversation", creator, request_id)):
                existing = await self.store.conversation_by_request(creator, request_id)
                if existing is not None:
                    again = await self.conversations.get(existing)
                    if again is None:
                        raise StoreError(f"conversation {existing} vanished")
                    return Created(again, True)
                row = await self._create(creator, members, title, request_id, pitch_id)
        self.hub.send_to(row.members, p.conversation_created(row), skip=origin)
        return Created(row, False)

    async def _create(
        self,
        creator: int,
        members: list[int],
        title: str | None,
        request_id: str | None,
        pitch_id: int | None,
    ) -> ConversationRow:
        # Every other member gets a participant row now and conversation_created.
        budget = self.charge_deliveries(creator, len(members) - 1)
        try:
            row = await self.store.create_conversation(
                creator, members, title, request_id, pitch_id, p.now_iso()
            )
        except ConstraintViolation:
            # A user (or pitch) the database does not have: an existing Pitchey database
            # holds only the app's users, and pitch ids refer to its pitches.
            budget.refund(len(members) - 1)
            raise p.ProtocolError(
                p.INVALID_MESSAGE, "a participant or the pitch is not known"
            ) from None
        except BaseException:
            budget.refund(len(members) - 1)
            raise
        self.conversations.put(row)
        self.hub.add_contacts(members)
        return row

    # -- reads -----------------------------------------------------------------------------

    async def mark_read(self, reader: int, reader_name: str, message_id: int) -> Read | None:
        """Mark a message read by ``reader`` and tell its sender (PROTOCOL.md 4.3). None when
        nothing changed (already read, your own message, or another tab is marking it)."""
        key = (message_id, reader)
        if key in self.reads_in_flight:
            return None  # another tab of this user is marking it right now; it tells the sender
        # Claimed before the first await, so two tabs cannot both see it unread.
        self.reads_in_flight.add(key)
        try:
            found = await self.store.message_for_read(message_id, reader)
            if found is None:
                raise p.ProtocolError(p.FORBIDDEN, NOT_A_PARTICIPANT)
            message, read_at = found
            if await self.conversations.member_of(message.conversation_id, reader) is None:
                raise p.ProtocolError(p.FORBIDDEN, NOT_A_PARTICIPANT)
            if message.sender_id == reader or read_at is not None:
                return None  # nothing changes, nobody is told
            now = p.now_iso()
            await self.store.mark_read(message.id, reader, now)
        finally:
            self.reads_in_flight.discard(key)
        fields = p.read_fields(message.id, message.conversation_id, reader, reader_name, now)
        reached = self.hub.send_to(
            [message.sender_id], p.message_read(fields), (EventKind.READ, message.id, reader)
        )
        if reached:
            self.metrics.frames_out["message_read"] += 1
        return Read(message, now, bool(reached))

    # -- history ---------------------------------------------------------------------------

    async def history(
        self, conversation_id: int, viewer: int, before: int | None, limit: int | None
    ) -> tuple[list[MessageRow], bool]:
        """A page of history (at most ``history.page_size``), oldest first, and whether older
        messages exist. ``forbidden`` unless ``viewer`` is a participant."""
        await self.member_of(conversation_id, viewer)
        page = self.config.history.page_size
        size = min(limit, page) if limit is not None else page
        return await self.store.history(conversation_id, viewer, before, size)

    async def since(self, user_id: int, since: int) -> tuple[list[MessageRow], bool]:
        """Messages after ``since`` in the user's conversations, at most the replay limit."""
        return await self.store.since(user_id, since, self.config.delivery.replay_limit)

    async def pending(self, user_id: int) -> list[PendingEvent]:
        """The user's undelivered durable events, once this user's delivery records that are
        already queued are committed (or an event just delivered to another tab would be
        replayed too)."""
        await self.deliveries.settled(user_id)
        return await self.store.pending(user_id, self.config.delivery.replay_limit)

    # -- presence and typing ---------------------------------------------------------------

    def online_contacts(self, user_id: int) -> list[p.OnlineUser]:
        user = self.hub.users.get(user_id)
        if user is None:
            return []
        out = []
        for uid in sorted(self.hub.online_contacts(user)):
            other = self.hub.users[uid]
            out.append(p.OnlineUser(uid, other.username, other.user_type,
                                    other.last_seen if not other.clients else None))
        return out

    async def typing_in(self, conversation_id: int, user_id: int, is_typing: bool) -> None:
        row = await self.member_of(conversation_id, user_id)
        if is_typing:
            self.typing.start(row.id, user_id, row.members)
        else:
            self.typing.stop(row.id, user_id)

    # -- the inbox, detailed history, conversation reads (the HTTP API and get_conversations)

    async def conversation_list(
        self, user_id: int, before: tuple[str, int] | None, limit: int
    ) -> tuple[list[ConversationSummary], tuple[str, int] | None]:
        """A page of the user's inbox, most recent activity first, and the cursor of the next
        page (None on the last). ``limit`` is clamped to 1..INBOX_MAX."""
        size = max(1, min(limit, INBOX_MAX))
        rows, more = await self.store.conversation_list(user_id, before, size)
        last = rows[-1] if rows else None
        cursor = None
        if more and last is not None:
            cursor = (last.last_message_at or last.created_at, last.id)
        return rows, cursor

    async def history_details(
        self, conversation_id: int, viewer: int, before: int | None, limit: int | None
    ) -> tuple[list[MessageRow], dict[int, MessageDetail], bool]:
        """``history`` with each message's extra columns and read receipts."""
        rows, more = await self.history(conversation_id, viewer, before, limit)
        details = await self.store.message_details([r.id for r in rows])
        return rows, details, more

    async def mark_conversation_read(
        self, reader: int, reader_name: str, conversation_id: int, up_to: int | None
    ) -> int:
        """Mark the reader's unread messages in the conversation read (up to ``up_to``), and
        tell each sender as ``mark_read`` does (PROTOCOL.md 4.3). Returns how many changed.
        ``forbidden`` unless a participant. Bounded: at most READ_ALL_MAX per call."""
        await self.member_of(conversation_id, reader)
        ids = await self.store.unread_ids(conversation_id, reader, up_to, READ_ALL_MAX)
        # Claimed before the next await, as mark_read does: a tab marking one of these right
        # now keeps it (and tells the sender); this call skips it.
        senders = {mid: sender for mid, sender in ids if (mid, reader) not in self.reads_in_flight}
        keys = [(mid, reader) for mid in senders]
        self.reads_in_flight.update(keys)
        try:
            now = p.now_iso()
            await self.store.mark_read_many(list(senders), reader, now)
        finally:
            self.reads_in_flight.difference_update(keys)
        for mid, sender in senders.items():
            fields = p.read_fields(mid, conversation_id, reader, reader_name, now)
            reached = self.hub.send_to(
                [sender], p.message_read(fields), (EventKind.READ, mid, reader)
            )
            if reached:
                self.metrics.frames_out["message_read"] += 1
        return len(senders)
