"""Demo mode (``serve --demo``): a generated secret kept in the database, seeded users and
conversations in the spirit of Pitchey's personas, and a token endpoint for those users only.

Nothing here runs unless demo mode was asked for; see docs/security.md for what it exposes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from typing import Any

import config as cfg
from auth import Verifier
from protocol import iso_from_epoch, now_iso
from rows import PitchRow
from store import DuplicateRequest, NewMessage, Store, read_setting

SECRET_KEY = "demo_jwt_secret"
SEEDED_KEY = "demo_seeded"
TOKEN_TTL = 8 * 3600

USERS: tuple[tuple[int, str, str], ...] = (
    (1, "Maya Chen (creator)", "creator"),
    (2, "Victor Hale (investor)", "investor"),
    (3, "Northlight Studios (production)", "production"),
)
CONVERSATIONS: tuple[tuple[str | None, tuple[int, ...]], ...] = (
    (None, (1, 2)),
    (None, (1, 3)),
    ("The Last Lighthouse: financing", (1, 2, 3)),
)
# One public pitch and one private pitch of the creator; the investor may see the private one.
PITCHES = (
    PitchRow(1, 1, "The Last Lighthouse", "public", frozenset()),
    PitchRow(2, 1, "Salt and Static (private)", "private", frozenset({2})),
)
# The demo's "sign the NDA" button: the investor signs for the private pitch, and the creator
# gets nda_signed through the same publish path the backend uses.
NDA_EVENT = {"pitchId": 2, "signedBy": "Victor Hale (investor)", "signedById": 2}
NDA_TO = 1
WELCOME = (
    (0, 1, "Hi Victor! Thanks for looking at The Last Lighthouse. Happy to answer questions."),
    (0, 2, "Loved the pitch deck. What budget range are you targeting?"),
    (2, 3, "Welcome both. Northlight can cover post-production if the numbers work."),
)


@dataclasses.dataclass(frozen=True)
class Demo:
    auth: cfg.AuthConfig

    def users_json(self) -> list[dict[str, Any]]:
        return [{"userId": u, "username": n, "userType": t} for u, n, t in USERS]

    def token_response(self, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        """``GET /demo/token?userId=N`` for a demo user only: (status, body)."""
        raw = (query.get("userId") or [""])[0]
        known = {u: (n, t) for u, n, t in USERS}
        if not raw.isdecimal() or int(raw) not in known:
            ids = ", ".join(str(u) for u in known)
            return 400, {"error": "invalid_user", "message": f"userId must be one of {ids}"}
        user_id = int(raw)
        name, kind = known[user_id]
        verifier = Verifier(self.auth)
        token = verifier.mint(user_id, name, kind, TOKEN_TTL)
        expires = verifier.verify(token).expires_at
        return 200, {
            "token": token,
            "userId": user_id,
            "username": name,
            "userType": kind,
            "expiresAt": iso_from_epoch(expires) if expires else None,
        }


async def setup(store: Store, config: cfg.Config) -> Demo:
    """Use the configured secret, else the one kept in the database (made on first run);
    seed the demo users and conversations once (each seeded row carries a requestId, so a
    seeding cut short by a crash is completed, not repeated, on the next start)."""
    secret = config.auth.jwt_secret or await store.setting(SECRET_KEY)
    if not secret:
        secret = secrets.token_urlsafe(32)
        await store.put_setting(SECRET_KEY, secret)
    if await store.setting(SEEDED_KEY) is None:
        for user_id, name, kind in USERS:
            await store.save_profile(user_id, name, kind)
        now = now_iso()
        ids = []
        for number, (title, members) in enumerate(CONVERSATIONS):
            request_id = f"demo-conversation-{number}"
            try:
                row = await store.create_conversation(
                    members[0], members, title, request_id, None, now
                )
                ids.append(row.id)
            except DuplicateRequest:
                found = await store.conversation_by_request(members[0], request_id)
                assert found is not None
                ids.append(found)
        for number, (index, sender, text) in enumerate(WELCOME):
            members = CONVERSATIONS[index][1]
            recipients = [m for m in members if m != sender]
            with contextlib.suppress(DuplicateRequest):
                await store.add_message(NewMessage(
                    ids[index], sender, recipients[0] if len(members) == 2 else None,
                    recipients, text, "text", [], None, None, f"demo-message-{number}", now,
                ))
        await store.put_setting(SEEDED_KEY, now)
    for pitch in PITCHES:  # an upsert: also databases seeded before pitches existed
        await store.put_pitch(pitch, now_iso())
    auth = dataclasses.replace(config.auth, jwt_secret=secret, algorithms=("HS256",))
    return Demo(auth)


def stored_secret(db_path: str) -> str | None:
    """The demo secret in an existing database, for `pitchey_ws.py token --db`."""
    return read_setting(db_path, SECRET_KEY)
