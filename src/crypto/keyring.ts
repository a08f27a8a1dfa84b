import { randomBytes } from 'node:crypto';
import { key, type Storage } from '../storage/Storage.js';
import { UsageError, VaultError } from '../util/errors.js';
import { cipherOf, KEY_BYTES, type Cipher } from './aead.js';
import { KEY_ID, makeKeyFile, MASTER_BYTES, MAX_KEY_FILE_BYTES, parseKeyFile, serializeKeyFile, unsealKeyFile, type KeyFile, type ScryptParams } from './keyFile.js';
import { scryptParams } from './scryptCost.js';

/**
 * The repository's key files, `keys/<id>.json` (docs/design/12-encryption.md §12.3):
 * one per password, each sealing the same master key. The master key exists
 * unsealed only in memory. Not yet wired into any command: the caller (a
 * future `key` command) holds the repository's exclusive lock around changes.
 */

export const KEYS = 'keys';
/** More key files than this is not a repository we made: opening would try each for ~0.5 s. */
export const MAX_KEY_FILES = 32;

export interface MasterKey {
  /** The repository's cipher: every object and key file is sealed with it. */
  cipher: Cipher;
  /** Seals objects. */
  dataKey: Buffer;
  /** Names block objects (HMAC-SHA256). */
  macKey: Buffer;
}

export interface KeyInfo {
  id: string;
  created: string;
  N: number;
  r: number;
  p: number;
}

/** Tests pass cheap scrypt parameters here; otherwise the calibrated ones are used. */
export interface KeyOptions {
  scrypt?: ScryptParams;
}

/** A new random master key and its first key file. */
export async function createKeyring(storage: Storage, password: string, cipher: Cipher, options: KeyOptions = {}): Promise<{ master: MasterKey; keyId: string }> {
  if ((await keyFileIds(storage)).length > 0) throw new VaultError(storage.describe(KEYS), 'already holds key files');
  const master: MasterKey = { cipher, dataKey: randomBytes(KEY_BYTES), macKey: randomBytes(KEY_BYTES) };
  const keyId = await addKey(storage, master, password, options);
  return { master, keyId };
}

/**
 * The master key `password` opens, and the id of the key file that opened it.
 * Reads nothing outside `keys/`. A damaged key file is skipped (another may be
 * this password's); if none opens, a damaged one is named, since it may have
 * been this password's, else the wrong-password error.
 */
export async function openKeyring(storage: Storage, password: string, describe: string): Promise<{ master: MasterKey; keyId: string }> {
  const ids = await keyFileIds(storage);
  if (ids.length === 0) throw new VaultError(describe, `no key file in ${storage.describe(KEYS)}`);
  let damaged: VaultError | undefined;
  for (const id of ids) {
    let file: KeyFile;
    try {
      file = await readKeyFile(storage, id);
    } catch (err) {
      if (!(err instanceof VaultError)) throw err;
      damaged ??= err;
      continue;
    }
    const bytes = await unsealKeyFile(file, password);
    if (bytes !== null) return { master: masterOf(bytes, Buffer.from(file.sealed, 'base64')), keyId: id };
  }
  throw damaged ?? new VaultError(describe, 'wrong password (no key file opens with it)');
}

/** Every key file, oldest first; a damaged one is an error naming it. */
export async function listKeys(storage: Storage): Promise<KeyInfo[]> {
  const keys: KeyInfo[] = [];
  for (const id of await keyFileIds(storage)) {
    const { created, kdf } = await readKeyFile(storage, id);
    keys.push({ id, created, N: kdf.N, r: kdf.r, p: kdf.p });
  }
  return keys.sort((a, b) => a.created.localeCompare(b.created) || a.id.localeCompare(b.id));
}

/** Another password for `master`: a new key file, written whole and durably before this resolves. Its id. */
export async function addKey(storage: Storage, master: MasterKey, password: string, options: KeyOptions = {}): Promise<string> {
  if (password === '') throw new UsageError('a password cannot be empty');
  if ((await keyFileIds(storage)).length >= MAX_KEY_FILES) throw new VaultError(storage.describe(KEYS), `already holds ${MAX_KEY_FILES} key files, the most a repository may have`);
  const params = await scryptParams(options.scrypt);
  const payload = Buffer.concat([master.dataKey, master.macKey]);
  try {
    // A random id that is taken (never seen in practice) is simply drawn again: ifAbsent never replaces a key file.
    for (;;) {
      const id = randomBytes(8).toString('hex');
      const file = await makeKeyFile(id, master.cipher, payload, password, params);
      if (await storage.put(keyPath(id), serializeKeyFile(file), { ifAbsent: true })) return id;
    }
  } finally {
    payload.fill(0);
  }
}

/** Delete key file `id`; never the one in use (`inUseId`), never the last one that can be read. */
export async function removeKey(storage: Storage, id: string, inUseId: string): Promise<void> {
  if (!KEY_ID.test(id)) throw new UsageError(`${JSON.stringify(id)} is not a key id (16 lowercase hex digits)`);
  const ids = await keyFileIds(storage);
  if (!ids.includes(id)) throw new VaultError(storage.describe(keyPath(id)), 'no such key');
  if (id === inUseId) throw new VaultError(storage.describe(keyPath(id)), 'is the key in use: open the repository with another password to remove it');
  const others = await readableKeys(storage, ids.filter((other) => other !== id));
  if (others === 0) throw new VaultError(storage.describe(keyPath(id)), 'is the last key: the repository could never be opened again');
  await storage.delete(keyPath(id));
}

/**
 * Replace the password of key `inUseId`: the new key file is made durable
 * before the old one is deleted, so a crash between leaves both passwords
 * working (and two key files). The new key's id.
 */
export async function changePassword(storage: Storage, master: MasterKey, inUseId: string, newPassword: string, options: KeyOptions = {}): Promise<string> {
  const newId = await addKey(storage, master, newPassword, options);
  await removeKey(storage, inUseId, newId);
  return newId;
}

function keyPath(id: string): string {
  return key(KEYS, `${id}.json`);
}

/** Ids of the files named like key files; anything else under keys/ (a temporary file of a put) is not one. */
async function keyFileIds(storage: Storage): Promise<string[]> {
  const ids = (await storage.list(KEYS)).filter((name) => name.endsWith('.json') && KEY_ID.test(name.slice(0, -5))).map((name) => name.slice(0, -5));
  if (ids.length > MAX_KEY_FILES) throw new VaultError(storage.describe(KEYS), `holds ${ids.length} key files, more than the ${MAX_KEY_FILES} a repository may have`);
  return ids;
}

/** Read at most the size cap (plus one byte, to see it was exceeded), whatever the file's size. */
async function readKeyFile(storage: Storage, id: string): Promise<KeyFile> {
  const name = storage.describe(keyPath(id));
  const bytes = await storage.get(keyPath(id), { offset: 0, length: MAX_KEY_FILE_BYTES + 1 });
  const file = parseKeyFile(bytes, name);
  if (file.id !== id) throw new VaultError(name, `not a usable key file: its id is ${file.id}, not the ${id} its name says`);
  return file;
}

async function readableKeys(storage: Storage, ids: string[]): Promise<number> {
  let count = 0;
  for (const id of ids) {
    try {
      await readKeyFile(storage, id);
      count++;
    } catch (err) {
      // Damaged or gone since the listing: either way it opens nothing.
      if (!(err instanceof VaultError)) throw err;
    }
  }
  return count;
}

/** The authenticated payload and the cipher its envelope names (authenticated too: the header is in the AD). */
function masterOf(payload: Buffer, sealed: Buffer): MasterKey {
  if (payload.length !== MASTER_BYTES) throw new Error(`a master key is ${MASTER_BYTES} bytes, not ${payload.length}`);
  const cipher = cipherOf(sealed);
  if (cipher === undefined) throw new Error('an opened envelope names no cipher');
  const master = { cipher, dataKey: Buffer.from(payload.subarray(0, KEY_BYTES)), macKey: Buffer.from(payload.subarray(KEY_BYTES)) };
  payload.fill(0);
  return master;
}
