"""Row types shared by the store engines, the service layer and the wire protocol. No I/O.

A leaf module: it imports nothing of the daemon's, so ``protocol.py`` can build every frame
from these rows without importing the store.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple


class MessageRow(NamedTuple):
    id: int
    conversation_id: int
    sender_id: int
    sender_name: str | None
    content: str
    attachments: str  # JSON text
    message_type: str
    sent_at: str
    is_read: bool  # computed for the viewer (see Store.history)


class ConversationRow(NamedTuple):
    id: int
    title: str | None
    is_group: bool
    created_by: int
    members: frozenset[int]  # active participants


class UserRow(NamedTuple):
    id: int
    username: str | None
    user_type: str | None
    last_seen: str | None


class EventKind(enum.Enum):
    """The durable events a user can be owed: each is delivered once, or replayed."""

    MESSAGE = "new_message"  # a message to one of its recipients
    READ = "message_read"  # a read notice to a message's sender


# (kind, message id, who): for MESSAGE, who is the recipient; for READ, the reader. The user
# the event is owed to is the recipient for MESSAGE and the message's sender for READ.
Event = tuple[EventKind, int, int]


@dataclass(frozen=True, slots=True)
class PendingMessage:
    """A message its recipient has not been sent; queued since the message was sent."""

    queued_at: str
    message: MessageRow


@dataclass(frozen=True, slots=True)
class PendingRead:
    """A read notice its sender has not been sent; queued since the message was read."""

    queued_at: str  # = read_at
    message_id: int
    conversation_id: int
    reader_id: int
    reader_name: str | None


PendingEvent = PendingMessage | PendingRead
