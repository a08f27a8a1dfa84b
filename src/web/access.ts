/**
 * Who may see the dashboard. On a loopback address without a token, anyone
 * on this host (the same trust as its files); anywhere else a bearer token
 * is required, read from a file so that it never shows in `ps`. A browser
 * gives the token once on the page that asks for it and keeps it as a
 * cookie; scripts send `Authorization: Bearer <token>`.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { isIP } from 'node:net';
import { describeFsError, UsageError, VaultError } from '../util/errors.js';

export interface ListenAddress {
  host: string;
  port: number;
}

export const DEFAULT_LISTEN = '127.0.0.1:8080';
export const TOKEN_COOKIE = 'vhdvault_token';
/** A token shorter than this is refused: it could be guessed. */
const MIN_TOKEN_LENGTH = 16;
const MAX_TOKEN_FILE = 4096;

/** `host:port`, `[v6]:port` or `:port` (all addresses); a usage error otherwise. */
export function parseListen(text: string, flag = '--http'): ListenAddress {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]*)):(\d{1,5})$/.exec(text);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) throw new UsageError(`${flag}: expected <host>:<port> (e.g. ${DEFAULT_LISTEN}), got ${JSON.stringify(text)}`);
  const host = m[1] ?? m[2] ?? '';
  return { host: host === '' ? '0.0.0.0' : host, port };
}

/** `host:port` as a person writes it: an IPv6 address in brackets. */
export const showListen = (a: ListenAddress) => (a.host.includes(':') ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`);

/** Whether only this host can reach the address. A name other than localhost may resolve anywhere: not loopback. */
export function isLoopback(host: string): boolean {
  if (host === 'localhost') return true;
  if (isIP(host) === 4) return host.startsWith('127.');
  return host === '::1';
}

/** The token in `file`: its first line, at least 16 characters. */
export async function readToken(file: string): Promise<string> {
  let text: string;
  try {
    const buf = await readFile(file);
    if (buf.length > MAX_TOKEN_FILE) throw new VaultError(file, `a token file of ${buf.length} bytes (at most ${MAX_TOKEN_FILE})`);
    text = buf.toString('utf8');
  } catch (err) {
    if (err instanceof VaultError) throw err;
    throw new VaultError(file, describeFsError(err));
  }
  const token = text.split(/\r?\n/)[0]!.trim();
  // It travels as `Authorization: Bearer <token>`: one word.
  if (/\s/.test(token)) throw new VaultError(file, 'the token must be one word (no spaces): e.g. openssl rand -hex 32 > ' + file);
  if (token.length < MIN_TOKEN_LENGTH) throw new VaultError(file, `the token must be at least ${MIN_TOKEN_LENGTH} characters (found ${token.length}): e.g. openssl rand -hex 32 > ${file}`);
  return token;
}

/** Equal in constant time: both sides are hashed first, so neither length nor content leaks through timing. */
export function sameToken(given: string, token: string): boolean {
  const a = createHash('sha256').update(given).digest();
  const b = createHash('sha256').update(token).digest();
  return timingSafeEqual(a, b);
}

/** The token a request carries: its Authorization header, else its cookie. */
export function tokenOf(headers: { authorization?: string; cookie?: string }): string | null {
  const auth = /^Bearer\s+(\S+)\s*$/i.exec(headers.authorization ?? '');
  if (auth) return auth[1]!;
  for (const part of (headers.cookie ?? '').split(';')) {
    const [name, ...value] = part.trim().split('=');
    if (name !== TOKEN_COOKIE) continue;
    try {
      return decodeURIComponent(value.join('='));
    } catch {
      return null; // not what we set: no token
    }
  }
  return null;
}
