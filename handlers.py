"""The handler table: one entry per client command type (PROTOCOL.md section 3).

A handler translates a parsed command into a service call and the result into a reply frame
for the connection it came on. Protocol errors it raises become ``error`` frames in
``connection.dispatch``, which also adds the frame's requestId.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import protocol as p
from auth import AuthError, Verifier
from hub import Client, iso_expiry
from metrics import Metrics
from rows import EventKind
from service import INBOX_DEFAULT, Service

Handler = Callable[[Client, Any], Awaitable[None]]


class Handlers:
    def __init__(
        self,
        service: Service,
        metrics: Metrics,
        verifier: Callable[[], Verifier],
        arm_expiry: Callable[[Client], None],
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.verifier = verifier
        self.arm_expiry = arm_expiry
        self.table: dict[type[p.Command], Handler] = {
            p.Ping: self.on_ping,
            p.SendMessage: self.on_send_message,
            p.Typing: self.on_typing,
            p.MarkRead: self.on_mark_read,
            p.JoinConversation: self.on_join_conversation,
            p.GetOnlineUsers: self.on_get_online_users,
            p.CreateConversation: self.on_create_conversation,
            p.GetMessages: self.on_get_messages,
            p.Sync: self.on_sync,
            p.RefreshToken: self.on_refresh_token,
            p.GetConversations: self.on_get_conversations,
            p.PitchView: self.on_pitch_view,
            p.PitchLeave: self.on_pitch_leave,
            p.PitchLike: self.on_pitch_like,
            p.PitchComment: self.on_pitch_comment,
            p.PitchTyping: self.on_pitch_typing,
            p.GetPitchActivity: self.on_get_pitch_activity,
            p.GetNotifications: self.on_get_notifications,
            p.MarkNotificationsRead: self.on_mark_notifications_read,
        }

    def reply(self, client: Client, frame: str, kind: str) -> None:
        self.metrics.frames_out[kind] += 1
        client.send(frame)

    async def on_ping(self, client: Client, _: p.Ping) -> None:
        self.reply(client, p.pong(client.user_id), "pong")

    async def on_send_message(self, client: Client, cmd: p.SendMessage) -> None:
        user = client.user
        assert user is not None
        sent = await self.service.send_message(
            client.user_id, user.username, cmd.conversation_id, cmd.recipient_id, cmd.content,
            cmd.message_type, [a.to_wire() for a in cmd.attachments] if cmd.attachments else None,
            cmd.pitch_id, cmd.subject, cmd.request_id, client,
        )
        self.reply(client, p.message_sent(sent.fields, sent.delivered, cmd.request_id),
                   "message_sent")

    async def on_typing(self, client: Client, cmd: p.Typing) -> None:
        await self.service.typing_in(cmd.conversation_id, client.user_id, cmd.is_typing)

    async def on_mark_read(self, client: Client, cmd: p.MarkRead) -> None:
        user = client.user
        assert user is not None
        await self.service.mark_read(client.user_id, user.username, cmd.message_id)

    async def on_join_conversation(self, client: Client, cmd: p.JoinConversation) -> None:
        rows, _ = await self.service.history(cmd.conversation_id, client.user_id, None, None)
        self.reply(client, p.conversation_joined(cmd.conversation_id, rows),
                   "conversation_joined")

    async def on_get_messages(self, client: Client, cmd: p.GetMessages) -> None:
        rows, has_more = await self.service.history(
            cmd.conversation_id, client.user_id, cmd.before_message_id, cmd.limit
        )
        self.reply(client, p.messages_page(cmd.conversation_id, rows, has_more), "messages")

    async def on_get_online_users(self, client: Client, _: p.GetOnlineUsers) -> None:
        users = await self.service.online_users(client.user_id)
        self.reply(client, p.online_users(users), "online_users")

    async def on_create_conversation(self, client: Client, cmd: p.CreateConversation) -> None:
        created = await self.service.create_conversation(
            client.user_id, cmd.participant_ids, cmd.title, cmd.request_id, cmd.pitch_id,
            origin=client,
        )
        self.reply(client, p.conversation_created(created.conversation, cmd.request_id),
                   "conversation_created")

    async def on_sync(self, client: Client, cmd: p.Sync) -> None:
        rows, has_more = await self.service.since(client.user_id, cmd.since_message_id)
        user_id = client.user_id
        await client.write_events(rows, lambda row: (
            p.queued_new_message(row, row.sent_at),
            (EventKind.MESSAGE, row.id, user_id) if row.sender_id != user_id else None,
        ))
        self.metrics.frames_out["queued_message"] += len(rows)
        last = rows[-1].id if rows else cmd.since_message_id
        self.reply(client, p.sync_complete(last, has_more), "sync_complete")

    async def on_refresh_token(self, client: Client, cmd: p.RefreshToken) -> None:
        try:
            identity = self.verifier().verify(cmd.token, leeway=False)
        except AuthError as exc:
            raise p.ProtocolError(p.FORBIDDEN, f"Token refused: {exc.message}") from None
        if identity.user_id != client.user_id:
            raise p.ProtocolError(p.FORBIDDEN, "Token is for another user")
        client.expires_at = identity.expires_at
        self.arm_expiry(client)
        self.reply(client, p.token_refreshed(iso_expiry(identity.expires_at)), "token_refreshed")

    async def on_get_conversations(self, client: Client, cmd: p.GetConversations) -> None:
        rows, cursor = await self.service.conversation_list(
            client.user_id, cmd.before, cmd.limit if cmd.limit is not None else INBOX_DEFAULT
        )
        self.reply(client, p.conversations(rows, cursor, cmd.request_id), "conversations")

    # -- pitch activity (PROTOCOL.md 9) ----------------------------------------------------

    async def on_pitch_view(self, client: Client, cmd: p.PitchView) -> None:
        user = client.user
        assert user is not None
        await self.service.pitch_view(client, user.username, cmd.pitch_id)

    async def on_pitch_leave(self, client: Client, cmd: p.PitchLeave) -> None:
        await self.service.pitch_leave(client, cmd.pitch_id)

    async def on_pitch_like(self, client: Client, cmd: p.PitchLike) -> None:
        user = client.user
        assert user is not None
        await self.service.pitch_like(client.user_id, user.username, cmd.pitch_id, cmd.liked)

    async def on_pitch_comment(self, client: Client, cmd: p.PitchComment) -> None:
        user = client.user
        assert user is not None
        fields = await self.service.pitch_comment(
            client.user_id, user.username, cmd.pitch_id, cmd.comment, cmd.request_id
        )
        self.reply(client, p.comment_sent(fields, cmd.request_id), "comment_sent")

    async def on_pitch_typing(self, client: Client, cmd: p.PitchTyping) -> None:
        await self.service.pitch_typing_in(client.user_id, cmd.pitch_id, cmd.is_typing)

    async def on_get_pitch_activity(self, client: Client, cmd: p.GetPitchActivity) -> None:
        fields = await self.service.pitch_activity(
            client.user_id, cmd.pitch_id, cmd.before_comment_id, cmd.limit
        )
        self.reply(client, p.pitch_activity(fields, cmd.request_id), "pitch_activity")

    # -- notifications (PROTOCOL.md 10) ----------------------------------------------------

    async def on_get_notifications(self, client: Client, cmd: p.GetNotifications) -> None:
        rows, unread, more = await self.service.notifications(
            client.user_id, cmd.before_id, cmd.limit, cmd.unread_only
        )
        self.reply(client, p.notifications_page(rows, unread, more, cmd.request_id),
                   "notifications")

    async def on_mark_notifications_read(
        self, client: Client, cmd: p.MarkNotificationsRead
    ) -> None:
        # notifications_read goes to every connection of the user, this one included.
        await self.service.mark_notifications_read(client.user_id, cmd.notification_ids)
