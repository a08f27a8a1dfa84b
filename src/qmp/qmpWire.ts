/**
 * QMP on the wire (qemu docs/interop/qmp-spec.rst): one JSON object per line
 * each way. QEMU ends its lines with CRLF. This module touches no socket: it
 * splits bytes into capped lines, parses them and tells the four kinds of
 * server message apart.
 */

/**
 * The longest line we accept, in bytes. query-named-block-nodes is QEMU's
 * largest answer, about 1.5 KiB a node. A longer line is a protocol error, so
 * a peer that never sends a newline cannot make us buffer without end. (The
 * Python client caps lines at 10 MB.)
 */
export const MAX_LINE = 16 * 1024 * 1024;

/** A line or message that is not QMP; the client adds the socket's name and drops the connection. */
export class Malformed extends Error {}

/** Turns chunks of bytes into complete lines. Holds at most MAX_LINE bytes of an unfinished line. */
export class LineSplitter {
  private parts: Buffer[] = [];
  private pending = 0;

  constructor(private readonly maxLine = MAX_LINE) {}

  /** The lines that `chunk` completes, without their line ending. Throws Malformed on a line over the cap. */
  push(chunk: Buffer): string[] {
    const lines: string[] = [];
    let start = 0;
    for (let nl = chunk.indexOf(0x0a); nl !== -1; nl = chunk.indexOf(0x0a, start)) {
      this.hold(chunk.subarray(start, nl));
      lines.push(this.takeLine());
      start = nl + 1;
    }
    this.hold(chunk.subarray(start));
    return lines;
  }

  private hold(piece: Buffer): void {
    if (piece.length === 0) return;
    this.pending += piece.length;
    // The CR before LF counts too: one byte of slack, not worth a special case.
    if (this.pending > this.maxLine) throw new Malformed(`a message longer than ${this.maxLine / (1024 * 1024)} MiB`);
    this.parts.push(piece);
  }

  private takeLine(): string {
    // Decoded only once whole: a UTF-8 character may be split across chunks.
    const text = Buffer.concat(this.parts, this.pending).toString('utf8');
    this.parts = [];
    this.pending = 0;
    return text.endsWith('\r') ? text.slice(0, -1) : text;
  }
}

/** One command as a line, with `arguments` only when there are some. */
export function encodeCommand(command: string, args: object | undefined, id: string): string {
  return `${JSON.stringify(args === undefined ? { execute: command, id } : { execute: command, arguments: args, id })}\n`;
}

/** A line as a JSON object; anything else is Malformed. */
export function parseLine(line: string): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(line);
  } catch {
    throw new Malformed(`not JSON: ${preview(line)}`);
  }
  if (!isObject(value)) throw new Malformed(`not a QMP message: ${preview(line)}`);
  return value;
}

/** The start of something unexpected, quoted so that it stays on one line. */
export function preview(text: string): string {
  return JSON.stringify(text.length > 60 ? `${text.slice(0, 60)}…` : text);
}

export interface QmpVersion {
  major: number;
  minor: number;
  micro: number;
}

export interface QmpGreeting {
  QMP: { version: { qemu: QmpVersion; package: string }; capabilities: string[] };
}

export interface QmpReturn {
  return: unknown;
  id?: unknown;
}

export interface QmpErrorReply {
  error: { class: string; desc: string };
  id?: unknown;
}

export interface QmpEvent {
  event: string;
  /** Absent on the wire for events without data; parseEvent() makes it {}. */
  data: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

export function isGreeting(m: Record<string, unknown>): m is Record<string, unknown> & QmpGreeting {
  const qmp = m.QMP;
  if (!isObject(qmp) || !isObject(qmp.version) || !Array.isArray(qmp.capabilities)) return false;
  const v = qmp.version.qemu;
  return isObject(v) && [v.major, v.minor, v.micro].every(Number.isInteger);
}

export function isReturn(m: Record<string, unknown>): m is Record<string, unknown> & QmpReturn {
  return 'return' in m;
}

export function isErrorReply(m: Record<string, unknown>): m is Record<string, unknown> & QmpErrorReply {
  const e = m.error;
  return isObject(e) && typeof e.class === 'string' && typeof e.desc === 'string';
}

/** An event with its data defaulted, or null when `m` is not one. */
export function parseEvent(m: Record<string, unknown>): QmpEvent | null {
  if (typeof m.event !== 'string') return null;
  if (m.data !== undefined && !isObject(m.data)) return null;
  const t = isObject(m.timestamp) ? m.timestamp : {};
  return { event: m.event, data: m.data ?? {}, timestamp: { seconds: Number(t.seconds ?? 0), microseconds: Number(t.microseconds ?? 0) } };
}

export const formatVersion = (v: QmpVersion) => `${v.major}.${v.minor}.${v.micro}`;

/** Whether `v` is at least `min`. */
export function versionAtLeast(v: QmpVersion, min: QmpVersion): boolean {
  return v.major !== min.major ? v.major > min.major : v.minor !== min.minor ? v.minor > min.minor : v.micro >= min.micro;
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}
