-- pitchey-ws schema, version 3. Applied idempotently at every start (CREATE ... IF NOT EXISTS).
-- Later changes are numbered migrations in store.py, keyed on PRAGMA user_version.
-- Timestamps are ISO-8601 UTC strings with milliseconds and Z, so they sort as text.
-- Ids are assigned by the single writer (see store.py), so INTEGER PRIMARY KEY without AUTOINCREMENT.

CREATE TABLE IF NOT EXISTS users (
    id          INTEGER PRIMARY KEY,
    username    TEXT,
    user_type   TEXT,
    last_seen   TEXT,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS conversations (
    id              INTEGER PRIMARY KEY,
    pitch_id        INTEGER,
    created_by_id   INTEGER NOT NULL REFERENCES users(id),
    title           TEXT,
    is_group        INTEGER NOT NULL DEFAULT 0,
    last_message_at TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    request_id      TEXT
);
-- create_conversation idempotency: one conversation per (creator, requestId).
CREATE UNIQUE INDEX IF NOT EXISTS conversations_request
    ON conversations(created_by_id, request_id) WHERE request_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS conversation_participants (
    conversation_id    INTEGER NOT NULL REFERENCES conversations(id),
    user_id            INTEGER NOT NULL REFERENCES users(id),
    is_active          INTEGER NOT NULL DEFAULT 1,
    joined_at          TEXT NOT NULL,
    left_at            TEXT,
    mute_notifications INTEGER NOT NULL DEFAULT 0,
    UNIQUE(conversation_id, user_id)
);
-- "my conversations" and "my contacts" start from the user.
CREATE INDEX IF NOT EXISTS participants_user
    ON conversation_participants(user_id, conversation_id);

-- The direct (1:1) conversation of each pair of users, so "message this user" finds or makes
-- exactly one. Added in version 2 (store_sqlite.py fills it for older databases).
CREATE TABLE IF NOT EXISTS direct_conversations (
    user_low        INTEGER NOT NULL REFERENCES users(id),
    user_high       INTEGER NOT NULL REFERENCES users(id),
    conversation_id INTEGER NOT NULL UNIQUE REFERENCES conversations(id),
    PRIMARY KEY (user_low, user_high),
    CHECK (user_low < user_high)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS messages (
    id                INTEGER PRIMARY KEY,
    conversation_id   INTEGER NOT NULL REFERENCES conversations(id),
    sender_id         INTEGER NOT NULL REFERENCES users(id),
    receiver_id       INTEGER,
    pitch_id          INTEGER,
    parent_message_id INTEGER,
    subject           TEXT,
    content           TEXT NOT NULL,
    message_type      TEXT NOT NULL DEFAULT 'text',
    attachments       TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(attachments)),
    is_read           INTEGER NOT NULL DEFAULT 0,
    is_edited         INTEGER NOT NULL DEFAULT 0,
    is_deleted        INTEGER NOT NULL DEFAULT 0,
    sent_at           TEXT NOT NULL,
    read_at           TEXT,
    edited_at         TEXT,
    deleted_at        TEXT,
    request_id        TEXT
);
-- History pages walk one conversation by id.
CREATE INDEX IF NOT EXISTS messages_conversation ON messages(conversation_id, id);
-- send_message idempotency: one message per (sender, requestId), across restarts.
CREATE UNIQUE INDEX IF NOT EXISTS messages_request
    ON messages(sender_id, request_id) WHERE request_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS message_read_receipts (
    message_id       INTEGER NOT NULL REFERENCES messages(id),
    user_id          INTEGER NOT NULL REFERENCES users(id),
    delivered_at     TEXT,
    read_at          TEXT,
    -- when the sender was told about read_at (message_read); NULL while that notice is owed
    read_notified_at TEXT,
    -- the message's sender (a copy of messages.sender_id, added in version 2), so the notices
    -- owed to one sender are found from the sender (receipts_read_owed), not by walking the
    -- notices owed to everybody
    sender_id        INTEGER,
    -- The reference's UNIQUE(message_id, user_id), as the key of a table without rowids:
    -- one b-tree less to write for every recipient of every message.
    PRIMARY KEY (message_id, user_id)
) WITHOUT ROWID;
-- Each user's unread receipts, undelivered ones first: offline delivery walks the
-- (user_id, 1) prefix (what the user has not been sent; an undelivered message is always
-- unread, since marking read also sets delivered_at), the inbox's unread counts and "mark the
-- conversation read" the user_id prefix. One partial index for both, so a receipt costs one
-- index entry, as the undelivered-only index of version 1 did. Queries must spell the second
-- column as (delivered_at IS NULL) for the planner to use it.
CREATE INDEX IF NOT EXISTS receipts_unread
    ON message_read_receipts(user_id, (delivered_at IS NULL), message_id) WHERE read_at IS NULL;
-- Read notices owed to each sender, in the order replay sends them (read_at, message_id):
-- a connect reads only the notices owed to that user. (Version 2 before this release's end
-- had receipts_read_unnotified on (message_id) alone, which every sender's replay walked.)
CREATE INDEX IF NOT EXISTS receipts_read_owed
    ON message_read_receipts(sender_id, read_at, message_id)
    WHERE read_at IS NOT NULL AND read_notified_at IS NULL;

CREATE TABLE IF NOT EXISTS typing_indicators (
    conversation_id INTEGER NOT NULL REFERENCES conversations(id),
    user_id         INTEGER NOT NULL REFERENCES users(id),
    is_typing       INTEGER NOT NULL DEFAULT 0,
    updated_at      TEXT NOT NULL,
    UNIQUE(conversation_id, user_id)
);

-- Pitches (PROTOCOL.md 9), registered by the backend (PUT /api/pitches/{id}) or the demo seed.
-- Added in version 3, like every table below down to settings.
CREATE TABLE IF NOT EXISTS pitches (
    id         INTEGER PRIMARY KEY,
    owner_id   INTEGER NOT NULL,
    title      TEXT NOT NULL,
    visibility TEXT NOT NULL CHECK (visibility IN ('public', 'private')),
    updated_at TEXT NOT NULL
);
-- Who may see a private pitch besides its owner.
CREATE TABLE IF NOT EXISTS pitch_allowed (
    pitch_id INTEGER NOT NULL REFERENCES pitches(id),
    user_id  INTEGER NOT NULL,
    PRIMARY KEY (pitch_id, user_id)
) WITHOUT ROWID;
-- One row per distinct viewer: viewCount is COUNT(*) of a pitch's prefix.
CREATE TABLE IF NOT EXISTS pitch_views (
    pitch_id  INTEGER NOT NULL REFERENCES pitches(id),
    user_id   INTEGER NOT NULL,
    viewed_at TEXT NOT NULL,
    PRIMARY KEY (pitch_id, user_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pitch_likes (
    pitch_id INTEGER NOT NULL REFERENCES pitches(id),
    user_id  INTEGER NOT NULL,
    liked_at TEXT NOT NULL,
    PRIMARY KEY (pitch_id, user_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pitch_comments (
    id         INTEGER PRIMARY KEY,
    pitch_id   INTEGER NOT NULL REFERENCES pitches(id),
    user_id    INTEGER NOT NULL,
    content    TEXT NOT NULL,
    created_at TEXT NOT NULL,
    request_id TEXT
);
CREATE INDEX IF NOT EXISTS pitch_comments_pitch ON pitch_comments(pitch_id, id);
-- pitch_comment idempotency: one comment per (user, requestId), across restarts.
CREATE UNIQUE INDEX IF NOT EXISTS pitch_comments_request
    ON pitch_comments(user_id, request_id) WHERE request_id IS NOT NULL;

-- Notifications (PROTOCOL.md 10): durable events for one user. delivered_at is set when one was
-- written to a live connection; until then it is replayed on the user's next connection.
CREATE TABLE IF NOT EXISTS notifications (
    id           INTEGER PRIMARY KEY,
    user_id      INTEGER NOT NULL,
    type         TEXT NOT NULL,
    fields       TEXT NOT NULL CHECK (json_valid(fields)),
    created_at   TEXT NOT NULL,
    delivered_at TEXT,
    read_at      TEXT
);
CREATE INDEX IF NOT EXISTS notifications_user ON notifications(user_id, id);
CREATE INDEX IF NOT EXISTS notifications_undelivered
    ON notifications(user_id, id) WHERE delivered_at IS NULL;
CREATE INDEX IF NOT EXISTS notifications_unread
    ON notifications(user_id, id) WHERE read_at IS NULL;
CREATE INDEX IF NOT EXISTS notifications_created ON notifications(created_at);
-- POST /api/publish idempotency: the answer given to each idempotencyKey.
CREATE TABLE IF NOT EXISTS publish_requests (
    key        TEXT PRIMARY KEY,
    answer     TEXT NOT NULL CHECK (json_valid(answer)),
    created_at TEXT NOT NULL
);

-- Daemon-owned settings, such as the demo mode's generated secret.
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
