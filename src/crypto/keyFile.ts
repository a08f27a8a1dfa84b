import { randomBytes, scrypt, type ScryptOptions } from 'node:crypto';
import { describeJsonError, UsageError, VaultError } from '../util/errors.js';
import { cipherOf, KEY_BYTES, OVERHEAD, open, seal, type Cipher } from './aead.js';

/**
 * One key file: the repository's master key sealed under a key derived from
 * one password (docs/design/12-encryption.md §12.2). Parsing is strict and
 * bounded: the file is read by anyone who opens the repository, so a hostile
 * one must not make us allocate a gigabyte or derive for minutes.
 */

export const KEY_FORMAT = 'vhdvault-key/1';
/** Never read more than this of a key file (ours are under 1 KiB). */
export const MAX_KEY_FILE_BYTES = 64 * 1024;
/** 8 random bytes: enough that two keys of a repository never collide, short enough to type. */
export const KEY_ID = /^[0-9a-f]{16}$/;

/**
 * Bounds on scrypt parameters read from a file. N = 2^20 with r = 8 is 1 GiB and
 * several seconds: the most a key file may ask of us. N below 2^10 is weaker
 * than anything we write, so such a file is not ours.
 */
export const SCRYPT_LIMITS = {
  minLogN: 10,
  maxLogN: 20,
  maxR: 16,
  maxP: 4,
  maxMemory: 1024 * 1024 * 1024,
  /** N·r·p: what N = 2^20, r = 8, p = 1 costs. */
  maxWork: 2 ** 23,
  saltBytes: { min: 16, max: 64 },
} as const;

const SALT_BYTES = 32;

export interface ScryptParams {
  N: number;
  r: number;
  p: number;
}

export interface KeyFile {
  format: typeof KEY_FORMAT;
  id: string;
  created: string;
  kdf: { name: 'scrypt'; N: number; r: number; p: number; salt: string };
  /** base64 of the master key (data key ‖ MAC key) sealed under the derived key. */
  sealed: string;
}

/** The master key's two halves, as sealed in a key file. */
export const MASTER_BYTES = 2 * KEY_BYTES;

/** The AD of a key file's sealed master key: its format and id, so a sealed value moved into another key file is refused. */
export function keyFileAd(id: string): string {
  return `${KEY_FORMAT}\0${id}`;
}

/** A new key file holding `master` under `password` (the derivation takes the calibrated time). */
export async function makeKeyFile(id: string, cipher: Cipher, master: Buffer, password: string, params: ScryptParams): Promise<KeyFile> {
  checkParams(params, 'new key file');
  const salt = randomBytes(SALT_BYTES);
  const wrapping = await deriveKey(password, salt, params);
  try {
    const sealed = seal(cipher, wrapping, master, keyFileAd(id));
    return { format: KEY_FORMAT, id, created: new Date().toISOString(), kdf: { name: 'scrypt', ...params, salt: salt.toString('base64') }, sealed: sealed.toString('base64') };
  } finally {
    wrapping.fill(0);
  }
}

export function serializeKeyFile(file: KeyFile): string {
  return `${JSON.stringify(file, null, 2)}\n`;
}

/**
 * The master key sealed in `file` if `password` is its password, else null.
 * Damage is indistinguishable from a wrong password here (both fail authentication).
 */
export async function unsealKeyFile(file: KeyFile, password: string): Promise<Buffer | null> {
  const wrapping = await deriveKey(password, Buffer.from(file.kdf.salt, 'base64'), file.kdf);
  try {
    return open(wrapping, Buffer.from(file.sealed, 'base64'), keyFileAd(file.id));
  } catch (err) {
    if (err instanceof VaultError) return null;
    throw err;
  } finally {
    wrapping.fill(0);
  }
}

/** Check a key file's bytes, refusing anything we would not have written; `name` is how messages name the file. */
export function parseKeyFile(bytes: Buffer, name: string): KeyFile {
  const refuse = (why: string) => new VaultError(name, `not a usable key file: ${why}`);
  if (bytes.length > MAX_KEY_FILE_BYTES) throw refuse(`larger than ${MAX_KEY_FILE_BYTES} bytes`);
  const text = bytes.toString('utf8');
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    // RangeError (deep nesting) lands here too: the size cap bounds its cost.
    throw refuse(`not JSON (${describeJsonError(text, err)})`);
  }
  const o = record(value, 'the file', refuse);
  exactFields(o, ['format', 'id', 'created', 'kdf', 'sealed'], 'the file', refuse);
  if (o.format !== KEY_FORMAT) throw refuse(`format is ${JSON.stringify(o.format)}, not "${KEY_FORMAT}"`);
  if (typeof o.id !== 'string' || !KEY_ID.test(o.id)) throw refuse('id is not 16 lowercase hex digits');
  if (typeof o.created !== 'string' || o.created.length > 40 || Number.isNaN(Date.parse(o.created))) throw refuse('created is not an ISO time');
  const kdf = record(o.kdf, 'kdf', refuse);
  exactFields(kdf, ['name', 'N', 'r', 'p', 'salt'], 'kdf', refuse);
  if (kdf.name !== 'scrypt') throw refuse(`kdf.name is ${JSON.stringify(kdf.name)}, not "scrypt"`);
  const params = { N: kdf.N, r: kdf.r, p: kdf.p };
  const problem = paramsProblem(params);
  if (problem !== null) throw refuse(problem);
  const salt = base64(kdf.salt, 'kdf.salt', refuse);
  if (salt.length < SCRYPT_LIMITS.saltBytes.min || salt.length > SCRYPT_LIMITS.saltBytes.max) throw refuse(`kdf.salt is ${salt.length} bytes, not ${SCRYPT_LIMITS.saltBytes.min}-${SCRYPT_LIMITS.saltBytes.max}`);
  const sealed = base64(o.sealed, 'sealed', refuse);
  if (sealed.length !== OVERHEAD + MASTER_BYTES) throw refuse(`sealed is ${sealed.length} bytes, not ${OVERHEAD + MASTER_BYTES}`);
  if (cipherOf(sealed) === undefined) throw refuse('sealed is not an envelope of a known cipher');
  return { format: KEY_FORMAT, id: o.id, created: o.created, kdf: { name: 'scrypt', ...(params as ScryptParams), salt: kdf.salt as string }, sealed: o.sealed as string };
}

/** Why scrypt parameters are out of bounds, or null when they are fine. */
export function paramsProblem(params: { N: unknown; r: unknown; p: unknown }): string | null {
  const { N, r, p } = params;
  if (!Number.isSafeInteger(N) || (N as number) < 2 ** SCRYPT_LIMITS.minLogN || (N as number) > 2 ** SCRYPT_LIMITS.maxLogN || ((N as number) & ((N as number) - 1)) !== 0) {
    return `kdf.N must be a power of two from 2^${SCRYPT_LIMITS.minLogN} to 2^${SCRYPT_LIMITS.maxLogN}`;
  }
  if (!Number.isSafeInteger(r) || (r as number) < 1 || (r as number) > SCRYPT_LIMITS.maxR) return `kdf.r must be an integer from 1 to ${SCRYPT_LIMITS.maxR}`;
  if (!Number.isSafeInteger(p) || (p as number) < 1 || (p as number) > SCRYPT_LIMITS.maxP) return `kdf.p must be an integer from 1 to ${SCRYPT_LIMITS.maxP}`;
  const n = N as number;
  const [rr, pp] = [r as number, p as number];
  // V's 128·N·r dominates; its few extra blocks are left out so that N = 2^20, r = 8 is exactly the cap.
  if (128 * n * rr > SCRYPT_LIMITS.maxMemory) return 'kdf parameters need more than 1 GiB of memory';
  if (n * rr * pp > SCRYPT_LIMITS.maxWork) return 'kdf parameters ask for more work than N=2^20, r=8, p=1';
  return null;
}

/** The bytes OpenSSL's scrypt allocates (V: 128·r·(N+2), B: 128·r·p), which `maxmem` must cover. */
export function scryptMemory({ N, r, p }: ScryptParams): number {
  return 128 * r * (N + 2) + 128 * r * p;
}

/** The 32-byte wrapping key for `password`. Passwords are NFC-normalised, so the same word typed on two systems is the same key. */
export async function deriveKey(password: string, salt: Buffer, params: ScryptParams): Promise<Buffer> {
  checkParams(params, 'key derivation');
  // maxmem's default (32 MiB) is below what N=2^16, r=8 needs; a margin covers OpenSSL's own rounding.
  const options: ScryptOptions = { N: params.N, r: params.r, p: params.p, maxmem: scryptMemory(params) + 1024 * 1024 };
  return await new Promise((resolve, reject) => {
    scrypt(Buffer.from(password.normalize('NFC'), 'utf8'), salt, KEY_BYTES, options, (err, key) => (err ? reject(err) : resolve(key)));
  });
}

/** Parameters reaching us from code (not from a file) out of bounds are a bug or a bad override. */
function checkParams(params: ScryptParams, what: string): void {
  const problem = paramsProblem(params);
  if (problem !== null) throw new UsageError(`${what}: ${problem}`);
}

function record(value: unknown, what: string, refuse: (why: string) => VaultError): Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw refuse(`${what} is not a JSON object`);
  return value as Record<string, unknown>;
}

function exactFields(o: Record<string, unknown>, fields: string[], what: string, refuse: (why: string) => VaultError): void {
  for (const f of fields) if (!Object.hasOwn(o, f)) throw refuse(`${what} has no "${f}"`);
  const extra = Object.keys(o).find((k) => !fields.includes(k));
  if (extra !== undefined) throw refuse(`${what} has an unknown field ${JSON.stringify(extra.slice(0, 40))}`);
}

/** Strict base64: canonical (re-encodes to itself), so two spellings never mean one value. */
function base64(value: unknown, what: string, refuse: (why: string) => VaultError): Buffer {
  if (typeof value !== 'string' || !/^[A-Za-z0-9+/]*={0,2}$/.test(value)) throw refuse(`${what} is not base64`);
  const bytes = Buffer.from(value, 'base64');
  if (bytes.toString('base64') !== value) throw refuse(`${what} is not base64`);
  return bytes;
}
