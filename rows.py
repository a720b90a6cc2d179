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
    pitch_id: int | None = None


class UserRow(NamedTuple):
    id: int
    username: str | None
    user_type: str | None
    last_seen: str | None


class EventKind(enum.Enum):
    """The durable events a user can be owed: each is delivered once, or replayed."""

    MESSAGE = "new_message"  # a message to one of its recipients
    READ = "message_read"  # a read notice to a message's sender
    NOTIFICATION = "notification"  # a stored notification to its user (PROTOCOL.md 10)


# (kind, message id, who): for MESSAGE, who is the recipient; for READ, the reader. The user
# the event is owed to is the recipient for MESSAGE and the message's sender for READ.
# For NOTIFICATION: (kind, notification id, its user).
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


class NotificationRow(NamedTuple):
    """A stored notification (PROTOCOL.md 10). ``fields`` is the event's JSON object (text),
    without ``type``."""

    id: int
    user_id: int
    type: str
    fields: str
    created_at: str
    read_at: str | None


class NewNotification(NamedTuple):
    """A notification to store: its user, its type and its fields (a JSON object as text)."""

    user_id: int
    type: str
    fields: str


@dataclass(frozen=True, slots=True)
class PendingNotification:
    """A notification its user has not been sent; queued since it was created."""

    queued_at: str  # = created_at
    notification: NotificationRow


PendingEvent = PendingMessage | PendingRead | PendingNotification


class PitchRow(NamedTuple):
    """A pitch the backend (or the demo seed) registered (PROTOCOL.md 9)."""

    id: int
    owner_id: int
    title: str
    visibility: str  # "public" or "private"
    allowed: frozenset[int]  # who may see a private pitch besides its owner

    def visible_to(self, user_id: int) -> bool:
        return (self.visibility == "public" or user_id == self.owner_id
                or user_id in self.allowed)


class CommentRow(NamedTuple):
    id: int
    pitch_id: int
    user_id: int
    username: str | None
    content: str
    created_at: str


class PitchStats(NamedTuple):
    view_count: int
    like_count: int
    liked_by_me: bool


class ConversationSummary(NamedTuple):
    """One entry of a user's conversation list (the inbox), as seen by that user."""

    id: int
    title: str | None
    pitch_id: int | None
    is_group: bool
    last_message_at: str | None
    created_at: str
    others: list[UserRow]  # the other active participants
    last_message: MessageRow | None
    unread_count: int  # messages of others the user has not read
    pitch_title: str | None = None  # the title of the pitch it is about, if known


class Receipt(NamedTuple):
    user_id: int
    username: str | None
    delivered_at: str | None
    read_at: str | None


class MessageDetail(NamedTuple):
    """The columns of a message that the HTTP history adds to the 4.4 entry."""

    receiver_id: int | None
    parent_message_id: int | None
    subject: str | None
    is_edited: bool
    is_deleted: bool
    edited_at: str | None
    sender_user_type: str | None
    receipts: list[Receipt]
