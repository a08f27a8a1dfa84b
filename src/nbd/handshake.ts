/**
 * Handshake messages as bytes and back: the greeting, options and their
 * replies, and the payloads of INFO/GO and the meta-context options. Pure
 * functions: no sockets. Parsers validate as they go and throw `Malformed`
 * naming what is wrong, which the caller turns into the protocol's answer.
 */
import { Info, NBD_MAGIC, OPTION_MAGIC, OPTION_REPLY_MAGIC } from './constants.js';
import { MAX_QUERIES, MAX_STRING } from './limits.js';

/** A payload that does not parse: the caller answers NBD_REP_ERR_INVALID (server) or drops the connection (client). */
export class Malformed extends Error {}

export const GREETING_SIZE = 18;
export const OPTION_HEADER_SIZE = 16;
export const OPTION_REPLY_HEADER_SIZE = 20;

export function encodeGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.alloc(GREETING_SIZE);
  b.writeBigUInt64BE(NBD_MAGIC, 0);
  b.writeBigUInt64BE(OPTION_MAGIC, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(OPTION_HEADER_SIZE);
  b.writeBigUInt64BE(OPTION_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(data.length, 12);
  return Buffer.concat([b, data]);
}

export interface OptionHeader {
  magicOk: boolean;
  option: number;
  length: number;
}

export function parseOptionHeader(b: Buffer): OptionHeader {
  return { magicOk: b.readBigUInt64BE(0) === OPTION_MAGIC, option: b.readUInt32BE(8), length: b.readUInt32BE(12) };
}

export function encodeOptionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(OPTION_REPLY_HEADER_SIZE);
  b.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type, 12);
  b.writeUInt32BE(data.length, 16);
  return Buffer.concat([b, data]);
}

export interface OptionReplyHeader {
  magicOk: boolean;
  option: number;
  type: number;
  length: number;
}

export function parseOptionReplyHeader(b: Buffer): OptionReplyHeader {
  return { magicOk: b.readBigUInt64BE(0) === OPTION_REPLY_MAGIC, option: b.readUInt32BE(8), type: b.readUInt32BE(12), length: b.readUInt32BE(16) };
}

/** A 32-bit length and UTF-8 bytes: how names and queries travel. */
export function encodeString(s: string): Buffer {
  const bytes = Buffer.from(s, 'utf8');
  const b = Buffer.alloc(4);
  b.writeUInt32BE(bytes.length, 0);
  return Buffer.concat([b, bytes]);
}

/** Walks a payload, refusing to read past its end or to take an oversized or NUL-bearing string. */
export class PayloadReader {
  private at = 0;
  constructor(
    private readonly b: Buffer,
    private readonly what: string,
  ) {}

  private need(n: number, field: string): void {
    if (this.at + n > this.b.length) throw new Malformed(`${this.what}: ${field} runs past the end of the payload`);
  }
  u16(field: string): number {
    this.need(2, field);
    const v = this.b.readUInt16BE(this.at);
    this.at += 2;
    return v;
  }
  u32(field: string): number {
    this.need(4, field);
    const v = this.b.readUInt32BE(this.at);
    this.at += 4;
    return v;
  }
  u64(field: string): number {
    this.need(8, field);
    const v = this.b.readBigUInt64BE(this.at);
    this.at += 8;
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new Malformed(`${this.what}: ${field} ${v} is too large`);
    return Number(v);
  }
  bytes(n: number, field: string): Buffer {
    this.need(n, field);
    const v = this.b.subarray(this.at, this.at + n);
    this.at += n;
    return v;
  }
  /** A string of `length` bytes (the length already read). */
  text(length: number, field: string): string {
    if (length > MAX_STRING) throw new Malformed(`${this.what}: ${field} is ${length} bytes (at most ${MAX_STRING})`);
    const bytes = this.bytes(length, field);
    if (bytes.includes(0)) throw new Malformed(`${this.what}: ${field} contains a NUL byte`);
    const s = bytes.toString('utf8');
    if (!Buffer.from(s, 'utf8').equals(bytes)) throw new Malformed(`${this.what}: ${field} is not valid UTF-8`);
    return s;
  }
  string(field: string): string {
    return this.text(this.u32(`${field} length`), field);
  }
  get left(): number {
    return this.b.length - this.at;
  }
  end(): void {
    if (this.left !== 0) throw new Malformed(`${this.what}: ${this.left} unexpected bytes after the last field`);
  }
}

/** INFO/GO: an export name and the NBD_INFO_* the client asks for. */
export interface GoRequest {
  name: string;
  infos: number[];
}

export function encodeGo(req: GoRequest): Buffer {
  const infos = Buffer.alloc(2 + 2 * req.infos.length);
  infos.writeUInt16BE(req.infos.length, 0);
  req.infos.forEach((t, i) => infos.writeUInt16BE(t, 2 + 2 * i));
  return Buffer.concat([encodeString(req.name), infos]);
}

export function parseGo(b: Buffer): GoRequest {
  const r = new PayloadReader(b, 'INFO/GO request');
  const name = r.string('export name');
  const count = r.u16('number of information requests');
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(r.u16('information request'));
  r.end();
  return { name, infos };
}

/** LIST_/SET_META_CONTEXT: an export name and the contexts asked for. */
export interface MetaContextRequest {
  name: string;
  queries: string[];
}

export function encodeMetaContext(req: MetaContextRequest): Buffer {
  const count = Buffer.alloc(4);
  count.writeUInt32BE(req.queries.length, 0);
  return Buffer.concat([encodeString(req.name), count, ...req.queries.map(encodeString)]);
}

export function parseMetaContext(b: Buffer): MetaContextRequest {
  const r = new PayloadReader(b, 'meta context request');
  const name = r.string('export name');
  const count = r.u32('number of queries');
  if (count > MAX_QUERIES) throw new Malformed(`meta context request: ${count} queries (at most ${MAX_QUERIES})`);
  const queries: string[] = [];
  for (let i = 0; i < count; i++) queries.push(r.string('query'));
  r.end();
  return { name, queries };
}

/** NBD_REP_META_CONTEXT: the id the server gives a context, and its name. */
export function encodeMetaContextReply(id: number, name: string): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(id, 0);
  return Buffer.concat([b, Buffer.from(name, 'utf8')]);
}

/** NBD_INFO_EXPORT: size and transmission flags. */
export function encodeInfoExport(size: number, flags: number): Buffer {
  const b = Buffer.alloc(12);
  b.writeUInt16BE(Info.EXPORT, 0);
  b.writeBigUInt64BE(BigInt(size), 2);
  b.writeUInt16BE(flags, 10);
  return b;
}

export function encodeInfoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  const b = Buffer.alloc(14);
  b.writeUInt16BE(Info.BLOCK_SIZE, 0);
  b.writeUInt32BE(minimum, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(maximum, 10);
  return b;
}

export function encodeInfoText(type: number, text: string): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(type, 0);
  return Buffer.concat([b, Buffer.from(text, 'utf8')]);
}

/** EXPORT_NAME's reply: size, transmission flags, and 124 zero bytes unless NO_ZEROES was agreed. */
export function encodeExportNameReply(size: number, flags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(noZeroes ? 10 : 134);
  b.writeBigUInt64BE(BigInt(size), 0);
  b.writeUInt16BE(flags, 8);
  return b;
}

// Client side: what a server sends during the handshake.

/** The oldstyle greeting's second magic: a server that takes no options at all. */
export const OLDSTYLE_MAGIC = 0x00420281861253n;

export type GreetingKind = 'newstyle' | 'oldstyle' | 'bad-magic' | 'not-nbd';

/** What the greeting's two magics (its first 16 bytes) say the peer is. */
export function parseGreetingMagics(b: Buffer): GreetingKind {
  if (b.readBigUInt64BE(0) !== NBD_MAGIC) return 'not-nbd';
  const second = b.readBigUInt64BE(8);
  return second === OPTION_MAGIC ? 'newstyle' : second === OLDSTYLE_MAGIC ? 'oldstyle' : 'bad-magic';
}

export function encodeClientFlags(flags: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(flags, 0);
  return b;
}

/** An NBD_REP_INFO payload: the two we use, or another (ignored, as the spec asks). */
export type InfoReply =
  | { kind: 'export'; size: number; flags: number }
  | { kind: 'blockSize'; minimum: number; preferred: number; maximum: number }
  | { kind: 'other'; type: number };

const isPowerOfTwo = (n: number) => n > 0 && (n & (n - 1)) === 0;

export function parseInfo(b: Buffer): InfoReply {
  const r = new PayloadReader(b, 'INFO reply');
  const type = r.u16('information type');
  if (type === Info.EXPORT) {
    const info = { kind: 'export' as const, size: r.u64('export size'), flags: r.u16('transmission flags') };
    r.end();
    return info;
  }
  if (type === Info.BLOCK_SIZE) {
    const info = { kind: 'blockSize' as const, minimum: r.u32('minimum block size'), preferred: r.u32('preferred block size'), maximum: r.u32('maximum block size') };
    r.end();
    if (!isPowerOfTwo(info.minimum) || info.minimum > 65536) throw new Malformed(`INFO reply: minimum block size ${info.minimum} is not a power of two up to 64 KiB`);
    if (info.maximum < info.minimum) throw new Malformed(`INFO reply: maximum block size ${info.maximum} is below the minimum ${info.minimum}`);
    return info;
  }
  return { kind: 'other', type };
}

/** NBD_REP_META_CONTEXT: the id the server gave a context, and its name. */
export function parseMetaContextReply(b: Buffer): { id: number; name: string } {
  const r = new PayloadReader(b, 'META_CONTEXT reply');
  const id = r.u32('context id');
  return { id, name: r.text(r.left, 'context name') };
}

export const EXPORT_NAME_REPLY_SIZE = 10;
/** The zeros that follow EXPORT_NAME's reply unless NO_ZEROES was agreed. */
export const EXPORT_NAME_REPLY_PADDING = 124;

/** EXPORT_NAME's reply without its padding: size and transmission flags. */
export function parseExportNameReply(b: Buffer): { size: number; flags: number } {
  const r = new PayloadReader(b, 'EXPORT_NAME reply');
  return { size: r.u64('export size'), flags: r.u16('transmission flags') };
}

/** A server's error message as one printable line (it ends up inside ours). */
export function peerText(b: Buffer, max = 300): string {
  const s = b.subarray(0, max * 4).toString('utf8').replace(/[\u0000-\u001f\u007f-\u009f]+/g, ' ').trim();
  return s.length > max ? `${s.slice(0, max)}…` : s;
}
