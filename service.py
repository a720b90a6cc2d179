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

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, NamedTuple

import protocol as p
from backplane import TypingState, TypingTopic
from config import Config
from conversations import SHARED_ROWS_SECONDS, Conversations, RowCache
from delivery import DeliveryLog
from hub import Client, Hub
from limits import TokenBucket
from metrics import Metrics
from rows import (
    CommentRow,
    ConversationRow,
    ConversationSummary,
    EventKind,
    MessageDetail,
    MessageRow,
    NewNotification,
    NotificationRow,
    PendingEvent,
    PitchRow,
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
UNKNOWN_RECIPIENT = "recipientId is not a known user"
# The largest inbox page (PROTOCOL.md 8). "Mark the conversation read" changes READ_ALL_MAX
# messages per transaction, in at most READ_ALL_ROUNDS of them per request (100,000).
INBOX_MAX = 200
INBOX_DEFAULT = 50
READ_ALL_MAX = 1000
READ_ALL_ROUNDS = 100
# Frames from other daemons for one pitch held while this daemon reads the pitch again after
# a change (a read of one row: a handful at most arrive meanwhile; past this they are dropped).
MAX_HELD_PITCH_FRAMES = 1000
CREATED_BY_BACKEND = "Conversations on this server are created by the backend, not by clients"
NO_PITCH = "No such pitch, or you may not see it"
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
        # Pitches (PROTOCOL.md 9): the registered ones, least recently used first; the
        # connections subscribed to each (pitch_view), and each connection's subscriptions.
        # Where the app writes the database too, a pitch is read again after
        # SHARED_ROWS_SECONDS, and before a refusal (an NDA just signed).
        self.pitches: RowCache[PitchRow] = RowCache(
            config.database.cache_conversations,
            SHARED_ROWS_SECONDS if store.shared_with_app else None,
        )
        self.watching: dict[int, set[Client]] = {}
        # Pitches another daemon changed, being read again: their frames from other daemons
        # wait here until the watchers who may no longer see them are gone.
        self._rechecking: dict[int, list[dict[str, Any]]] = {}
        self._recheck_again: set[int] = set()  # changed again while being read
        self.subscriptions: dict[Client, set[int]] = {}
        self.pitch_typing = TypingTracker(hub, store, config.typing.ttl_seconds,
                                          announce=self._announce_pitch_typing,
                                          topic=TypingTopic.PITCH)
        hub.on_detach.append(self._unsubscribe_all)
        hub.on_last_close.append(self.pitch_typing.stop_user)

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
            if conversation is None or sender not in conversation.members:
                conversation = await self.conversations.member_of(conversation_id, sender)
            if conversation is None:
                raise p.ProtocolError(p.FORBIDDEN, NOT_A_PARTICIPANT)
        else:
            assert recipient_id is not None
            if recipient_id == sender:
                raise p.send_message_error("recipientId must be another user")
            if self.clients_create:
                known = self.conversations.knows_pair(sender, recipient_id)
                try:
                    conversation = await self.conversations.direct(sender, recipient_id, now)
                except ConstraintViolation:
                    # A user an existing Pitchey database does not have.
                    raise p.send_message_error(UNKNOWN_RECIPIENT) from None
                if not known:
                    self._share_conversation(conversation)  # maybe new: contacts elsewhere
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
        except ConstraintViolation:
            # On an existing Pitchey database pitchId refers to the app's pitches (and the
            # app may have deleted the conversation or a member meanwhile).
            budget.refund(len(recipients))
            raise p.send_message_error(
                "the pitch, the conversation or a member is not known"
            ) from None
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
        conversation_id: int | None = None,
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
            row = await self._create(creator, members, title, None, pitch_id, conversation_id)
        else:
            async with self.in_flight.hold(("conversation", creator, request_id)):
                existing = await self.store.conversation_by_request(creator, request_id)
                if existing is None:
                    try:
                        row = await self._create(creator, members, title, request_id, pitch_id)
                    except DuplicateRequest:
                        # The same retry reached another daemon, which stored it first (the
                        # unique index is the arbiter): answer with that conversation.
                        existing = await self.store.conversation_by_request(creator, request_id)
                        if existing is None:
                            raise
                if existing is not None:
                    again = await self.conversations.get(existing)
                    if again is None:
                        raise StoreError(f"conversation {existing} vanished")
                    return Created(again, True)
        self.hub.send_to(row.members, p.conversation_created(row), skip=origin)
        return Created(row, False)

    async def _create(
        self,
        creator: int,
        members: list[int],
        title: str | None,
        request_id: str | None,
        pitch_id: int | None,
        conversation_id: int | None = None,
    ) -> ConversationRow:
        # Every other member gets a participant row now and conversation_created.
        budget = self.charge_deliveries(creator, len(members) - 1)
        try:
            row = await self.store.create_conversation(
                creator, members, title, request_id, pitch_id, p.now_iso(),
                conversation_id=conversation_id,
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
        self._share_conversation(row)
        return row

    def one_at_a_time(self, *key: int | str) -> contextlib.AbstractAsyncContextManager[None]:
        """``Store.serialized`` where other daemons may race this one (a backplane); with one
        daemon the in-process holds suffice, and nothing is held."""
        if self.hub.shared:
            return self.store.serialized(*key)
        return contextlib.nullcontext()

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
            # Another daemon may be marking it (another tab of the reader): one at a time,
            # and the read state read again inside, so the sender is told once.
            async with self.one_at_a_time("read", message.conversation_id, reader):
                if self.hub.shared:
                    found = await self.store.message_for_read(message_id, reader)
                    if found is None or found[1] is not None:
                        return None
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

    async def online_users(self, user_id: int) -> list[p.OnlineUser]:
        """The caller's online contacts: this daemon's, or with other daemons the global
        presence (PROTOCOL.md 13)."""
        if not self.hub.shared:
            return self.online_contacts(user_id)
        user = self.hub.users.get(user_id)
        if user is None:
            return []
        found = await self.hub.backplane.online(user.contacts)
        out = []
        for uid in sorted(found):
            here = self.hub.users.get(uid)
            seen = found[uid]
            if here is not None:
                out.append(p.OnlineUser(uid, here.username, here.user_type,
                                        here.last_seen if not seen.connected else None))
            else:
                out.append(p.OnlineUser(uid, p.display_name(uid, seen.username),
                                        seen.user_type, None))
        return out

    async def conversation_changed(self, change: dict[str, Any]) -> None:
        """Another daemon created a conversation or changed its participants: drop the
        cached row (read again on next use), make its members contacts, and end what removed
        members had here (typing; presence with those they no longer share one with)."""
        conversation_id = change.get("conversation")
        if not isinstance(conversation_id, int):
            return
        self.conversations.forget(conversation_id)
        members = [m for m in change.get("members", ()) if isinstance(m, int)]
        removed = [m for m in change.get("removed", ()) if isinstance(m, int)]
        self.hub.add_contacts(members)
        for user_id in removed:
            self.typing.stop(conversation_id, user_id)
            user = self.hub.users.get(user_id)
            if user is not None:
                user.contacts = await self.store.contacts(user_id)
            for member in members:
                other = self.hub.users.get(member)
                if other is not None and user_id in other.contacts:
                    other.contacts = await self.store.contacts(member)

    def _share_conversation(self, row: ConversationRow, removed: frozenset[int] = frozenset()
                            ) -> None:
        if self.hub.shared:
            self.hub.backplane.invalidate({"conversation": row.id,
                                           "members": sorted(row.members),
                                           "removed": sorted(removed)})

    async def typing_in(self, conversation_id: int, user_id: int, is_typing: bool) -> None:
        row = await self.member_of(conversation_id, user_id)
        if is_typing:
            self.typing.start(row.id, user_id, row.members)
        else:
            self.typing.stop(row.id, user_id)

    async def typing_gone(self, states: list[TypingState]) -> None:
        """The typing states of a dead daemon this one claimed (backplane contract 7): each
        ends with one isTyping false to the participants, or the pitch's watchers, on every
        daemon, its ``typing_indicators`` row with it. Conversations and pitches are read
        first and the ends announced together, in one turn of the loop; one that cannot be
        read is logged and skipped (the client's own timeout ends it)."""
        ends: list[tuple[TypingTracker, TypingState, frozenset[int]]] = []
        for state in states:
            try:
                match state.topic:
                    case TypingTopic.CONVERSATION:
                        row = await self.conversations.get(state.topic_id)
                        if row is not None:
                            ends.append((self.typing, state, row.members))
                    case TypingTopic.PITCH:
                        if await self.pitch(state.topic_id) is not None:
                            ends.append((self.pitch_typing, state, frozenset()))
            except StoreError as exc:
                log.warning("typing of user %d on a dead daemon not ended: %s",
                            state.user_id, exc)
        for tracker, state, members in ends:
            tracker.end_elsewhere(state.topic_id, state.user_id, state.username, members)

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
        ``forbidden`` unless a participant. In transactions of READ_ALL_MAX messages, at most
        READ_ALL_ROUNDS of them per call."""
        await self.member_of(conversation_id, reader)
        marked = 0
        for _ in range(READ_ALL_ROUNDS):
            # The key of mark_read's: with other daemons, what is unread is read and marked
            # by one of them at a time, so each sender is told once.
            async with self.one_at_a_time("read", conversation_id, reader):
                ids = await self.store.unread_ids(conversation_id, reader, up_to, READ_ALL_MAX)
                # Claimed before the next await, as mark_read does: a tab marking one of these
                # right now keeps it (and tells the sender); this call skips it.
                senders = {mid: sender for mid, sender in ids
                           if (mid, reader) not in self.reads_in_flight}
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
            marked += len(senders)
            if len(ids) < READ_ALL_MAX or not senders:
                break
        return marked

    # -- participants (the backend's API) --------------------------------------------------

    async def change_participants(
        self, conversation_id: int, add: list[int], remove: list[int]
    ) -> ConversationRow | None:
        """Add and remove participants, effective at once on live connections: the cache is
        updated (removed users are ``forbidden`` from the next frame on and receive nothing
        more of it), their typing there ends, contacts are recomputed (presence stops between
        users who no longer share a conversation), and added users' connections get
        ``conversation_created``. None when the conversation does not exist."""
        if set(add) & set(remove):
            raise p.ProtocolError(p.INVALID_MESSAGE, "a user cannot be both added and removed")
        before = await self.conversations.get(conversation_id)
        if before is None:
            return None
        cap = self.config.limits.max_participants
        if len((before.members | set(add)) - set(remove)) > cap:
            raise p.ProtocolError(p.INVALID_MESSAGE, f"at most {cap} participants")
        row = await self.store.change_participants(conversation_id, add, remove, p.now_iso())
        if row is None:
            return None
        self.conversations.put(row)
        self.conversations.forget_pairs(conversation_id)
        removed = before.members - row.members
        added = row.members - before.members
        self._share_conversation(row, frozenset(removed))
        for user_id in removed:
            self.typing.stop(conversation_id, user_id)
        self.hub.add_contacts(row.members)
        for user_id in removed:
            user = self.hub.users.get(user_id)
            if user is not None:
                user.contacts = await self.store.contacts(user_id)
            for member in row.members:
                other = self.hub.users.get(member)
                if other is not None and user_id in other.contacts:
                    other.contacts = await self.store.contacts(member)
        if added:
            self.hub.send_to(added, p.conversation_created(row))
        return row

    # -- pitches (PROTOCOL.md 9) -----------------------------------------------------------

    async def pitch(self, pitch_id: int) -> PitchRow | None:
        row = self.pitches.fresh(pitch_id)
        return row if row is not None else await self._load_pitch(pitch_id)

    async def _load_pitch(self, pitch_id: int) -> PitchRow | None:
        row = await self.store.pitch(pitch_id)
        if row is not None:
            self.pitches.put(row.id, row)
        return row

    async def visible_pitch(self, pitch_id: int, user_id: int) -> PitchRow:
        """The pitch, or ``forbidden`` (the same whether it does not exist or is private).
        Where the app writes the database too, a refusal from memory is checked against it
        first (the app may just have published the pitch or recorded the user's NDA)."""
        row = self.pitches.fresh(pitch_id)
        if row is None or (not row.visible_to(user_id) and self.pitches.ttl is not None):
            row = await self._load_pitch(pitch_id)
        if row is None or not row.visible_to(user_id):
            raise p.ProtocolError(p.FORBIDDEN, NO_PITCH)
        return row

    async def put_pitch(self, row: PitchRow) -> None:
        """Register or update a pitch; connections of users who may no longer see it are
        unsubscribed (and stop typing there)."""
        async with self.in_flight.hold(("pitch", row.id)):
            await self.store.put_pitch(row, p.now_iso())
            # As stored: on an existing Pitchey database the app's row rules (owner, title,
            # status) and its NDA signers are allowed too.
            row = await self.store.pitch(row.id) or row
            self.pitches.put(row.id, row)
        self._drop_unseeing_watchers(row)
        if self.hub.shared:
            # Other daemons' watchers who may no longer see it go too (pitch_changed_elsewhere).
            self.hub.backplane.invalidate({"pitch_changed": row.id})

    def _drop_unseeing_watchers(self, row: PitchRow) -> None:
        for client in list(self.watching.get(row.id, ())):
            if not row.visible_to(client.user_id):
                self._unsubscribe(client, row.id)
                self.pitch_typing.stop(row.id, client.user_id)

    def pitch_changed_elsewhere(self, pitch_id: int) -> Coroutine[Any, Any, None] | None:
        """Another daemon registered or changed the pitch: the returned coroutine reads it
        again (None: a read is under way, and will be made again) and unsubscribes the
        connections here of users who may no longer see it. Until that is done, the pitch's
        frames from other daemons wait (they were written after the change)."""
        if pitch_id in self._rechecking:
            self._recheck_again.add(pitch_id)  # the read under way may predate this change
            return None
        self._rechecking[pitch_id] = []
        return self._recheck_watchers(pitch_id)

    async def _recheck_watchers(self, pitch_id: int) -> None:
        try:
            while True:
                self._recheck_again.discard(pitch_id)
                try:
                    row = await self._load_pitch(pitch_id)
                except StoreError:
                    log.warning("pitch %d changed elsewhere and cannot be read: its watchers"
                                " here are unsubscribed", pitch_id, exc_info=True)
                    row = None
                if row is None:
                    # Gone, or unknown now: fail closed (a watcher may subscribe again).
                    self.pitches.pop(pitch_id)
                    for client in list(self.watching.get(pitch_id, ())):
                        self._unsubscribe(client, pitch_id)
                else:
                    self._drop_unseeing_watchers(row)
                if pitch_id not in self._recheck_again:
                    break
        finally:
            self._recheck_again.discard(pitch_id)
            for change in self._rechecking.pop(pitch_id, []):
                self.pitch_frame_elsewhere(change)

    def _watchers(self, pitch_id: int, owner_id: int,
                  exclude_user: int | None = None) -> list[Client]:
        """The subscribed connections and every connection of the owner, each once."""
        out = dict.fromkeys(self.watching.get(pitch_id, ()))
        owner = self.hub.users.get(owner_id)
        if owner is not None:
            out.update(dict.fromkeys(owner.clients))
        return [c for c in out if c.user_id != exclude_user]

    def _non_owner_watchers(self, pitch_id: int, owner_id: int,
                            skip: Client | None) -> list[Client]:
        return [c for c in self.watching.get(pitch_id, ())
                if c.user_id != owner_id and c is not skip]

    def _to_watchers(self, pitch: PitchRow, text: str, *, owner: bool,
                     exclude_user: int | None = None, skip: Client | None = None) -> int:
        """Write a pitch frame to this daemon's watchers of the pitch (with the owner's
        connections when ``owner``), and have every other daemon do the same for its own
        (PROTOCOL.md 13: watchers may be connected anywhere). Returns the connections written
        to here."""
        if owner:
            clients = [c for c in self._watchers(pitch.id, pitch.owner_id, exclude_user)
                       if c is not skip]
        else:
            clients = [c for c in self._non_owner_watchers(pitch.id, pitch.owner_id, skip)
                       if c.user_id != exclude_user]
        written = self.hub.send_clients(clients, text)
        if self.hub.shared:
            self.hub.backplane.invalidate({"pitch": pitch.id, "ownerId": pitch.owner_id,
                                           "frame": text, "owner": owner,
                                           "exclude": exclude_user})
        return written

    def pitch_frame_elsewhere(self, change: dict[str, Any]) -> None:
        """A pitch frame another daemon wrote to its watchers: the same for the ones here
        (the owner's connections too, whether or not this daemon ever loaded the pitch)."""
        pitch_id, owner_id = change.get("pitch"), change.get("ownerId")
        if not isinstance(pitch_id, int):
            return
        if not isinstance(owner_id, int):
            # From a daemon of an earlier release (during a rolling upgrade): as it did.
            known = self.pitches.known(pitch_id)
            if known is None:
                return
            owner_id = known.owner_id
        held = self._rechecking.get(pitch_id)
        if held is not None:
            if len(held) < MAX_HELD_PITCH_FRAMES:
                held.append(change)
            return
        exclude = change.get("exclude")
        if not isinstance(exclude, int):
            exclude = None
        if bool(change.get("owner")):
            clients = self._watchers(pitch_id, owner_id, exclude)
        else:
            clients = [c for c in self._non_owner_watchers(pitch_id, owner_id, None)
                       if c.user_id != exclude]
        self.hub.send_clients(clients, str(change["frame"]))

    def _unsubscribe(self, client: Client, pitch_id: int) -> None:
        watchers = self.watching.get(pitch_id)
        if watchers is not None:
            watchers.discard(client)
            if not watchers:
                del self.watching[pitch_id]
        subs = self.subscriptions.get(client)
        if subs is not None:
            subs.discard(pitch_id)
            if not subs:
                del self.subscriptions[client]

    def _unsubscribe_all(self, client: Client) -> None:
        for pitch_id in list(self.subscriptions.get(client, ())):
            self._unsubscribe(client, pitch_id)

    async def pitch_view(self, client: Client, username: str, pitch_id: int) -> None:
        """Subscribe the connection; a user's first view raises viewCount and tells the
        watchers (the owner's frame names the viewer)."""
        pitch = await self.visible_pitch(pitch_id, client.user_id)
        subs = self.subscriptions.get(client, set())
        if pitch_id not in subs:
            cap = self.config.limits.max_pitch_subscriptions
            if len(subs) >= cap:
                raise p.ProtocolError(
                    p.INVALID_MESSAGE, f"at most {cap} pitch subscriptions per connection"
                )
            self.subscriptions.setdefault(client, set()).add(pitch_id)
            self.watching.setdefault(pitch_id, set()).add(client)
        user_id = client.user_id
        if await self.store.has_viewed(pitch_id, user_id):
            return  # the usual case (a page opened again), without a lock
        async with (self.in_flight.hold(("pitch_view", pitch_id, user_id)),
                    self.one_at_a_time("pitch_view", pitch_id, user_id)):
            if await self.store.has_viewed(pitch_id, user_id):
                return
            await self.store.add_view(pitch_id, user_id, p.now_iso())
        stats = await self.store.pitch_stats(pitch_id, user_id)
        self._to_watchers(pitch, p.pitch_viewed(pitch_id, stats.view_count), owner=False)
        self.hub.send_to([pitch.owner_id],
                         p.pitch_viewed(pitch_id, stats.view_count, (user_id, username)))

    async def pitch_leave(self, client: Client, pitch_id: int) -> None:
        await self.visible_pitch(pitch_id, client.user_id)
        self._unsubscribe(client, pitch_id)

    def _owner_notification(
        self, pitch: PitchRow, user_id: int, kind: str, fields: dict[str, Any]
    ) -> NewNotification | None:
        """Likes and comments by someone else are notifications for the owner."""
        if user_id == pitch.owner_id:
            return None
        return NewNotification(pitch.owner_id, kind, p.dumps(fields))

    def _pitch_event(
        self, pitch: PitchRow, kind: str, fields: dict[str, Any], notification_id: int | None,
        skip: Client | None = None,
    ) -> None:
        """The watchers' frame. The owner's connections get the notification instead when
        there is one (the same frame plus notificationId and createdAt, recorded as its
        delivery): one frame per event per connection, never two."""
        plain = p.event(kind, fields)
        self._to_watchers(pitch, plain, owner=False, skip=skip)
        if notification_id is None:
            self.hub.send_to([pitch.owner_id], plain, skip=skip)
            return
        row = NotificationRow(notification_id, pitch.owner_id, kind, p.dumps(fields),
                              fields["timestamp"], None)
        self.hub.send_to([pitch.owner_id], p.notification_frame(row),
                         (EventKind.NOTIFICATION, notification_id, pitch.owner_id), skip=skip)

    async def pitch_like(self, user_id: int, username: str, pitch_id: int, liked: bool) -> None:
        """Like or unlike (idempotent per user); a change tells the watchers."""
        pitch = await self.visible_pitch(pitch_id, user_id)
        async with (self.in_flight.hold(("pitch_like", pitch_id, user_id)),
                    self.one_at_a_time("pitch_like", pitch_id, user_id)):
            stats = await self.store.pitch_stats(pitch_id, user_id)
            if stats.liked_by_me == liked:
                return
            now = p.now_iso()
            count = stats.like_count + (1 if liked else -1)
            fields = p.like_fields(pitch_id, count, user_id, username, now)
            kind = "pitch_liked" if liked else "pitch_unliked"
            notify = self._owner_notification(pitch, user_id, kind, fields) if liked else None
            notification_id = await self.store.set_like(pitch_id, user_id, liked, now, notify)
        self._pitch_event(pitch, kind, fields, notification_id)

    async def pitch_comment(
        self, user_id: int, username: str, pitch_id: int, comment: str,
        request_id: str | None,
    ) -> dict[str, Any]:
        """Store a comment, tell the watchers (``new_comment``); return its fields for the
        ``comment_sent`` reply. Idempotent on ``(user, request_id)``: a repeat stores and
        sends nothing and returns the original."""
        pitch = await self.visible_pitch(pitch_id, user_id)
        if request_id is None:
            return await self._comment(pitch, user_id, username, comment, None)
        async with self.in_flight.hold(("comment", user_id, request_id)):
            known = await self.store.comment_by_request(user_id, request_id)
            if known is not None:
                return p.comment_fields(known)
            try:
                return await self._comment(pitch, user_id, username, comment, request_id)
            except DuplicateRequest:
                known = await self.store.comment_by_request(user_id, request_id)
                if known is None:
                    raise StoreError("duplicate comment with no stored comment") from None
                return p.comment_fields(known)

    async def _comment(
        self, pitch: PitchRow, user_id: int, username: str, comment: str,
        request_id: str | None,
    ) -> dict[str, Any]:
        now = p.now_iso()

        def fields_of(comment_id: int) -> dict[str, Any]:
            return p.comment_fields(
                CommentRow(comment_id, pitch.id, user_id, username, comment, now))

        def notify(comment_id: int) -> NewNotification:
            # The owner's notification carries the commentId the store assigns.
            return NewNotification(pitch.owner_id, "new_comment",
                                   p.dumps(fields_of(comment_id)))

        comment_id, notification_id = await self.store.add_comment(
            pitch.id, user_id, comment, request_id, now,
            notify if user_id != pitch.owner_id else None,
        )
        fields = fields_of(comment_id)
        self.pitch_typing.stop(pitch.id, user_id)
        # To every watcher, the commenting connection too when it watches (PROTOCOL.md 9;
        # the Pitchey page adds a comment to its list on new_comment only), which also
        # gets comment_sent, the answer to its request.
        self._pitch_event(pitch, "new_comment", fields, notification_id)
        return fields

    def _announce_pitch_typing(
        self, pitch_id: int, user_id: int, username: str | None, _: frozenset[int],
        typing: bool
    ) -> None:
        pitch = self.pitches.known(pitch_id)
        if pitch is None:
            return
        frame = p.pitch_user_typing(pitch_id, user_id, username, typing)
        self._to_watchers(pitch, frame, owner=True, exclude_user=user_id)

    async def pitch_typing_in(self, user_id: int, pitch_id: int, is_typing: bool) -> None:
        pitch = await self.visible_pitch(pitch_id, user_id)
        if is_typing:
            self.pitch_typing.start(pitch.id, user_id, frozenset())
        else:
            self.pitch_typing.stop(pitch.id, user_id)

    async def pitch_activity(
        self, user_id: int, pitch_id: int, before: int | None, limit: int | None
    ) -> dict[str, Any]:
        """The fields of ``pitch_activity``: counts, likedByMe, a page of comments (at most
        ``history.page_size``, oldest first) before ``before``."""
        pitch = await self.visible_pitch(pitch_id, user_id)
        page = self.config.history.page_size
        size = min(limit, page) if limit is not None else page
        stats = await self.store.pitch_stats(pitch_id, user_id)
        comments, more = await self.store.comments(pitch_id, before, size)
        return p.pitch_activity_fields(pitch, stats, comments, more)

    # -- notifications (PROTOCOL.md 10) ----------------------------------------------------

    async def notifications(
        self, user_id: int, before: int | None, limit: int | None, unread_only: bool
    ) -> tuple[list[NotificationRow], int, bool]:
        """A page of the user's notifications, newest first (at most notifications.page_size),
        the unread count and whether more exist."""
        page = self.config.notifications.page_size
        size = min(limit, page) if limit is not None else page
        rows, more = await self.store.notification_page(user_id, before, size, unread_only)
        unread = await self.store.unread_notifications(user_id)
        return rows, unread, more

    async def mark_notifications_read(
        self, user_id: int, ids: tuple[int, ...] | None
    ) -> tuple[list[int], int]:
        """Mark some (or all) of the user's notifications read; ``notifications_read`` goes to
        every connection of the user. Returns (ids that changed, unread count)."""
        changed = await self.store.mark_notifications_read(
            user_id, list(ids) if ids is not None else None, p.now_iso()
        )
        unread = await self.store.unread_notifications(user_id)
        self.hub.send_to([user_id], p.notifications_read(changed, unread))
        return changed, unread

    async def prune_loop(self) -> None:
        """Background: drop notifications past retention_days and beyond max_per_user, now
        and every prune_interval_seconds (kept in hub.Background, cancelled at shutdown)."""
        settings = self.config.notifications
        while True:
            cutoff = p.iso_from_epoch(time.time() - settings.retention_days * 86400)
            try:
                await self.store.prune_notifications(settings.max_per_user, cutoff)
            except StoreError as exc:
                log.warning("pruning notifications failed: %s", exc)
            await asyncio.sleep(settings.prune_interval_seconds)

    # -- publish (PROTOCOL.md 11) ----------------------------------------------------------

    async def publish(
        self, users: list[int] | None, pitch_id: int | None, conversation_id: int | None,
        kind: str, fields: dict[str, Any], durable: bool, key: str | None,
    ) -> dict[str, Any]:
        """The backend's publish: ``{delivered, stored, notificationIds}``. The caller checked
        the type and fields. With ``key``, a repeat returns the first answer and does
        nothing."""
        if key is None:
            return await self._publish(users, pitch_id, conversation_id, kind, fields, durable,
                                       None)
        async with self.in_flight.hold(("publish", key)):
            known = await self.store.publish_answer(key)
            claimed: str | None = None
            if known is None and not (users is not None and durable):
                # A publish that stores nothing else claims its key before anything is sent:
                # the same key reaching another daemon at the same moment sends nothing and
                # answers the claim (delivered 0 until the first one's fan-out is counted).
                placeholder = p.dumps({"delivered": 0, "stored": 0, "notificationIds": []})
                if await self.store.claim_publish(key, placeholder, p.now_iso()):
                    claimed = placeholder
                else:
                    known = await self.store.publish_answer(key)
            if known is None:
                try:
                    return await self._publish(users, pitch_id, conversation_id, kind, fields,
                                               durable, key)
                except DuplicateRequest:
                    # The same durable publish reached another daemon, which stored it first.
                    known = await self.store.publish_answer(key)
                    if known is None:
                        raise
                except Exception:
                    if claimed is not None:
                        # Refused or failed before anything was sent (_publish raises nothing
                        # once it has sent): a retry with the key must do it, not answer
                        # this claim.
                        await self.store.release_publish(key, claimed)
                    raise
            answer: dict[str, Any] = p.loads(known)
            return answer

    async def _publish(
        self, users: list[int] | None, pitch_id: int | None, conversation_id: int | None,
        kind: str, fields: dict[str, Any], durable: bool, key: str | None,
    ) -> dict[str, Any]:
        now = p.now_iso()
        text = p.dumps(fields)
        ids: list[int] = []
        delivered = 0
        if users is not None and durable:
            notes = [NewNotification(u, kind, text) for u in users]
            ids = await self.store.add_notifications(
                notes, now, key,
                lambda got: p.dumps({"delivered": 0, "stored": len(got),
                                     "notificationIds": got}),
            )
            for user_id, nid in zip(users, ids, strict=True):
                note = NotificationRow(nid, user_id, kind, text, now, None)
                if self.hub.send_to([user_id], p.notification_frame(note),
                                    (EventKind.NOTIFICATION, nid, user_id)):
                    delivered += 1
        elif users is not None:
            delivered = len(self.hub.send_to(users, p.event(kind, {"timestamp": now, **fields})))
        elif pitch_id is not None:
            pitch = await self.pitch(pitch_id)
            if pitch is None:
                raise p.ProtocolError(p.INVALID_MESSAGE, f"unknown pitch {pitch_id}")
            # Every pitch frame names its pitch (PROTOCOL.md 9): usePitchUpdates drops the
            # ones whose pitchId is not the page's.
            frame = p.event(kind, {"timestamp": now, **fields, "pitchId": pitch_id})
            delivered = self._to_watchers(pitch, frame, owner=True)
        else:
            assert conversation_id is not None
            conversation = await self.conversations.get(conversation_id)
            if conversation is None:
                raise p.ProtocolError(p.INVALID_MESSAGE,
                                      f"unknown conversation {conversation_id}")
            frame = p.event(kind, {"timestamp": now, **fields,
                                   "conversationId": conversation_id})
            delivered = len(self.hub.send_to(conversation.members, frame))
        self.metrics.frames_out["published"] += delivered
        answer = {"delivered": delivered, "stored": len(ids), "notificationIds": ids}
        if key is not None:
            try:
                await self.store.put_publish_answer(key, p.dumps(answer), now)
            except StoreError:
                # Sent already: a retry must not send again, so the key keeps what it holds
                # (the notifications' or the claim's answer, delivered 0) and this one stands.
                log.warning("publish %r: its final answer was not stored", key, exc_info=True)
        return answer

