/**
 * Transmission-phase messages as bytes and back: requests, simple replies and
 * structured reply chunks. Pure functions: no sockets.
 */
import { Chunk, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, ReplyFlag } from './constants.js';
import { MAX_STRING } from './limits.js';

export const REQUEST_SIZE = 28;
export const SIMPLE_REPLY_SIZE = 16;
export const STRUCTURED_HEADER_SIZE = 20;
/** The reply magics share their first 4 bytes' position: read 4, then the rest of the header. */
export const REPLY_MAGIC_SIZE = 4;

export interface Request {
  flags: number;
  type: number;
  cookie: bigint;
  offset: number;
  length: number;
}

export function encodeRequest(r: Request): Buffer {
  const b = Buffer.alloc(REQUEST_SIZE);
  b.writeUInt32BE(REQUEST_MAGIC, 0);
  b.writeUInt16BE(r.flags, 4);
  b.writeUInt16BE(r.type, 6);
  b.writeBigUInt64BE(r.cookie, 8);
  b.writeBigUInt64BE(BigInt(r.offset), 16);
  b.writeUInt32BE(r.length, 24);
  return b;
}

/** A request header, or null when its magic is wrong (the connection cannot continue). Offsets above 2^53 are kept exact enough to be refused as out of range. */
export function parseRequest(b: Buffer): Request | null {
  if (b.readUInt32BE(0) !== REQUEST_MAGIC) return null;
  const offset = b.readBigUInt64BE(16);
  return {
    flags: b.readUInt16BE(4),
    type: b.readUInt16BE(6),
    cookie: b.readBigUInt64BE(8),
    offset: offset > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(offset),
    length: b.readUInt32BE(24),
  };
}

export function encodeSimpleReply(cookie: bigint, error: number): Buffer {
  const b = Buffer.alloc(SIMPLE_REPLY_SIZE);
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  b.writeBigUInt64BE(cookie, 8);
  return b;
}

/** The header of a structured chunk whose payload is `length` bytes. */
export function encodeChunkHeader(cookie: bigint, type: number, length: number, done: boolean): Buffer {
  const b = Buffer.alloc(STRUCTURED_HEADER_SIZE);
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(done ? ReplyFlag.DONE : 0, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(cookie, 8);
  b.writeUInt32BE(length, 16);
  return b;
}

/** OFFSET_DATA: header, offset, then the data (returned as parts, so the data is not copied). */
export function encodeDataChunk(cookie: bigint, offset: number, data: Buffer, done: boolean): Buffer[] {
  const at = Buffer.alloc(8);
  at.writeBigUInt64BE(BigInt(offset), 0);
  return [encodeChunkHeader(cookie, Chunk.OFFSET_DATA, 8 + data.length, done), at, data];
}

export function encodeHoleChunk(cookie: bigint, offset: number, length: number, done: boolean): Buffer {
  const p = Buffer.alloc(12);
  p.writeBigUInt64BE(BigInt(offset), 0);
  p.writeUInt32BE(length, 8);
  return Buffer.concat([encodeChunkHeader(cookie, Chunk.OFFSET_HOLE, 12, done), p]);
}

export interface Extent {
  length: number;
  flags: number;
}

export function encodeBlockStatusChunk(cookie: bigint, contextId: number, extents: Extent[], done: boolean): Buffer {
  const p = Buffer.alloc(4 + 8 * extents.length);
  p.writeUInt32BE(contextId, 0);
  extents.forEach((e, i) => {
    p.writeUInt32BE(e.length, 4 + 8 * i);
    p.writeUInt32BE(e.flags, 8 + 8 * i);
  });
  return Buffer.concat([encodeChunkHeader(cookie, Chunk.BLOCK_STATUS, p.length, done), p]);
}

export function encodeErrorChunk(cookie: bigint, errno: number, message: string): Buffer {
  const text = Buffer.from(message, 'utf8').subarray(0, MAX_STRING);
  const p = Buffer.alloc(6);
  p.writeUInt32BE(errno, 0);
  p.writeUInt16BE(text.length, 4);
  return Buffer.concat([encodeChunkHeader(cookie, Chunk.ERROR, 6 + text.length, true), p, text]);
}

export function encodeNoneChunk(cookie: bigint): Buffer {
  return encodeChunkHeader(cookie, Chunk.NONE, 0, true);
}

// Client side: what a server sends in the transmission phase. The reply's
// 4-byte magic is read first (it says which header follows); these parse the rest.
import { Malformed, PayloadReader, peerText } from './handshake.js';

export const SIMPLE_REPLY_REST = SIMPLE_REPLY_SIZE - REPLY_MAGIC_SIZE;
export const CHUNK_HEADER_REST = STRUCTURED_HEADER_SIZE - REPLY_MAGIC_SIZE;
/** OFFSET_HOLE's payload: offset and size. */
export const HOLE_PAYLOAD_SIZE = 12;
/** OFFSET_DATA's payload starts with the data's offset. */
export const DATA_OFFSET_SIZE = 8;

export function parseSimpleReplyRest(b: Buffer): { error: number; cookie: bigint } {
  return { error: b.readUInt32BE(0), cookie: b.readBigUInt64BE(4) };
}

export interface ChunkHeader {
  flags: number;
  type: number;
  cookie: bigint;
  length: number;
}

export function parseChunkHeaderRest(b: Buffer): ChunkHeader {
  return { flags: b.readUInt16BE(0), type: b.readUInt16BE(2), cookie: b.readBigUInt64BE(4), length: b.readUInt32BE(12) };
}

export function parseDataOffset(b: Buffer): number {
  return new PayloadReader(b, 'OFFSET_DATA chunk').u64('offset');
}

export function parseHoleChunk(b: Buffer): { offset: number; length: number } {
  const r = new PayloadReader(b, 'OFFSET_HOLE chunk');
  const hole = { offset: r.u64('offset'), length: r.u32('hole size') };
  r.end();
  if (hole.length === 0) throw new Malformed('OFFSET_HOLE chunk: hole size is 0');
  return hole;
}

/** BLOCK_STATUS: a context id and one or more extents (the caller bounds the payload's size first). */
export function parseBlockStatusChunk(b: Buffer): { contextId: number; extents: Extent[] } {
  if (b.length < 12 || (b.length - 4) % 8 !== 0) throw new Malformed(`BLOCK_STATUS chunk: ${b.length} bytes is not 4 + a positive multiple of 8`);
  const contextId = b.readUInt32BE(0);
  const extents: Extent[] = [];
  for (let at = 4; at < b.length; at += 8) {
    const length = b.readUInt32BE(at);
    if (length === 0) throw new Malformed(`BLOCK_STATUS chunk: extent ${extents.length} has length 0`);
    extents.push({ length, flags: b.readUInt32BE(at + 4) });
  }
  return { contextId, extents };
}

export interface ChunkError {
  errno: number;
  message: string;
  /** ERROR_OFFSET's offset; null for ERROR and unknown error types. */
  offset: number | null;
}

/** Any error chunk: errno, message length and message, then (ERROR_OFFSET) an offset. */
export function parseErrorChunk(type: number, b: Buffer): ChunkError {
  const r = new PayloadReader(b, 'error chunk');
  const errno = r.u32('error');
  const length = r.u16('message length');
  const message = peerText(r.bytes(length, 'message'));
  const offset = type === Chunk.ERROR_OFFSET ? r.u64('offset') : null;
  if (type === Chunk.ERROR || type === Chunk.ERROR_OFFSET) r.end();
  return { errno, message, offset };
}
