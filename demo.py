"""Demo mode (``serve --demo``): a generated secret kept in the database, seeded users and
conversations in the spirit of Pitchey's personas, and a token endpoint for those users only.

Nothing here runs unless demo mode was asked for; see docs/security.md for what it exposes.
"""

from __future__ import annotations

import dataclasses
import secrets
import sqlite3
from typing import Any

import config as cfg
import store as st
from auth import Verifier
from protocol import iso_from_epoch, now_iso

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


async def setup(store: st.Store, config: cfg.Config) -> Demo:
    """Use the configured secret, else the one kept in the database (made on first run);
    seed the demo users and conversations once."""
    secret = config.auth.jwt_secret or await store.setting(SECRET_KEY)
    write = st.Write()
    if not secret:
        secret = secrets.token_urlsafe(32)
        st.put_setting(write, SECRET_KEY, secret)
    if await store.setting(SEEDED_KEY) is None:
        for user_id, name, kind in USERS:
            st.upsert_user(write, user_id, name, kind)
        now = now_iso()
        ids = []
        for title, members in CONVERSATIONS:
            cid = store.new_conversation_id()
            ids.append(cid)
            st.create_conversation(
                write, cid, members[0], members, title, len(members) > 2, None, None, now
            )
        for index, sender, text in WELCOME:
            members = CONVERSATIONS[index][1]
            recipients = [m for m in members if m != sender]
            st.insert_message(
                write, store.new_message_id(), ids[index], sender,
                recipients[0] if len(members) == 2 else None, recipients, text, "text", [],
                None, None, None, now,
            )
        st.put_setting(write, SEEDED_KEY, now)
    await store.submit(write)
    auth = dataclasses.replace(config.auth, jwt_secret=secret, algorithms=("HS256",))
    return Demo(auth)


def stored_secret(db_path: str) -> str | None:
    """The demo secret in an existing database, for `pitchey_ws.py token --db`."""
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        row = db.execute("SELECT value FROM settings WHERE key = ?", (SECRET_KEY,)).fetchone()
    except sqlite3.Error:
        return None
    finally:
        db.close()
    return row[0] if row else None
