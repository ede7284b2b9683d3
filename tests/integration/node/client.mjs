// A zkv client in JavaScript, written from docs/protocol.md alone (npm: zeromq v6, @msgpack/msgpack).
//
// As a library: `import { ZkvClient } from "./client.mjs"`.
// As a script:  `node client.mjs <frontend-url> <key-prefix> <python-key-hex>` runs a scenario against a
// live cluster and prints one JSON object on stdout (tests/integration/test_node_client.py checks it);
// `node client.mjs --roles <frontend-url> <key-prefix>` checks what the credentials' role may do (§1.12).
// `node client.mjs --several <url,url,...> <key-prefix>` puts and gets one key through a list of brokers
// (docs/protocol.md "Several brokers": a standby answers NOT_LEADER naming the leader).
// `node client.mjs --active <url,url,...> <key-prefix>` runs puts, gets, mset, mget and scan against active
// brokers (docs/protocol.md §1.14: each slot group led by one of them), routed by the slot map;
// `node client.mjs --routing < cases.json` computes slots and merged scan pages for the test to compare.
// With ZKV_CREDENTIALS set to a credentials file (`zkv keys add-client`), both connect over CURVE.

import { createHash, randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";
import { crc32 } from "node:zlib"; // node >= 20.15 / 22.2: the IEEE (zlib) CRC-32 of §1.9

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
const DEFAULT_SCAN_LIMIT = 1000; // §1.10
const normUrl = (u) => u.trim().replace(/\/+$/, "").toLowerCase();
const sameUrl = (a, b) => normUrl(a) === normUrl(b);

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

// -- active brokers: the slot map (docs/protocol.md §1.14; client/slotmap.py is the Python one) -----

// §1.9: slot = crc32(key) mod slots (zlib.crc32 is unsigned, as Python's with & 0xFFFFFFFF).
export const slotForKey = (key, slots) => crc32(toBuf(key)) % slots;

// Which broker leads each slot group (group = slot mod groups), as mmi.slots answers it. Immutable: a
// NOT_LEADER's hint makes a new map (learn), a newer revision a fetched one.
export class SlotMap {
  constructor(slots, groups, leaders, revision) {
    this.slots = slots;
    this.groups = groups;
    this.leaders = leaders; // Map: group -> the leader's frontend; a group without a leader is absent
    this.revision = revision;
  }

  // From the map a broker answers ({slots, groups, revision, leaders: {"G": url}}); throws if it is not one.
  static fromRecord(record) {
    const { slots, groups, revision } = record ?? {};
    const leaders = new Map(Object.entries(record?.leaders ?? {}).map(([g, url]) => [Number(g), String(url)]));
    const ints = [slots, groups, revision].every(Number.isInteger);
    if (!ints || slots < 1 || groups < 1 || groups > slots || [...leaders.keys()].some((g) => !(g >= 0 && g < groups))) {
      throw new Error(`not a slot map: ${JSON.stringify(record)}`);
    }
    return new SlotMap(slots, groups, leaders, revision);
  }

  groupOf(key) {
    return slotForKey(key, this.slots) % this.groups;
  }

  // The indices of `keys` by group, each list in the keys' order: what one request may carry.
  byGroup(keys) {
    const out = new Map();
    keys.forEach((k, i) => {
      const g = this.groupOf(k);
      if (!out.has(g)) out.set(g, []);
      out.get(g).push(i);
    });
    return out;
  }

  // This map with `group`'s leader as a NOT_LEADER named it (null: none known).
  learn(group, leader) {
    const leaders = new Map(this.leaders);
    if (leader) leaders.set(group, leader);
    else leaders.delete(group);
    return new SlotMap(this.slots, this.groups, leaders, this.revision);
  }

  record() {
    return { slots: this.slots, groups: this.groups, revision: this.revision,
      leaders: Object.fromEntries([...this.leaders].sort(([a], [b]) => a - b).map(([g, u]) => [String(g), u])) };
  }
}

// One reply of an MGET or MSET from the replies of its shares (one per group): a header list as long as
// its share's keys is per key and goes back by index, so do value frames and the `streams` manifests
// (keyed by index); `count` (mset) is the sum; any other field is the first share's (merge_split).
export function mergeSplit(n, parts) {
  const header = { ...parts[0].header };
  const values = new Array(n).fill(null);
  const perKey = {};
  const streams = {};
  for (const { indices, header: hdr, values: frames } of parts) {
    for (const [name, field] of Object.entries(hdr)) {
      if (!Array.isArray(field) || field.length !== indices.length) continue;
      perKey[name] ??= new Array(n).fill(null);
      field.forEach((x, j) => { perKey[name][indices[j]] = x; });
    }
    frames.forEach((x, j) => { values[indices[j]] = x; });
    for (const [j, manifest] of Object.entries(hdr.streams ?? {})) streams[indices[Number(j)]] = manifest;
  }
  Object.assign(header, perKey);
  delete header.streams;
  if (Object.keys(streams).length) header.streams = streams;
  if (parts.every((p) => Number.isInteger(p.header.count))) header.count = parts.reduce((s, p) => s + p.header.count, 0);
  return { header, values: parts.some((p) => p.values.length) ? values : [] };
}

// One scan page from several groups' pages (each sorted by key, each with its `more`), all asked with the
// same prefix, start_after and limit. Beyond the smallest last key of a page that has more, that group may
// hold keys not seen yet: so only keys up to it, in key order, at most `limit`; `more` if anything was
// left out or any group has more (client/slotmap.py merge_pages).
export function mergePages(pages, limit) {
  if (pages.some((p) => p.more && p.items.length === 0)) throw new Error("a page that has more must hold at least one key");
  const bounds = pages.filter((p) => p.more).map((p) => p.items[p.items.length - 1].key);
  const bound = bounds.length ? bounds.reduce((a, b) => (Buffer.compare(a, b) <= 0 ? a : b)) : null;
  const merged = pages.flatMap((p) => p.items)
    .filter((it) => bound === null || Buffer.compare(it.key, bound) <= 0)
    .sort((a, b) => Buffer.compare(a.key, b.key));
  return { items: merged.slice(0, limit), more: merged.length > limit || pages.some((p) => p.more) };
}

// One scan reply from every group's reply to the same page request (merge_scans). A page with `more`
// but no keys counts as complete, as it does for one broker.
export function mergeScans(parts, limit) {
  const withValues = parts.some((p) => p.values.length);
  const pages = parts.map(({ header, values }) => {
    const streams = header.streams ?? {};
    const items = header.keys.map((k, i) => ({ key: Buffer.from(k), version: header.versions[i],
      value: withValues ? values[i] : null, stream: streams[i] ?? null }));
    return { items, more: Boolean(header.more) && items.length > 0 };
  });
  const { items, more } = mergePages(pages, limit);
  const header = { ...parts[0].header, keys: items.map((e) => e.key), versions: items.map((e) => e.version), more };
  delete header.streams;
  const streams = Object.fromEntries(items.flatMap((e, i) => (e.stream === null ? [] : [[i, e.stream]])));
  if (Object.keys(streams).length) header.streams = streams;
  return { header, values: withValues ? items.map((e) => e.value) : [] };
}

// send()'s answer when a request that spans groups was refused before the map was known: split it now.
const RESPLIT = Symbol("resplit");

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
    // One DEALER per broker URL, kept: with active brokers (§1.14) requests go back and forth between
    // the group leaders, and a new connection for each would cost a handshake per request.
    this.socks = new Map(); // normUrl(url) -> { sock, link }
    this.slotMap = null; // active brokers: learned at the first NOT_LEADER naming a group (mmi.slots)
    this.redirects = 0; // NOT_LEADER answers received: a client that routes by the map gets few
    this.servedBy = null; // the broker whose answer the last request returned
    this.served = new Map(); // URL -> answers it gave (how the requests spread over the brokers)
    this.entry();
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

  // Make `url` the current broker: the list's entry if it is one, else the URL itself.
  goTo(url) {
    if (sameUrl(url, this.current())) return;
    const i = this.urls.findIndex((u) => sameUrl(u, url));
    if (i >= 0) [this.at, this.leader] = [i, null];
    else this.leader = url.trim();
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
    this.goTo(leader);
    return true;
  }

  // With several brokers: the connection has been down, or never up, for FAILOVER_WAIT. A dead broker's
  // connection is refused or dropped by its host at once, while a live one's stays up however slow its
  // answer: so a dead broker costs about a second, a slow leader is still waited for.
  linkDead(link) {
    return link !== null && !link.up && Date.now() - link.downSince >= FAILOVER_WAIT;
  }

  // The kept socket of the current broker, connected first if there is none.
  entry() {
    const key = normUrl(this.current());
    if (!this.socks.has(key)) this.socks.set(key, this.connect(this.current()));
    return this.socks.get(key);
  }

  connect(url) {
    const options = { linger: 0 };
    if (this.curve) {
      const { curveServerKey, curvePublicKey, curveSecretKey } = this.curve;
      Object.assign(options, { curveServerKey, curvePublicKey, curveSecretKey });
    }
    const sock = new Dealer(options);
    let link = null;
    if (this.several || this.leader !== null) {
      link = { up: false, downSince: Date.now() };
      const up = () => { link.up = true; };
      sock.events.on("connect", up); // TCP up (and the ZMTP handshake, where libzmq reports it)
      sock.events.on("handshake", up);
      sock.events.on("disconnect", () => { if (link.up) [link.up, link.downSince] = [false, Date.now()]; });
    }
    sock.connect(url);
    return { sock, link };
  }

  // Close the socket of `url`: whatever it still queues for a dead connection, requests and replies, is
  // dropped; the next request there gets a fresh one.
  drop(url) {
    const key = normUrl(url);
    const kept = this.socks.get(key);
    if (kept) kept.sock.close();
    this.socks.delete(key);
  }

  close() {
    for (const { sock } of this.socks.values()) sock.close();
    this.socks.clear();
  }

  // -- active brokers (docs/protocol.md §1.14) -----------------------------------------------------

  // The group a request's keys (or its `group` field: scan, watch) fall in by the map; null without one.
  groupOf(fields) {
    const m = this.slotMap;
    if (m === null || !fields) return null;
    if (Number.isInteger(fields.group)) return fields.group;
    const key = fields.key ?? fields.keys?.[0];
    return key === undefined ? null : m.groupOf(key);
  }

  // Send to the leader of the request's group, when the map knows it.
  route(fields) {
    const g = this.groupOf(fields);
    const url = g === null ? undefined : this.slotMap.leaders.get(g);
    if (url) this.goTo(url);
  }

  // No reply from the leader the map named for this request's group: forget it, so the next attempt goes
  // where the failover rules say (the next URL), whose NOT_LEADER names the group's new leader once there
  // is one.
  unroute(fields) {
    const g = this.groupOf(fields);
    const url = g === null ? undefined : this.slotMap.leaders.get(g);
    if (url && sameUrl(url, this.current())) this.slotMap = this.slotMap.learn(g, null);
  }

  // A NOT_LEADER of an active broker names the group and its leader: note it (fetching the whole map
  // first when it is newer than ours). True if the request is to be resent to that leader at once.
  async learn(header) {
    const g = header.group;
    if (header.code !== "NOT_LEADER" || !Number.isInteger(g)) return false; // a standby's (§1.13)
    if (this.slotMap === null || Number(header.revision ?? 0) > this.slotMap.revision) await this.fetchMap();
    if (this.slotMap === null) return false;
    const leader = typeof header.leader === "string" && header.leader ? header.leader : null;
    // No leader now (a handover): forget the old one.
    if ((this.slotMap.leaders.get(g) ?? null) !== leader) this.slotMap = this.slotMap.learn(g, leader);
    return this.slotMap.leaders.has(g);
  }

  // The map from the current broker (mmi.slots); unchanged if it answers none (501: no groups) or nothing.
  async fetchMap() {
    const svc = Buffer.from("mmi.slots");
    const body = await this.roundtrip([MDPC, REQUEST, svc, Buffer.alloc(0)], svc, null, this.attemptTimeout);
    if (body === null || body[0].toString() === "501") return;
    try {
      this.slotMap = SlotMap.fromRecord(decode(body[0]));
    } catch {
      // not a map: route as without one
    }
  }

  // An MGET or MSET over several groups: one request per group, the answers put back in the keys' order;
  // a scan without a `group`: one page from every group, merged in key order. Null when not split (no map,
  // one group, or all keys in one).
  async split(op, fields, values) {
    const m = this.slotMap;
    if (m === null || m.groups < 2) return null;
    if (op === "scan" && fields.group === undefined) {
      const parts = [];
      for (let g = 0; g < m.groups; g++) parts.push(await this.request(op, { ...fields, group: g }));
      return mergeScans(parts, fields.limit ?? DEFAULT_SCAN_LIMIT);
    }
    if (op !== "mget" && op !== "mset") return null;
    const shares = m.byGroup(fields.keys);
    if (shares.size < 2) return null;
    const parts = [];
    for (const indices of shares.values()) {
      const share = { ...fields, keys: indices.map((i) => fields.keys[i]) };
      const answer = await this.request(op, share, op === "mset" ? indices.map((i) => values[i]) : []);
      parts.push({ indices, ...answer });
    }
    return mergeSplit(fields.keys.length, parts);
  }

  // -- requests -------------------------------------------------------------------------------------

  // Send frames once; wait up to waitMs for the FINAL of `service` whose header id is `matchId`
  // (or an error with id nil). Returns the frames after the service frame, or null on timeout.
  // PARTIALs for `matchId` (§1.8, get_chunks) go to onPartial(header, valueFrames).
  async roundtrip(frames, service, matchId, waitMs, onPartial = null) {
    const { sock, link } = this.entry();
    const deadline = Date.now() + waitMs;
    // A DEALER whose connection was refused at the handshake (a key the broker did not know yet,
    // §1.12) has nowhere to queue a message: send would wait for ever. Bound it like the reply.
    sock.sendTimeout = waitMs;
    try {
      await sock.send(frames);
    } catch (e) {
      if (e.code === "EAGAIN") return null;
      throw e;
    }
    for (;;) {
      const left = deadline - Date.now();
      if (left <= 0) return null;
      sock.receiveTimeout = link ? Math.min(left, LINK_CHECK) : left;
      let reply;
      try {
        reply = await sock.receive();
      } catch (e) {
        if (e.code !== "EAGAIN") throw e;
        if (!link || Date.now() >= deadline || this.linkDead(link)) return null;
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

  // One kv request with the retry rules of §1.6, routed by the slot map with active brokers (§1.14).
  // Returns { header, values } or throws ZkvError.
  async request(op, fields = {}, values = [], onPartial = null) {
    const split = await this.split(op, fields, values);
    if (split !== null) return split;
    const id = this.nextId++;
    const frames = [MDPC, REQUEST, KV, Buffer.from(encode({ op, id, cid: this.cid, ...fields })), ...values];
    const answer = await this.send(frames, id, onPartial, fields);
    return answer === RESPLIT ? this.request(op, fields, values, onPartial) : answer;
  }

  // Send prepared frames (the same frames on every attempt) until a final answer or the deadline.
  // `fields` (the header's fields, when known) route each attempt to its group's leader.
  async send(frames, id, onPartial = null, fields = null) {
    const deadline = Date.now() + this.timeout;
    let backoff = 50;
    let last = null;
    for (;;) {
      const left = deadline - Date.now();
      if (left <= 0) throw last || new ZkvError("TIMEOUT", `no reply from ${this.url}`, id);
      this.route(fields);
      const body = await this.roundtrip(frames, KV, id, Math.min(left, this.attemptTimeout), onPartial);
      if (body === null) {
        this.unroute(fields);
        const silent = this.current();
        if (this.several || this.leader !== null) this.next(); // several brokers: try the next one
        this.drop(silent); // drop replies queued for a dead connection, then resend the same frames
        last = new ZkvError("TIMEOUT", `no reply from ${this.url}`, id);
        continue;
      }
      const header = decode(body[0]);
      if (header.code !== "NOT_LEADER") this.answered();
      // Keys of several groups, sent before the map was known (the refusal names the cluster's groups).
      if (fields && this.slotMap === null && header.code === "BAD_REQUEST" && Number.isInteger(header.groups)) {
        await this.fetchMap();
        if (this.slotMap !== null) return RESPLIT;
      }
      if (header.ok) return { header, values: body.slice(1) };
      const err = new ZkvError(String(header.code), String(header.message ?? ""), header.id ?? null);
      err.version = header.version ?? null; // CONDITION_FAILED carries the key's current version
      if (!err.retryable) throw err;
      last = err;
      if (err.code === "NOT_LEADER" && await this.redirected(header)) continue;
      await sleep(Math.min(backoff, Math.max(0, deadline - Date.now())));
      backoff = Math.min(backoff * 2, 1000);
    }
  }

  // An answer that was not NOT_LEADER: the current broker serves.
  answered() {
    this.hops = 0;
    this.servedBy = this.current();
    this.served.set(this.servedBy, (this.served.get(this.servedBy) ?? 0) + 1);
  }

  // NOT_LEADER: nothing was done. True if the same frames go again at once: to the group's leader it
  // names (active brokers; the next attempt is routed there), or to the leader a standby names; false to
  // back off first (no leader named: the next broker; or brokers that keep naming each other while a
  // handover runs).
  async redirected(header) {
    this.redirects += 1;
    if (await this.learn(header)) {
      if (++this.hops <= this.urls.length) return true;
      this.hops = 0;
      return false;
    }
    return this.follow(header.leader ?? null);
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

// Active brokers (§1.14): puts and gets one key at a time, an MSET and an MGET across the groups, a scan in
// pages of 5; where the requests were answered, how often a broker said NOT_LEADER, and the map learned.
// `readKeys`: more keys to MGET (written by Python).
async function activeRound(c, prefix, n, readKeys) {
  const redirects = c.redirects; // (counted for this round alone, as where the answers came from)
  c.served = new Map();
  const key = (i) => `${prefix}/k${String(i).padStart(2, "0")}`;
  const puts = [];
  for (let i = 0; i < n; i++) puts.push({ key: key(i), version: await c.put(key(i), `v${i}`), served_by: c.servedBy });
  const gets = [];
  for (let i = 0; i < n; i++) {
    const value = await c.get(key(i));
    gets.push({ key: key(i), value: value && value.toString(), served_by: c.servedBy,
      group: c.slotMap === null ? null : c.slotMap.groupOf(key(i)) });
  }
  const pairs = Array.from({ length: n }, (_, i) => [`${key(i)}/m`, Buffer.from([i, 0xff, 0])]);
  const msetCount = await c.mset(pairs);
  const mget = (await c.mget([...pairs.map(([k]) => k), `${prefix}/missing`, ...readKeys])).map(hex);
  const scan = (await c.scan(`${prefix}/`, 5)).map((e) => [e.key.toString(), hex(e.value)]);
  return { puts, gets, mset_count: msetCount, mget, scan, redirects: c.redirects - redirects,
    map: c.slotMap && c.slotMap.record(), served: Object.fromEntries(c.served) };
}

// One round; with `pause`, it prints its result, waits for a line on stdin (the test changes the cluster
// meanwhile: a broker killed), then runs a second round on the same client, with the map it had.
async function activeScenario(urls, prefix, readKeys, pause) {
  const c = new ZkvClient(urls, { credentials: credentials(), timeout: 30000 });
  try {
    const first = await activeRound(c, `${prefix}/1`, 24, readKeys);
    if (!pause) return first;
    process.stdout.write(JSON.stringify(first) + "\n");
    await new Promise((resolve) => process.stdin.once("data", resolve));
    process.stdin.pause();
    const t0 = Date.now();
    const second = await activeRound(c, `${prefix}/2`, 24, readKeys);
    return { ...second, ms: Date.now() - t0 };
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

// The pure parts of routing, on cases the test makes up (JSON on stdin, byte strings in hex): each key's
// slot, and each merged scan page, for the test to compare with Python's slot_for_key and merge_scans.
async function routingCheck() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  const input = JSON.parse(Buffer.concat(chunks).toString());
  const buf = (h) => Buffer.from(h, "hex");
  const slots = input.slots.map(([key, n]) => slotForKey(buf(key), n));
  const scans = input.scans.map(({ limit, parts }) => {
    const { header, values } = mergeScans(parts.map((p) => ({
      header: { ok: true, keys: p.keys.map(buf), versions: p.versions, more: p.more },
      values: p.values.map(buf) })), limit);
    return { keys: header.keys.map(hex), versions: header.versions, more: header.more, values: values.map(hex) };
  });
  return { slots, scans };
}

// The scenario the command line names, as a function to run; null if the arguments do not name one.
function chosen(args) {
  const [mode, url, prefix, ...rest] = args;
  if (mode === "--roles" || mode === "--several") {
    if (!url || !prefix) return null;
    return () => (mode === "--roles" ? rolesScenario(url, prefix) : severalScenario(url, prefix));
  }
  if (mode === "--active") {
    if (!url || !prefix) return null;
    const pause = rest.includes("--pause");
    const readKeys = rest.filter((a) => a !== "--pause").map((h) => Buffer.from(h, "hex"));
    return () => activeScenario(url, prefix, readKeys, pause);
  }
  if (mode === "--routing") return routingCheck;
  const [frontend, keyPrefix, pythonKeyHex] = args;
  if (!frontend || !keyPrefix || pythonKeyHex === undefined) return null;
  return () => scenario(frontend, keyPrefix, pythonKeyHex);
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const run = chosen(process.argv.slice(2));
  if (run === null) {
    console.error("usage: node client.mjs <frontend-url> <key-prefix> <python-key-hex>\n" +
      "       node client.mjs --roles <frontend-url> <key-prefix>\n" +
      "       node client.mjs --several <url,url,...> <key-prefix>\n" +
      "       node client.mjs --active <url,url,...> <key-prefix> [python-key-hex...] [--pause]\n" +
      "       node client.mjs --routing < cases.json");
    process.exit(2);
  }
  run().then(
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
