// A zkv client in JavaScript, written from docs/protocol.md alone (npm: zeromq v6, @msgpack/msgpack).
//
// As a library: `import { ZkvClient } from "./client.mjs"`.
// As a script:  `node client.mjs <frontend-url> <key-prefix> <python-key-hex>` runs a scenario against a
// live cluster and prints one JSON object on stdout (tests/integration/test_node_client.py checks it);
// `node client.mjs --roles <frontend-url> <key-prefix>` checks what the credentials' role may do (§1.12).
// `node client.mjs --several <url,url,...> <key-prefix>` puts and gets one key through a list of brokers
// (docs/protocol.md "Several brokers": a standby answers NOT_LEADER naming the leader).
// With ZKV_CREDENTIALS set to a credentials file (`zkv keys add-client`), both connect over CURVE.

import { createHash, randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

import { decode, encode } from "@msgpack/msgpack";
import { Dealer } from "zeromq";

// §1.1 framing: [b"MDPC02", 0x01, service, header, *values]; replies carry 0x03 (FINAL).
const MDPC = Buffer.from("MDPC02");
const REQUEST = Buffer.from([0x01]);
const PARTIAL = 0x02;
const FINAL = 0x03;
const KV = Buffer.from("kv");
// §1.4: codes after which the same request (same id and cid) may be sent again.
const RETRYABLE = new Set(["TIMEOUT", "UNAVAILABLE", "NOT_ENOUGH_REPLICAS", "NOT_LEADER"]);
// "Several brokers": how long a connection may be down (or not yet up) before the client moves on,
// and how often a wait for a reply looks at it.
const FAILOVER_WAIT = 1000;
const LINK_CHECK = 100;
const sameUrl = (a, b) => a.trim().replace(/\/+$/, "").toLowerCase() === b.trim().replace(/\/+$/, "").toLowerCase();

export class ZkvError extends Error {
  constructor(code, message, id = null) {
    super(`${code}: ${message}`);
    this.code = code;
    this.id = id;
    this.retryable = RETRYABLE.has(code);
  }
}

// §1.12: a credentials file is a ZeroMQ certificate; its keys are 40-character Z85 text in lines
// `name = "value"`. Returns the three socket options a CURVE client sets before it connects.
export function loadCredentials(path) {
  const fields = {};
  for (const line of readFileSync(path, "utf8").split("\n")) {
    const m = /^\s*([A-Za-z0-9_-]+)\s*=\s*"([^"]*)"\s*$/.exec(line);
    if (m) fields[m[1]] = m[2];
  }
  for (const name of ["broker-public-key", "public-key", "secret-key"]) {
    if (!fields[name] || fields[name].length !== 40) throw new Error(`${path}: no ${name} (40 Z85 characters)`);
  }
  return { curveServerKey: fields["broker-public-key"], curvePublicKey: fields["public-key"],
    curveSecretKey: fields["secret-key"], role: fields.role ?? null };
}

const toBuf = (b) => (Buffer.isBuffer(b) ? b : typeof b === "string" ? Buffer.from(b, "utf8") : Buffer.from(b));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export class ZkvClient {
  // url: a broker's frontend, or several brokers' comma-separated (one at a time; the leader is followed);
  // timeout: the most one call may take, retries included; attemptTimeout: how long one attempt waits;
  // credentials: the path of a credentials file, for a broker started with --keys (§1.12).
  constructor(url, { timeout = 20000, attemptTimeout = 6000, credentials = null } = {}) {
    this.url = url;
    this.urls = url.split(",").map((u) => u.trim()).filter(Boolean);
    if (this.urls.length === 0) throw new Error(`no broker URL in ${JSON.stringify(url)}`);
    this.at = 0; // the list's entry talked to,
    this.leader = null; // unless a standby named a leader outside the list
    this.hops = 0; // leaders followed since the last answer that was not NOT_LEADER
    this.curve = credentials ? loadCredentials(credentials) : null;
    this.timeout = timeout;
    this.attemptTimeout = attemptTimeout;
    this.cid = randomBytes(16); // §1.6: one random client id per client instance
    this.nextId = 1;
    this.sock = null;
    this.open();
  }

  // -- several brokers (docs/protocol.md "Several brokers") ----------------------------------------

  current() {
    return this.leader ?? this.urls[this.at];
  }

  get several() {
    return this.urls.length > 1;
  }

  // The next URL of the list (after a silence, or NOT_LEADER naming no one).
  next() {
    this.at = (this.at + 1) % this.urls.length; // (from a leader outside the list: the entry after where it was left)
    this.leader = null;
  }

  // NOT_LEADER: go to the leader it names and return true (resend at once), or move on and return false
  // (back off first): no leader named, the standby named itself, or more leaders followed in a row than
  // there are URLs (standbys that disagree during an election).
  follow(leader) {
    if (!leader || sameUrl(leader, this.current()) || this.hops > this.urls.length) {
      this.hops = 0;
      this.next();
      return false;
    }
    this.hops += 1;
    const i = this.urls.findIndex((u) => sameUrl(u, leader));
    if (i >= 0) [this.at, this.leader] = [i, null];
    else this.leader = leader.trim();
    return true;
  }

  // With several brokers: the connection has been down, or never up, for FAILOVER_WAIT. A dead broker's
  // connection is refused or dropped by its host at once, while a live one's stays up however slow its
  // answer: so a dead broker costs about a second, a slow leader is still waited for.
  linkDead() {
    return this.link !== null && !this.link.up && Date.now() - this.link.downSince >= FAILOVER_WAIT;
  }

  open() {
    if (this.sock) this.sock.close();
    const options = { linger: 0 };
    if (this.curve) {
      const { curveServerKey, curvePublicKey, curveSecretKey } = this.curve;
      Object.assign(options, { curveServerKey, curvePublicKey, curveSecretKey });
    }
    this.sock = new Dealer(options);
    this.link = null;
    if (this.several || this.leader !== null) {
      const link = { up: false, downSince: Date.now() };
      const up = () => { link.up = true; };
      this.sock.events.on("connect", up); // TCP up (and the ZMTP handshake, where libzmq reports it)
      this.sock.events.on("handshake", up);
      this.sock.events.on("disconnect", () => { if (link.up) [link.up, link.downSince] = [false, Date.now()]; });
      this.link = link;
    }
    this.opened = this.current();
    this.sock.connect(this.opened);
  }

  close() {
    if (this.sock) this.sock.close();
    this.sock = null;
  }

  // Send frames once; wait up to waitMs for the FINAL of `service` whose header id is `matchId`
  // (or an error with id nil). Returns the frames after the service frame, or null on timeout.
  // PARTIALs for `matchId` (§1.8, get_chunks) go to onPartial(header, valueFrames).
  async roundtrip(frames, service, matchId, waitMs, onPartial = null) {
    if (this.opened !== this.current()) this.open(); // moved to another broker
    const deadline = Date.now() + waitMs;
    // A DEALER whose connection was refused at the handshake (a key the broker did not know yet,
    // §1.12) has nowhere to queue a message: send would wait for ever. Bound it like the reply.
    this.sock.sendTimeout = waitMs;
    try {
      await this.sock.send(frames);
    } catch (e) {
      if (e.code === "EAGAIN") return null;
      throw e;
    }
    for (;;) {
      const left = deadline - Date.now();
      if (left <= 0) return null;
      this.sock.receiveTimeout = this.link ? Math.min(left, LINK_CHECK) : left;
      let reply;
      try {
        reply = await this.sock.receive();
      } catch (e) {
        if (e.code !== "EAGAIN") throw e;
        if (!this.link || Date.now() >= deadline || this.linkDead()) return null;
        continue;
      }
      if (reply.length >= 4 && reply[0].equals(MDPC) && reply[1].length === 1 && reply[1][0] === PARTIAL) {
        const hdr = decode(reply[3]);
        if (onPartial && hdr.id === matchId) onPartial(hdr, reply.slice(4));
        continue;
      }
      if (reply.length < 4 || !reply[0].equals(MDPC) || reply[1].length !== 1 || reply[1][0] !== FINAL) continue;
      const body = reply.slice(3);
      if (!service.equals(KV)) {
        if (reply[2].equals(service)) return body;
        continue;
      }
      let hdr;
      try {
        hdr = decode(body[0]);
      } catch {
        continue;
      }
      // Framing errors are answered on service "kv" with id nil (§1.4).
      if (hdr.id === matchId || ((hdr.id === null || hdr.id === undefined) && hdr.ok === false)) return body;
      // A late reply to an earlier request or attempt: not ours, drop it.
    }
  }

  // One kv request with the retry rules of §1.6. Returns { header, values } or throws ZkvError.
  async request(op, fields = {}, values = [], onPartial = null) {
    const id = this.nextId++;
    const frames = [MDPC, REQUEST, KV, Buffer.from(encode({ op, id, cid: this.cid, ...fields })), ...values];
    return this.send(frames, id, onPartial);
  }

  // Send prepared frames (the same frames on every attempt) until a final answer or the deadline.
  async send(frames, id, onPartial = null) {
    const deadline = Date.now() + this.timeout;
    let backoff = 50;
    let last = null;
    for (;;) {
      const left = deadline - Date.now();
      if (left <= 0) throw last || new ZkvError("TIMEOUT", `no reply from ${this.url}`, id);
      const body = await this.roundtrip(frames, KV, id, Math.min(left, this.attemptTimeout), onPartial);
      if (body === null) {
        if (this.several || this.leader !== null) this.next(); // several brokers: try the next one
        this.open(); // drop replies queued for a dead connection, then resend the same frames
        last = new ZkvError("TIMEOUT", `no reply from ${this.url}`, id);
        continue;
      }
      const header = decode(body[0]);
      if (header.code !== "NOT_LEADER") this.hops = 0;
      if (header.ok) return { header, values: body.slice(1) };
      const err = new ZkvError(String(header.code), String(header.message ?? ""), header.id ?? null);
      err.version = header.version ?? null; // CONDITION_FAILED carries the key's current version
      if (!err.retryable) throw err;
      last = err;
      // A standby: nothing was done; the same frames go to the leader it names at once (the next
      // roundtrip reopens the socket there), or to the next broker after the backoff.
      if (err.code === "NOT_LEADER" && this.follow(header.leader ?? null)) continue;
      await sleep(Math.min(backoff, Math.max(0, deadline - Date.now())));
      backoff = Math.min(backoff * 2, 1000);
    }
  }

  // Send raw frames once and return the reply header (no retries): for protocol tests.
  async raw(frames, id = null, waitMs = 5000) {
    const body = await this.roundtrip(frames.map(toBuf), KV, id, waitMs);
    if (body === null) throw new Error("no reply");
    return { header: decode(body[0]), values: body.slice(1) };
  }

  // cond: {} or { if_absent: true } or { if_version: n } (§1.3, compare-and-set)
  async put(key, value, ttl = undefined, cond = {}) {
    const fields = { key: toBuf(key), ...cond };
    if (ttl !== undefined) fields.ttl = ttl;
    const { header } = await this.request("put", fields, [toBuf(value)]);
    return header.version;
  }

  // -> { value: Buffer, version } or null on a miss
  async getVersioned(key) {
    const { header, values } = await this.request("get", { key: toBuf(key) });
    return header.found ? { value: values[0], version: header.version } : null;
  }

  async get(key) {
    const r = await this.getVersioned(key);
    return r === null ? null : r.value;
  }

  async delete(key) {
    const { header } = await this.request("delete", { key: toBuf(key) });
    return header.deleted;
  }

  async exists(key) {
    const { header } = await this.request("exists", { key: toBuf(key) });
    return header.exists;
  }

  async mget(keys) {
    const { header, values } = await this.request("mget", { keys: keys.map(toBuf) });
    return header.found.map((f, i) => (f ? values[i] : null));
  }

  async mset(pairs, ttl = undefined) {
    const fields = { keys: pairs.map(([k]) => toBuf(k)) };
    if (ttl !== undefined) fields.ttl = ttl;
    const { header } = await this.request("mset", fields, pairs.map(([, v]) => toBuf(v)));
    return header.count;
  }

  // §1.10 scan: every live key under a prefix, in key order, a page of `limit` keys at a time.
  async scan(prefix, limit = 1000) {
    const out = [];
    let startAfter = null;
    for (;;) {
      const fields = { prefix: toBuf(prefix), limit };
      if (startAfter !== null) fields.start_after = startAfter;
      const { header, values } = await this.request("scan", fields);
      header.keys.forEach((k, i) => out.push({ key: Buffer.from(k), value: values[i], version: header.versions[i] }));
      if (!header.more) return out;
      startAfter = Buffer.from(header.keys[header.keys.length - 1]);
    }
  }

  // §1.8 streamed values: chunks staged under a random stream id, then one commit.
  async putStream(key, value, chunkSize = 256 * 1024, cond = {}) {
    const stream = randomBytes(16);
    let chunks = 0;
    for (let off = 0; off < value.length; off += chunkSize, chunks++) {
      await this.request("put_chunk", { key: toBuf(key), stream, index: chunks }, [value.subarray(off, off + chunkSize)]);
    }
    const { header } = await this.request("put_commit", { key: toBuf(key), stream, chunks, size: value.length, ...cond });
    return header.version;
  }

  // -> { value, version, chunks } (chunks: how many the value came in; 0 if it was not streamed) or null
  async getStream(key, credit = 4) {
    const { header, values } = await this.request("get", { key: toBuf(key) });
    if (!header.found) return null;
    if (!header.stream) return { value: values[0], version: header.version, chunks: 0 };
    const m = header.stream;
    const parts = [];
    for (let first = 0; first < m.chunks; first += credit) {
      const count = Math.min(credit, m.chunks - first);
      const got = new Map();
      await this.request("get_chunks", { key: toBuf(key), stream: m.stream, first, count }, [],
        (hdr, frames) => got.set(hdr.index, frames[0]));
      for (let i = first; i < first + count; i++) {
        if (!got.has(i)) throw new ZkvError("VALUE_CHANGED", "the value was replaced while being read");
        parts.push(got.get(i));
      }
    }
    const value = Buffer.concat(parts);
    if (value.length !== m.size) throw new Error(`streamed value of ${value.length} bytes, manifest says ${m.size}`);
    return { value, version: header.version, chunks: m.chunks };
  }

  // §1.5 MMI
  async serviceAvailable() {
    const svc = Buffer.from("mmi.service");
    const body = await this.roundtrip([MDPC, REQUEST, svc, KV], svc, null, 5000);
    return body === null ? null : body[0].toString();
  }

  async status() {
    const svc = Buffer.from("mmi.status");
    const body = await this.roundtrip([MDPC, REQUEST, svc], svc, null, 5000);
    if (body === null) throw new ZkvError("TIMEOUT", "no status reply");
    return decode(body[0]);
  }
}

// ------------------------------------------------------------------------------------------------
// Scenario

const hex = (b) => (b === null || b === undefined ? null : Buffer.from(b).toString("hex"));
const sha = (b) => createHash("sha256").update(b).digest("hex");

async function expectError(fn) {
  try {
    await fn();
  } catch (e) {
    if (e instanceof ZkvError) return { code: e.code, id: e.id };
    throw e;
  }
  return { code: null };
}

async function casError(fn) {
  try {
    await fn();
  } catch (e) {
    if (e instanceof ZkvError) return { code: e.code, version: e.version };
    throw e;
  }
  return { code: null };
}

const credentials = () => process.env.ZKV_CREDENTIALS || null;

async function scenario(url, prefix, pythonKeyHex) {
  const c = new ZkvClient(url, { credentials: credentials() });
  const out = {};
  try {
    out.mmi_service = await c.serviceAvailable();
    const st = await c.status();
    out.status = { formed: st.formed, slots: st.slots, alive: st.workers.filter((w) => w.state === "alive").length };

    // put / get / miss / exists / delete with a text key
    const k = `${prefix}/text`;
    const v1 = await c.put(k, "hello from node");
    const g1 = await c.getVersioned(k);
    out.text = { put_version: v1, found: g1 !== null, version: g1 && g1.version, value: g1 && g1.value.toString() };
    out.miss = { value: await c.get(`${prefix}/never-written`), exists: await c.exists(`${prefix}/never-written`) };
    out.exists_before = await c.exists(k);
    out.deleted = await c.delete(k);
    out.after_delete = { value: await c.get(k), exists: await c.exists(k), deleted_again: await c.delete(k) };

    // binary keys and values, an empty value, a 1 MiB value: left in place for Python to read
    const binKey = Buffer.concat([Buffer.from(`${prefix}/`), Buffer.from([0xff, 0x00, 0xfe, 0x80, 0x0a])]);
    const binVal = Buffer.alloc(1024);
    for (let i = 0; i < binVal.length; i++) binVal[i] = (i * 7 + 3) & 0xff;
    const binVersion = await c.put(binKey, binVal);
    const binGot = await c.get(binKey);
    out.binary = { key: hex(binKey), value: hex(binVal), version: binVersion, roundtrip: binGot.equals(binVal) };
    const emptyKey = `${prefix}/empty`;
    await c.put(emptyKey, Buffer.alloc(0));
    const emptyGot = await c.getVersioned(emptyKey);
    out.empty = { key: emptyKey, found: emptyGot !== null, length: emptyGot && emptyGot.value.length };
    const bigKey = `${prefix}/big`;
    const big = randomBytes(1 << 20);
    await c.put(bigKey, big);
    const bigGot = await c.get(bigKey);
    out.big = { key: bigKey, length: big.length, sha256: sha(big), got_sha256: sha(bigGot) };

    // mset / mget across slots, with a miss in the middle
    const pairs = [0, 1, 2, 3, 4].map((i) => [`${prefix}/m${i}`, Buffer.from([i, 0, 255 - i])]);
    out.mset_count = await c.mset(pairs);
    const mg = await c.mget([pairs[0][0], `${prefix}/m-missing`, ...pairs.slice(1).map(([key]) => key)]);
    out.mget = mg.map(hex);

    // scan (§1.10) of the mset keys, two per page: across slots, in key order
    const scanned = await c.scan(`${prefix}/m`, 2);
    out.scan = scanned.map((e) => [e.key.toString(), hex(e.value)]);

    // TTL: readable at once, gone after it runs out
    const ttlKey = `${prefix}/ttl`;
    await c.put(ttlKey, "short-lived", 2000);
    const ttlFirst = await c.get(ttlKey);
    await sleep(2600);
    out.ttl = { first: ttlFirst && ttlFirst.toString(), later: await c.get(ttlKey), exists: await c.exists(ttlKey) };

    // exactly-once: resending the first frames of a write (same id and cid) does not apply it again
    const rKey = Buffer.from(`${prefix}/retry`);
    const rId = c.nextId++;
    const first = [MDPC, REQUEST, KV, Buffer.from(encode({ op: "put", id: rId, cid: c.cid, key: rKey })),
      Buffer.from("first")];
    const r1 = await c.send(first, rId);
    const v2 = await c.put(rKey, "second");
    const r2 = await c.send(first, rId);
    out.retry = { first_version: r1.header.version, second_version: v2, retry_version: r2.header.version,
      retry_id: r2.header.id, value: (await c.get(rKey)).toString() };

    // compare-and-set (§1.3)
    const casKey = `${prefix}/cas`;
    const cv1 = await c.put(casKey, "v1", undefined, { if_absent: true });
    const casAgain = await casError(() => c.put(casKey, "v2", undefined, { if_absent: true }));
    const cv2 = await c.put(casKey, "v3", undefined, { if_version: cv1 });
    const casStale = await casError(() => c.put(casKey, "v4", undefined, { if_version: cv1 }));
    out.cas = { v1: cv1, again: casAgain, v2: cv2, stale: casStale, value: (await c.get(casKey)).toString() };

    // streamed values (§1.8): written and read back in chunks, a compare-and-set on one, and one
    // written by Python
    const sKey = `${prefix}/streamed`;
    const sVal = randomBytes(3 * (1 << 20) + 5);
    const sv = await c.putStream(sKey, sVal, 512 * 1024);
    const sGot = await c.getStream(sKey, 3);
    const sCas = await casError(() => c.putStream(sKey, Buffer.from("x".repeat(600000)), 512 * 1024, { if_absent: true }));
    const pyStreamed = await c.getStream(`${prefix}/py-streamed`);
    out.streamed = { key: sKey, version: sv, sha256: sha(sVal), got_sha256: sha(sGot.value), got_version: sGot.version,
      chunks: sGot.chunks, cas: sCas, python_sha256: pyStreamed && sha(pyStreamed.value),
      python_chunks: pyStreamed && pyStreamed.chunks };

    // error replies
    out.errors = {
      empty_key: await expectError(() => c.get(Buffer.alloc(0))),
      unknown_op: await expectError(() => c.request("incr", { key: Buffer.from("k") })),
      key_too_large: await expectError(() => c.put(Buffer.alloc(4097, 0x61), "v")),
      missing_value: await expectError(() => c.request("put", { key: Buffer.from("k") })),
      bad_ttl: await expectError(() => c.put(`${prefix}/bad-ttl`, "v", 0)),
      string_cid: await expectError(() =>
        c.send([MDPC, REQUEST, KV, Buffer.from(encode({ op: "put", id: 999, cid: "text", key: "k" })), KV], 999)),
    };
    const notMsgpack = await c.raw([MDPC, REQUEST, KV, Buffer.from([0xc1])]);
    out.errors.not_msgpack = { code: notMsgpack.header.code, id: notMsgpack.header.id, ok: notMsgpack.header.ok };
    const junk = await c.raw([Buffer.from("junk")]);
    out.errors.bad_framing = { code: junk.header.code, id: junk.header.id, ok: junk.header.ok };
    const badSvc = await c.raw([MDPC, REQUEST, Buffer.from("nope"), Buffer.from(encode({ op: "get", id: 1 }))]);
    out.errors.unknown_service = { code: badSvc.header.code, id: badSvc.header.id };
    // the broker still serves this client after all that
    out.after_errors = (await c.get(binKey)).equals(binVal);

    // a value written by the Python client
    const pyKey = Buffer.from(pythonKeyHex, "hex");
    out.python_value = hex(await c.get(pyKey));
    out.python_version = (await c.getVersioned(pyKey))?.version ?? null;
  } finally {
    c.close();
  }
  return out;
}

// Several brokers: one key put and read through the list; which broker served, and how long it took.
async function severalScenario(urls, prefix) {
  const c = new ZkvClient(urls, { credentials: credentials(), timeout: 10000 });
  try {
    const t0 = Date.now();
    const version = await c.put(`${prefix}/several`, "through the list");
    const putMs = Date.now() - t0;
    const value = (await c.get(`${prefix}/several`)).toString();
    return { version, put_ms: putMs, value, served_by: c.current() };
  } finally {
    c.close();
  }
}

// §1.12 roles: what the credentials may read and write, and the FORBIDDEN refusals. A client with no
// credentials (or keys the broker does not know) gets no connection at all: every attempt times out.
async function rolesScenario(url, prefix) {
  const c = new ZkvClient(url, { credentials: credentials(), timeout: 3000, attemptTimeout: 1500 });
  const out = { role: c.curve ? c.curve.role : null };
  const outcome = async (fn) => {
    try {
      return { ok: true, result: hex(await fn()) ?? null };
    } catch (e) {
      if (e instanceof ZkvError) return { ok: false, code: e.code, message: e.message };
      throw e;
    }
  };
  try {
    out.get = await outcome(() => c.get(`${prefix}/readable`));
    out.put = await outcome(async () => Buffer.from(String(await c.put(`${prefix}/by-${out.role}`, "x"))));
    const st = await c.roundtrip([MDPC, REQUEST, Buffer.from("mmi.admin"), Buffer.from(encode({ cmd: "rebalance" }))],
      Buffer.from("mmi.admin"), null, 3000);
    out.mmi_admin = st === null ? null : decode(st[0]);
  } finally {
    c.close();
  }
  return out;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const args = process.argv.slice(2);
  const roles = args[0] === "--roles";
  const several = args[0] === "--several";
  const [url, prefix, pythonKeyHex] = roles || several ? args.slice(1) : args;
  if (!url || !prefix || (!roles && !several && pythonKeyHex === undefined)) {
    console.error("usage: node client.mjs <frontend-url> <key-prefix> <python-key-hex>\n" +
      "       node client.mjs --roles <frontend-url> <key-prefix>\n" +
      "       node client.mjs --several <url,url,...> <key-prefix>");
    process.exit(2);
  }
  (roles ? rolesScenario(url, prefix) : several ? severalScenario(url, prefix)
    : scenario(url, prefix, pythonKeyHex)).then(
    (out) => {
      process.stdout.write(JSON.stringify(out) + "\n");
      process.exit(0);
    },
    (err) => {
      console.error(err && err.stack ? err.stack : String(err));
      process.exit(1);
    },
  );
}
