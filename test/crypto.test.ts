/**
 * The cryptographic core of encrypted repositories (docs/design/12-encryption.md): the
 * sealed envelope, block names, key files and the keyring over a real LocalStorage.
 * Key files here use N = 2^10 (milliseconds), except the one test of the real calibration.
 */
import { createHash, randomBytes } from 'node:crypto';
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { tempDir } from './helpers/files.js';
import { AUTHENTICATION_FAILED, CIPHERS, type Cipher, MAGIC, nameOf, open, OVERHEAD, seal } from '../src/crypto/aead.js';
import { deriveKey, MAX_KEY_FILE_BYTES, parseKeyFile, SCRYPT_LIMITS } from '../src/crypto/keyFile.js';
import { addKey, changePassword, createKeyring, listKeys, openKeyring, removeKey } from '../src/crypto/keyring.js';
import { calibrateScrypt, chooseLogN, MIN_LOG_N, PROBE_LOG_N, scryptParams, TEST_N_ENV } from '../src/crypto/scryptCost.js';
import { LocalStorage } from '../src/storage/LocalStorage.js';
import type { Storage } from '../src/storage/Storage.js';
import { UsageError, VaultError } from '../src/util/errors.js';

const FAST = { scrypt: { N: 2 ** 10, r: 8, p: 1 } };
const REPO = 'repo /backups/main';
const WRONG = `${REPO}: wrong password (no key file opens with it)`;

async function newStorage(): Promise<LocalStorage> {
  return new LocalStorage(await tempDir('vhdvault-crypto-'));
}

/** The error `fn` throws (it must throw). */
function caught(fn: () => unknown): Error {
  try {
    fn();
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected an error');
}

async function rejection(promise: Promise<unknown>): Promise<Error> {
  return promise.then(
    () => {
      throw new Error('expected a rejection');
    },
    (err: unknown) => err as Error,
  );
}

describe('the sealed envelope', () => {
  const key = randomBytes(32);
  const plaintext = Buffer.from('a block of a disk, or some metadata');

  it.each(CIPHERS)('round-trips with %s, empty plaintexts and string or buffer AD alike', (cipher) => {
    const sealed = seal(cipher, key, plaintext, 'disks/vm/1.json');
    expect(sealed.length).toBe(plaintext.length + OVERHEAD);
    expect(sealed.subarray(0, 4)).toEqual(MAGIC);
    expect(open(key, sealed, 'disks/vm/1.json')).toEqual(plaintext);
    expect(open(key, sealed, Buffer.from('disks/vm/1.json'))).toEqual(plaintext);
    expect(open(key, seal(cipher, key, Buffer.alloc(0), ''), '')).toEqual(Buffer.alloc(0));
    const big = randomBytes(2 * 1024 * 1024 + 7);
    // equals(), not toEqual(): a deep comparison of 2 MiB byte by byte takes vitest seconds.
    expect(open(key, seal(cipher, key, big, Buffer.from([1, 2, 3])), Buffer.from([1, 2, 3])).equals(big)).toBe(true);
  });

  it('uses a fresh nonce for every seal, so the same plaintext never seals the same', () => {
    const a = seal('aes-256-gcm', key, plaintext, 'ad');
    const b = seal('aes-256-gcm', key, plaintext, 'ad');
    expect(a.subarray(5, 17)).not.toEqual(b.subarray(5, 17));
    expect(a.subarray(17)).not.toEqual(b.subarray(17));
  });

  it.each(CIPHERS)('%s: refuses a flipped bit at every byte of the envelope', (cipher) => {
    const sealed = seal(cipher, key, plaintext, 'ad');
    for (let at = 0; at < sealed.length; at++) {
      for (const bit of [0x01, 0x80]) {
        const damaged = Buffer.from(sealed);
        damaged[at]! ^= bit;
        const err = caught(() => open(key, damaged, 'ad', 'disks/vm/blocks/7'));
        expect(err, `byte ${at}`).toBeInstanceOf(VaultError);
        expect(err.message.startsWith('disks/vm/blocks/7: ')).toBe(true);
        if (at >= 5) expect(err.message).toBe(`disks/vm/blocks/7: ${AUTHENTICATION_FAILED}`);
      }
    }
  });

  it('says which of magic, cipher or size is wrong', () => {
    const sealed = seal('chacha20-poly1305', key, plaintext, 'ad');
    const badMagic = Buffer.from(sealed);
    badMagic[0] = 0x00;
    expect(caught(() => open(key, badMagic, 'ad', 'x')).message).toBe('x: not a sealed object (bad magic)');
    const badCipher = Buffer.from(sealed);
    badCipher[4] = 9;
    expect(caught(() => open(key, badCipher, 'ad', 'x')).message).toBe('x: unknown cipher id 9');
    // The other known cipher in the header: refused by authentication, since the header is in the AD.
    const otherCipher = Buffer.from(sealed);
    otherCipher[4] = 1;
    expect(caught(() => open(key, otherCipher, 'ad', 'x')).message).toBe(`x: ${AUTHENTICATION_FAILED}`);
    expect(caught(() => open(key, sealed.subarray(0, OVERHEAD - 1), 'ad', 'x')).message).toBe(`x: too short to be sealed (${OVERHEAD - 1} bytes, at least ${OVERHEAD})`);
  });

  it.each(CIPHERS)('%s: refuses truncation, extension, a wrong AD and a wrong key', (cipher) => {
    const sealed = seal(cipher, key, plaintext, 'repo-1/vm/0');
    for (const cut of [1, 16, sealed.length - OVERHEAD]) expect(() => open(key, sealed.subarray(0, sealed.length - cut), 'repo-1/vm/0')).toThrow(AUTHENTICATION_FAILED);
    expect(() => open(key, Buffer.concat([sealed, Buffer.alloc(1)]), 'repo-1/vm/0')).toThrow(AUTHENTICATION_FAILED);
    for (const ad of ['repo-1/vm/1', 'repo-1/vm/0 ', '', 'repo-2/vm/0']) expect(() => open(key, sealed, ad)).toThrow(AUTHENTICATION_FAILED);
    expect(() => open(randomBytes(32), sealed, 'repo-1/vm/0')).toThrow(AUTHENTICATION_FAILED);
  });

  it('refuses an envelope swapped with another, whole or its nonce alone', () => {
    const a = seal('aes-256-gcm', key, Buffer.from('block 0'), 'vm/0');
    const b = seal('aes-256-gcm', key, Buffer.from('block 1'), 'vm/1');
    expect(() => open(key, b, 'vm/0')).toThrow(AUTHENTICATION_FAILED);
    expect(() => open(key, a, 'vm/1')).toThrow(AUTHENTICATION_FAILED);
    const mixed = Buffer.concat([a.subarray(0, 5), b.subarray(5, 17), a.subarray(17)]);
    expect(() => open(key, mixed, 'vm/0')).toThrow(AUTHENTICATION_FAILED);
  });

  it('refuses keys of the wrong size as a bug, not as bad input', () => {
    expect(() => seal('aes-256-gcm', randomBytes(16), plaintext, '')).toThrow('a key is 32 bytes, not 16');
    expect(caught(() => open(randomBytes(31), seal('aes-256-gcm', key, plaintext, ''), ''))).not.toBeInstanceOf(VaultError);
  });
});

describe('block names', () => {
  it('are keyed MACs: not the SHA-256, and different under another MAC key', () => {
    const block = randomBytes(4096);
    const macKey = randomBytes(32);
    const name = nameOf(macKey, block);
    expect(name).toMatch(/^[0-9a-f]{64}$/);
    expect(name).toBe(nameOf(macKey, Buffer.from(block)));
    expect(name).not.toBe(createHash('sha256').update(block).digest('hex'));
    expect(name).not.toBe(nameOf(randomBytes(32), block));
    expect(name).not.toBe(nameOf(macKey, Buffer.concat([block, Buffer.alloc(1)])));
  });
});

describe('the keyring', () => {
  it.each(CIPHERS)('%s: create, then open with the password; the master key is random and whole', async (cipher: Cipher) => {
    const storage = await newStorage();
    const { master, keyId } = await createKeyring(storage, 'correct horse', cipher, FAST);
    expect(master.cipher).toBe(cipher);
    expect(master.dataKey.length).toBe(32);
    expect(master.macKey.length).toBe(32);
    expect(master.dataKey).not.toEqual(master.macKey);
    expect(await storage.list('keys')).toEqual([`${keyId}.json`]);
    const opened = await openKeyring(storage, 'correct horse', REPO);
    expect(opened.keyId).toBe(keyId);
    expect(opened.master).toEqual(master);
    await expect(createKeyring(storage, 'again', cipher, FAST)).rejects.toThrow(`${storage.describe('keys')}: already holds key files`);
  });

  it('says exactly "wrong password" for a wrong one, and reads nothing outside keys/', async () => {
    const storage = await newStorage();
    await createKeyring(storage, 'right', 'aes-256-gcm', FAST);
    await addKey(storage, (await openKeyring(storage, 'right', REPO)).master, 'also right', FAST);
    const { storage: watched, touched } = watch(storage);
    const err = await rejection(openKeyring(watched, 'wrong', REPO));
    expect(err).toBeInstanceOf(VaultError);
    expect(err.message).toBe(WRONG);
    await openKeyring(watched, 'also right', REPO);
    expect(touched.length).toBeGreaterThan(0);
    expect(touched.filter((k) => k !== 'keys' && !k.startsWith('keys/'))).toEqual([]);
  });

  it('says so when there is no key file at all', async () => {
    const storage = await newStorage();
    await expect(openKeyring(storage, 'x', REPO)).rejects.toThrow(`${REPO}: no key file in ${storage.describe('keys')}`);
  });

  it('normalises passwords (NFC) and refuses an empty one', async () => {
    const storage = await newStorage();
    const { master } = await createKeyring(storage, 'M\u00fcller', 'chacha20-poly1305', FAST);
    expect((await openKeyring(storage, 'Mu\u0308ller', REPO)).master).toEqual(master);
    await expect(addKey(storage, master, '', FAST)).rejects.toBeInstanceOf(UsageError);
  });

  it('adds a password: both open the same master key; list shows both', async () => {
    const storage = await newStorage();
    const { master, keyId: first } = await createKeyring(storage, 'one', 'aes-256-gcm', FAST);
    const second = await addKey(storage, master, 'two', FAST);
    expect(second).not.toBe(first);
    const a = await openKeyring(storage, 'one', REPO);
    const b = await openKeyring(storage, 'two', REPO);
    expect([a.keyId, b.keyId]).toEqual([first, second]);
    expect(b.master).toEqual(a.master);
    const keys = await listKeys(storage);
    expect(keys.map((k) => k.id).sort()).toEqual([first, second].sort());
    expect(keys[0]).toMatchObject({ N: 1024, r: 8, p: 1 });
    expect(Date.parse(keys[0]!.created)).not.toBeNaN();
  });

  it('removes a key: its password no longer opens; never the one in use, the last one or an unknown one', async () => {
    const storage = await newStorage();
    const { master, keyId: first } = await createKeyring(storage, 'one', 'aes-256-gcm', FAST);
    const second = await addKey(storage, master, 'two', FAST);
    const path = (id: string) => storage.describe(`keys/${id}.json`);
    await expect(removeKey(storage, first, first)).rejects.toThrow(`${path(first)}: is the key in use: open the repository with another password to remove it`);
    await expect(removeKey(storage, 'feedfacefeedface', first)).rejects.toThrow(`${path('feedfacefeedface')}: no such key`);
    await expect(removeKey(storage, '../vhdvault', first)).rejects.toBeInstanceOf(UsageError);
    await removeKey(storage, first, second);
    await expect(openKeyring(storage, 'one', REPO)).rejects.toThrow(WRONG);
    expect((await openKeyring(storage, 'two', REPO)).master).toEqual(master);
    // The last key, even when the caller claims another is in use.
    await expect(removeKey(storage, second, first)).rejects.toThrow(`${path(second)}: is the last key: the repository could never be opened again`);
    expect(await storage.list('keys')).toEqual([`${second}.json`]);
  });

  it('does not count a damaged key file as a key that would remain', async () => {
    const storage = await newStorage();
    const { master, keyId: first } = await createKeyring(storage, 'one', 'aes-256-gcm', FAST);
    const second = await addKey(storage, master, 'two', FAST);
    await writeFile(join(storage.root, 'keys', `${second}.json`), '{"format": "vhdvault-key/1"}');
    await expect(removeKey(storage, first, second)).rejects.toThrow('is the last key');
  });

  it('changes a password: the new one opens, the old one no longer', async () => {
    const storage = await newStorage();
    const { master, keyId } = await createKeyring(storage, 'old', 'chacha20-poly1305', FAST);
    const newId = await changePassword(storage, master, keyId, 'new', FAST);
    expect(newId).not.toBe(keyId);
    expect((await openKeyring(storage, 'new', REPO)).master).toEqual(master);
    await expect(openKeyring(storage, 'old', REPO)).rejects.toThrow(WRONG);
    expect(await storage.list('keys')).toEqual([`${newId}.json`]);
  });

  it('leaves both passwords working when killed between adding the new key and removing the old one', async () => {
    const storage = await newStorage();
    const { master, keyId } = await createKeyring(storage, 'old', 'aes-256-gcm', FAST);
    // The process dies at the delete: everything before it is durable, nothing after it happens.
    const killed = Object.assign(Object.create(storage) as Storage, {
      delete: () => Promise.reject(new Error('killed')),
    });
    await expect(changePassword(killed, master, keyId, 'new', FAST)).rejects.toThrow('killed');
    expect((await openKeyring(storage, 'old', REPO)).master).toEqual(master);
    expect((await openKeyring(storage, 'new', REPO)).master).toEqual(master);
    expect(await storage.list('keys')).toHaveLength(2);
  });

  it('never writes the master key unsealed: not raw, hex or base64, in any key file', async () => {
    const storage = await newStorage();
    const { master } = await createKeyring(storage, 'one', 'aes-256-gcm', FAST);
    await addKey(storage, master, 'two', FAST);
    const secrets = [master.dataKey, master.macKey, Buffer.concat([master.dataKey, master.macKey])];
    // Any 12-byte window of a key would do to recognise it: base64 of a window that starts at a multiple of 3 is exact.
    const needles = secrets.flatMap((s) => [s, s.subarray(0, 12), s.subarray(12, 24)]).flatMap((s) => [s, Buffer.from(s.toString('hex')), Buffer.from(s.toString('base64')), Buffer.from(s.toString('base64url'))]);
    const files = await storage.list('keys');
    expect(files).toHaveLength(2);
    for (const name of files) {
      const bytes = await readFile(join(storage.root, 'keys', name));
      for (const needle of needles) expect(bytes.includes(needle)).toBe(false);
      const text = bytes.toString('utf8').toLowerCase();
      expect(text.includes(master.dataKey.toString('hex').slice(0, 24))).toBe(false);
    }
    // Only keys/ was written: no temporary file left behind either.
    expect(await storage.list('')).toEqual(['keys']);
  });

  it('skips a damaged key file when another opens; names it when none does', async () => {
    const storage = await newStorage();
    const { master } = await createKeyring(storage, 'good', 'aes-256-gcm', FAST);
    const junk = join(storage.root, 'keys', '0000000000000000.json');
    await writeFile(junk, 'not json');
    expect((await openKeyring(storage, 'good', REPO)).master).toEqual(master);
    await expect(openKeyring(storage, 'bad', REPO)).rejects.toThrow(`${junk}: not a usable key file: not JSON`);
    await expect(listKeys(storage)).rejects.toThrow(junk);
  });

  it('refuses a key file whose id is not the one its name says (a copy under another name)', async () => {
    const storage = await newStorage();
    const { keyId } = await createKeyring(storage, 'pw', 'aes-256-gcm', FAST);
    const copy = join(storage.root, 'keys', 'abcdefabcdefabcd.json');
    await writeFile(copy, await readFile(join(storage.root, 'keys', `${keyId}.json`)));
    await expect(listKeys(storage)).rejects.toThrow(`${copy}: not a usable key file: its id is ${keyId}, not the abcdefabcdefabcd its name says`);
  });
});

describe('hostile key files', () => {
  /** A valid key file's JSON, to be spoiled one field at a time. */
  async function validFile(): Promise<{ storage: LocalStorage; id: string; path: string; json: Record<string, unknown> }> {
    const storage = await newStorage();
    const { keyId } = await createKeyring(storage, 'pw', 'aes-256-gcm', FAST);
    const path = join(storage.root, 'keys', `${keyId}.json`);
    return { storage, id: keyId, path, json: JSON.parse(await readFile(path, 'utf8')) as Record<string, unknown> };
  }

  const kdf = (json: Record<string, unknown>, change: Record<string, unknown>) => ({ ...json, kdf: { ...(json.kdf as object), ...change } });

  it('are refused quickly, each with one line naming the file', async () => {
    const { storage, path, json } = await validFile();
    const cases: Array<[string, string]> = [
      [JSON.stringify(kdf(json, { N: 2 ** 30 })), 'kdf.N must be a power of two from 2^10 to 2^20'],
      [JSON.stringify(kdf(json, { N: 2 ** 20 + 1 })), 'kdf.N must be a power of two'],
      [JSON.stringify(kdf(json, { N: 512 })), 'kdf.N must be a power of two'],
      [JSON.stringify(kdf(json, { N: '1024' })), 'kdf.N must be a power of two'],
      [JSON.stringify(kdf(json, { N: 2 ** 20, r: 16 })), 'more than 1 GiB of memory'],
      [JSON.stringify(kdf(json, { N: 2 ** 20, p: 4 })), 'more work than N=2^20, r=8, p=1'],
      [JSON.stringify(kdf(json, { r: 1000 })), 'kdf.r must be an integer from 1 to 16'],
      [JSON.stringify(kdf(json, { p: 0 })), 'kdf.p must be an integer from 1 to 4'],
      [JSON.stringify(kdf(json, { p: 1.5 })), 'kdf.p must be an integer'],
      [JSON.stringify(kdf(json, { name: 'pbkdf2' })), 'kdf.name is "pbkdf2", not "scrypt"'],
      [JSON.stringify(kdf(json, { salt: 'c2FsdA==' })), 'kdf.salt is 4 bytes, not 16-64'],
      [JSON.stringify(kdf(json, { salt: 12 })), 'kdf.salt is not base64'],
      [JSON.stringify(kdf(json, { extra: 1 })), 'kdf has an unknown field "extra"'],
      [JSON.stringify({ ...json, kdf: [] }), 'kdf is not a JSON object'],
      [JSON.stringify({ ...json, format: 'vhdvault-key/2' }), 'format is "vhdvault-key/2", not "vhdvault-key/1"'],
      [JSON.stringify({ ...json, sealed: 'AAAA' }), 'sealed is 3 bytes, not 97'],
      [JSON.stringify({ ...json, sealed: `${json.sealed as string}!` }), 'sealed is not base64'],
      [JSON.stringify({ ...json, created: {} }), 'created is not an ISO time'],
      [JSON.stringify({ ...json, id: 'ABC' }), 'id is not 16 lowercase hex digits'],
      [JSON.stringify({ ...json, sealed: undefined }), 'the file has no "sealed"'],
      [JSON.stringify([json]), 'the file is not a JSON object'],
      ['null', 'the file is not a JSON object'],
      ['{"format": ', 'not JSON'],
      ['', 'not JSON (it is empty)'],
      ['['.repeat(60_000), 'not JSON'],
      [' '.repeat(MAX_KEY_FILE_BYTES + 1), `larger than ${MAX_KEY_FILE_BYTES} bytes`],
    ];
    const start = performance.now();
    for (const [text, why] of cases) {
      await writeFile(path, text);
      const err = await rejection(openKeyring(storage, 'pw', REPO));
      expect(err, why).toBeInstanceOf(VaultError);
      expect(err.message.startsWith(`${path}: not a usable key file: `), err.message).toBe(true);
      expect(err.message, why).toContain(why);
      expect(err.message).not.toContain('\n');
    }
    // No case derives a key (each would be ~8 ms here at 2^10; a hostile N would be seconds).
    expect(performance.now() - start).toBeLessThan(2000);
  });

  it('of many megabytes are read only up to the cap', async () => {
    const { storage, id, path } = await validFile();
    await truncate(path, 256 * 1024 * 1024); // sparse: big on paper, nothing written
    const sizes: number[] = [];
    const spy = Object.assign(Object.create(storage) as Storage, {
      get: async (k: string, range?: { offset: number; length: number }) => {
        const bytes = await storage.get(k, range);
        sizes.push(bytes.length);
        return bytes;
      },
    });
    await expect(listKeys(spy)).rejects.toThrow(`${path}: not a usable key file: larger than ${MAX_KEY_FILE_BYTES} bytes`);
    expect(sizes).toEqual([MAX_KEY_FILE_BYTES + 1]);
    expect(id).toMatch(/^[0-9a-f]{16}$/);
  });

  it('a sealed value moved into another key file does not open (the AD binds the id)', async () => {
    const { storage, json } = await validFile();
    const other = 'aaaaaaaaaaaaaaaa';
    await writeFile(join(storage.root, 'keys', `${other}.json`), JSON.stringify({ ...json, id: other }));
    await storage.delete(`keys/${json.id as string}.json`);
    await expect(openKeyring(storage, 'pw', REPO)).rejects.toThrow(WRONG);
  });

  it('parseKeyFile accepts exactly what makeKeyFile writes', async () => {
    const { path, json } = await validFile();
    const bytes = await readFile(path);
    expect(parseKeyFile(bytes, path)).toEqual(json);
    // The costliest parameters a key file may ask for are accepted (not derived here: 1 GiB, seconds).
    const costliest = kdf(json, { N: 2 ** 20, r: 8, p: 1 });
    expect(parseKeyFile(Buffer.from(JSON.stringify(costliest)), path)).toEqual(costliest);
    expect(Object.keys(json)).toEqual(['format', 'id', 'created', 'kdf', 'sealed']);
  });
});

describe('scrypt cost', () => {
  it('chooses the power of two nearest the target, within bounds (an injected clock)', async () => {
    // Probe 2^14: 100 ms → 500 ms is 5× → 2^16.3 → 2^16.
    expect(chooseLogN(100, 500)).toBe(16);
    expect(chooseLogN(60, 500)).toBe(17);
    expect(chooseLogN(20, 500)).toBe(19);
    expect(chooseLogN(0.001, 500)).toBe(SCRYPT_LIMITS.maxLogN);
    expect(chooseLogN(0, 500)).toBe(SCRYPT_LIMITS.maxLogN);
    expect(chooseLogN(10_000, 500)).toBe(MIN_LOG_N);
    const measured: number[] = [];
    const params = await calibrateScrypt({
      measure: async ({ N }) => {
        measured.push(N);
        return 120;
      },
    });
    expect(measured).toEqual([2 ** PROBE_LOG_N]);
    expect(params).toEqual({ N: 2 ** 16, r: 8, p: 1 });
  });

  it('takes the test-only N from the environment, checked', async () => {
    const saved = process.env[TEST_N_ENV];
    try {
      process.env[TEST_N_ENV] = '2048';
      expect(await scryptParams()).toEqual({ N: 2048, r: 8, p: 1 });
      process.env[TEST_N_ENV] = '3000';
      expect(() => scryptParams()).toThrow(`${TEST_N_ENV}=3000: N must be a power of two`);
      expect(await scryptParams({ N: 4096, r: 8, p: 1 })).toEqual({ N: 4096, r: 8, p: 1 });
    } finally {
      if (saved === undefined) delete process.env[TEST_N_ENV];
      else process.env[TEST_N_ENV] = saved;
    }
  });

  it('refuses out-of-bounds parameters from code too', async () => {
    await expect(deriveKey('pw', randomBytes(16), { N: 2 ** 21, r: 8, p: 1 })).rejects.toThrow('kdf.N must be a power of two');
  });
});

/** `storage`, recording every key it is asked about. */
function watch(storage: Storage): { storage: Storage; touched: string[] } {
  const touched: string[] = [];
  const watched = new Proxy(storage, {
    get(target, prop, receiver) {
      const value = Reflect.get(target, prop, receiver) as unknown;
      if (typeof value !== 'function' || prop === 'describe') return value;
      return (...args: unknown[]) => {
        if (typeof args[0] === 'string') touched.push(args[0]);
        return (value as (...a: unknown[]) => unknown).apply(target, args);
      };
    },
  });
  return { storage: watched, touched };
}
