import { createCipheriv, createDecipheriv, createHmac, randomBytes } from 'node:crypto';
import { VaultError } from '../util/errors.js';
import { SEALED_MAGIC } from '../util/sealedMagic.js';

/**
 * The envelope every encrypted object is sealed in (docs/design/12-encryption.md §12.1):
 *
 *   magic (4) | cipher id (1) | nonce (12) | ciphertext (= plaintext length) | tag (16)
 *
 * The cipher is read back from the envelope, so opening needs only the key and
 * the associated data. The 5 header bytes are authenticated along with the
 * caller's AD: a flipped cipher byte fails authentication instead of selecting
 * another algorithm.
 */

export type Cipher = 'aes-256-gcm' | 'chacha20-poly1305';

export const CIPHERS: readonly Cipher[] = ['aes-256-gcm', 'chacha20-poly1305'];

/** "VVE" then format 1: what starts every sealed object. */
export const MAGIC = SEALED_MAGIC;
export const KEY_BYTES = 32;
export const NONCE_BYTES = 12;
export const TAG_BYTES = 16;
const HEADER_BYTES = MAGIC.length + 1;
/** What sealing adds to a plaintext. */
export const OVERHEAD = HEADER_BYTES + NONCE_BYTES + TAG_BYTES;

/** Envelope byte → cipher. 0 is never used, so a zeroed header is never a valid one. */
const CIPHER_IDS: ReadonlyMap<number, Cipher> = new Map([
  [1, 'aes-256-gcm'],
  [2, 'chacha20-poly1305'],
]);

export const AUTHENTICATION_FAILED = 'authentication failed: damaged, or not where it belongs';

export function isCipher(value: unknown): value is Cipher {
  return typeof value === 'string' && (CIPHERS as readonly string[]).includes(value);
}

/** Seal `plaintext` under `key` with a fresh random nonce; `ad` is authenticated, not stored. */
export function seal(cipher: Cipher, key: Buffer, plaintext: Buffer, ad: Buffer | string): Buffer {
  return Buffer.concat(sealPieces(cipher, key, [plaintext], ad));
}

/**
 * The same envelope as pieces to be written one after the other (a file
 * written with writev): no copy of a 2 MiB block to join them. A fresh
 * 2 MiB buffer costs its page faults, so a joined copy halved sealing's rate.
 */
export function sealPieces(cipher: Cipher, key: Buffer, plaintext: readonly Uint8Array[], ad: Buffer | string): Buffer[] {
  checkKey(key);
  const header = Buffer.concat([MAGIC, Buffer.from([cipherId(cipher)])]);
  // 96-bit random nonces: safe for far more objects than one key will ever seal (2^32 per key keeps the collision chance below 2^-32).
  const nonce = randomBytes(NONCE_BYTES);
  // Two identical calls only because @types/node types each cipher family apart, not a union of them.
  const c = cipher === 'aes-256-gcm' ? createCipheriv(cipher, key, nonce, { authTagLength: TAG_BYTES }) : createCipheriv(cipher, key, nonce, { authTagLength: TAG_BYTES });
  c.setAAD(associatedData(header, ad));
  // Elements run in order: every update, then final, then the tag.
  return [header, nonce, ...plaintext.map((p) => c.update(p)), c.final(), c.getAuthTag()];
}

/**
 * The plaintext of an envelope sealed under `key` with the same `ad`; a
 * VaultError naming `what` for anything else (nothing of a refused plaintext is returned).
 */
export function open(key: Buffer, sealed: Buffer, ad: Buffer | string, what = 'sealed object'): Buffer {
  checkKey(key);
  if (sealed.length < OVERHEAD) throw new VaultError(what, `too short to be sealed (${sealed.length} bytes, at least ${OVERHEAD})`);
  if (!sealed.subarray(0, MAGIC.length).equals(MAGIC)) throw new VaultError(what, 'not a sealed object (bad magic)');
  const id = sealed[MAGIC.length]!;
  const cipher = CIPHER_IDS.get(id);
  if (cipher === undefined) throw new VaultError(what, `unknown cipher id ${id}`);
  const header = sealed.subarray(0, HEADER_BYTES);
  const nonce = sealed.subarray(HEADER_BYTES, HEADER_BYTES + NONCE_BYTES);
  const body = sealed.subarray(HEADER_BYTES + NONCE_BYTES, sealed.length - TAG_BYTES);
  const tag = sealed.subarray(sealed.length - TAG_BYTES);
  const d = cipher === 'aes-256-gcm' ? createDecipheriv(cipher, key, nonce, { authTagLength: TAG_BYTES }) : createDecipheriv(cipher, key, nonce, { authTagLength: TAG_BYTES });
  d.setAAD(associatedData(header, ad));
  d.setAuthTag(tag);
  const plaintext = d.update(body);
  try {
    // Both AEADs release nothing at final(): no copy of the plaintext to append nothing.
    const rest = d.final();
    return rest.length === 0 ? plaintext : Buffer.concat([plaintext, rest]);
  } catch {
    // final() throws only on a tag mismatch; which byte or which AD was wrong is not knowable.
    plaintext.fill(0);
    throw new VaultError(what, AUTHENTICATION_FAILED);
  }
}

/** The cipher an envelope says it was sealed with (not authenticated until it is opened). */
export function cipherOf(sealed: Buffer): Cipher | undefined {
  if (sealed.length < HEADER_BYTES || !sealed.subarray(0, MAGIC.length).equals(MAGIC)) return undefined;
  return CIPHER_IDS.get(sealed[MAGIC.length]!);
}

/** A block object's name: hex HMAC-SHA256 of its plaintext under the MAC key, so names reveal nothing to whoever lacks the key. */
export function nameOf(macKey: Buffer, plaintext: Buffer): string {
  checkKey(macKey);
  return createHmac('sha256', macKey).update(plaintext).digest('hex');
}

/** The header is fixed-length, so header ‖ ad is unambiguous. */
function associatedData(header: Buffer, ad: Buffer | string): Buffer {
  return Buffer.concat([header, typeof ad === 'string' ? Buffer.from(ad, 'utf8') : ad]);
}

function cipherId(cipher: Cipher): number {
  for (const [id, c] of CIPHER_IDS) if (c === cipher) return id;
  throw new Error(`unknown cipher ${JSON.stringify(cipher)}`);
}

/** A wrong-sized key is a bug in the caller, not bad input: a plain Error. */
function checkKey(key: Buffer): void {
  if (key.length !== KEY_BYTES) throw new Error(`a key is ${KEY_BYTES} bytes, not ${key.length}`);
}
