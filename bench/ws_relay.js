// Reference (d) for the benchmark: the bare chat relay of bench/relay.py, on Node and `ws`.
//
// Same frames and behaviour as bench/relay.py: `connected` on open, `create_conversation` ->
// `conversation_created`, `send_message` -> `message_sent` to the sender and `new_message` to
// every other connection of every participant (encoded once, written to each), `ping` ->
// `pong`, GET /api/health. The same server options: no compression, 64 KiB frames, a ping
// every 20 s (a connection that has not answered the previous one is dropped); a listen
// backlog of 4,096, the daemon's. The token's payload is read but its signature is not
// checked; no database, no checks, no limits. What Node's event loop and the `ws` package
// (pinned in bench/package.json) reach for this protocol, next to the Python relay.
//
//     node bench/ws_relay.js --port 8765 [--host 127.0.0.1]
"use strict";

const http = require("node:http");
const { WebSocketServer } = require("ws");

const WS_PATH = "/api/messages/ws";
const KEEPALIVE_MS = 20000;
const BACKLOG = 4096; // the daemon's server.backlog (Node's default is 511)

function option(name, fallback) {
  const i = process.argv.indexOf(name);
  return i > 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

function nowIso() {
  return new Date().toISOString(); // 2026-01-01T00:00:00.000Z, as relay.py's now_iso()
}

function encode(type, fields) {
  return JSON.stringify({ type, ...fields });
}

// The JWT payload, signature NOT checked (this is a reference, not a server).
function unverifiedClaims(token) {
  try {
    const claims = JSON.parse(Buffer.from(token.split(".")[1], "base64url").toString("utf8"));
    return claims !== null && typeof claims === "object" ? claims : {};
  } catch {
    return {};
  }
}

function respond(res, status, body) {
  res.writeHead(status, {
    "Content-Type": "application/json",
    "Content-Length": Buffer.byteLength(body),
  });
  res.end(body);
}

function reject(socket, status, reason, body) {
  socket.end(
    `HTTP/1.1 ${status} ${reason}\r\nContent-Type: application/json\r\n` +
      `Content-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
  );
}

class Relay {
  constructor() {
    this.connections = new Map(); // userId -> Set of sockets
    this.members = new Map(); // conversationId -> array of userIds
    this.nextConversation = 1;
    this.nextMessage = 1;
    this.open = 0;
    this.wss = new WebSocketServer({
      noServer: true,
      perMessageDeflate: false,
      maxPayload: 65536,
      clientTracking: true,
    });
  }

  health(res) {
    const body = JSON.stringify({ status: "healthy", timestamp: nowIso(), connections: this.open });
    respond(res, 200, body);
  }

  upgrade(request, socket, head) {
    socket.on("error", () => {}); // a client reset before the upgrade completes
    const url = new URL(request.url, "http://relay");
    if (url.pathname !== WS_PATH) {
      reject(socket, 404, "Not Found", '{"error":"not_found"}');
      return;
    }
    const claims = unverifiedClaims(url.searchParams.get("token") || "");
    if (!Number.isInteger(claims.userId)) {
      reject(socket, 401, "Unauthorized", '{"error":"invalid_token"}');
      return;
    }
    const user = { id: claims.userId, name: String(claims.username || `User ${claims.userId}`) };
    this.wss.handleUpgrade(request, socket, head, (ws) => this.attach(ws, user));
  }

  attach(ws, user) {
    let mine = this.connections.get(user.id);
    if (mine === undefined) {
      mine = new Set();
      this.connections.set(user.id, mine);
    }
    mine.add(ws);
    this.open += 1;
    ws.alive = true;
    ws.on("pong", () => {
      ws.alive = true;
    });
    ws.on("close", () => {
      this.open -= 1;
      mine.delete(ws);
      if (mine.size === 0) this.connections.delete(user.id);
    });
    ws.on("error", () => {}); // a protocol error closes the socket; "close" follows
    ws.on("message", (data, isBinary) => this.receive(ws, user, data, isBinary));
    ws.send(encode("connected", { userId: user.id, username: user.name, timestamp: nowIso() }));
  }

  receive(ws, user, data, isBinary) {
    let frame;
    try {
      frame = JSON.parse(isBinary ? data : data.toString("utf8"));
    } catch {
      ws.close(1011, "invalid JSON"); // relay.py's handler dies on it too
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    if (frame.type === "send_message") this.sendMessage(ws, user, frame);
    else if (frame.type === "create_conversation") this.createConversation(ws, user, frame);
    else if (frame.type === "ping") ws.send(encode("pong", { timestamp: nowIso(), userId: user.id }));
  }

  // Every open connection of the members, except `skip`.
  targets(members, skip) {
    const out = [];
    for (const m of members) {
      const conns = this.connections.get(m);
      if (conns === undefined) continue;
      for (const c of conns) if (c !== skip) out.push(c);
    }
    return out;
  }

  sendMessage(ws, user, frame) {
    const cid = frame.conversationId;
    const members = Number.isInteger(cid) ? this.members.get(cid) : undefined;
    if (members === undefined) {
      ws.send(encode("error", { code: "forbidden", message: "unknown conversation" }));
      return;
    }
    const fields = {
      messageId: this.nextMessage++,
      conversationId: cid,
      senderId: user.id,
      senderName: user.name,
      content: frame.content ?? null,
      attachments: [],
      messageType: "text",
      timestamp: nowIso(),
    };
    const targets = this.targets(members, ws);
    if (targets.length > 0) {
      const out = Buffer.from(encode("new_message", { ...fields, delivered: true }));
      for (const c of targets) c.send(out, { binary: false });
    }
    const reply = { ...fields, delivered: targets.length > 0 };
    if ("requestId" in frame) reply.requestId = frame.requestId;
    ws.send(encode("message_sent", reply));
  }

  createConversation(ws, user, frame) {
    const others = Array.isArray(frame.participantIds) ? frame.participantIds : [];
    const ids = [user.id, ...others.filter((i) => i !== user.id)];
    const cid = this.nextConversation++;
    this.members.set(cid, ids);
    const fields = {
      conversationId: cid,
      title: frame.title ?? null,
      isGroup: ids.length > 2,
      participantIds: [...ids].sort((a, b) => a - b),
      createdBy: user.id,
    };
    const reply = { ...fields };
    if ("requestId" in frame) reply.requestId = frame.requestId;
    ws.send(encode("conversation_created", reply));
    const out = Buffer.from(encode("conversation_created", fields));
    for (const c of this.targets(ids, ws)) c.send(out, { binary: false });
  }

  // Ping every connection each interval; drop those that did not answer the last ping.
  keepalive() {
    for (const ws of this.wss.clients) {
      if (!ws.alive) {
        ws.terminate();
        continue;
      }
      ws.alive = false;
      ws.ping();
    }
  }
}

function main() {
  const host = option("--host", "127.0.0.1");
  const port = Number(option("--port", "8765"));
  const relay = new Relay();
  const server = http.createServer((req, res) => {
    if (new URL(req.url, "http://relay").pathname === "/api/health") relay.health(res);
    else respond(res, 404, '{"error":"not_found"}');
  });
  server.on("upgrade", (req, socket, head) => relay.upgrade(req, socket, head));
  const timer = setInterval(() => relay.keepalive(), KEEPALIVE_MS);
  const stop = () => {
    clearInterval(timer);
    for (const ws of relay.wss.clients) ws.terminate();
    server.close(() => process.exit(0));
    setTimeout(() => process.exit(0), 3000).unref();
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
  server.listen({ port, host, backlog: BACKLOG });
}

main();
