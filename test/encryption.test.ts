/**
 * Encrypted repositories end to end, through the built CLI (docs/design/12-encryption.md):
 * nothing of a disk's plaintext reaches storage (folders and S3), the key commands and
 * where a password comes from, kills during key changes, refusals, and both ciphers.
 * Tampering with stored files is test/encryptionTamper.test.ts.
 * Set-up that is only set-up goes through the store's API in this process.
 */
import { spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import pLimit from 'p-limit';
import { createHash, randomBytes } from 'node:crypto';
import { cp, open, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { beforeAll, describe, expect, it } from 'vitest';
import { CLI, cliEnv, type CliResult, expectRefused, vhdvault } from './helpers/cli.js';
import { sameBytes, tempDir } from './helpers/files.js';
import { snapshot } from './helpers/repoFixture.js';
import { newBucket, s3Env, startS3In } from './helpers/s3.js';
import { openKeyring } from '../src/crypto/keyring.js';
import { LocalStorage } from '../src/storage/LocalStorage.js';
import { backup } from '../src/store/backup.js';
import { Repository } from '../src/store/repository.js';

const MiB = 1024 * 1024;
const BLOCK = 2 * MiB;
const PASSWORD = 'correct horse battery staple';
const PRELOAD = fileURLToPath(new URL('./helpers/killAtFsOp.cjs', import.meta.url));

const work = await tempDir('vhdvault-enc-');
// Cheap key derivation for every key file the tests (and the CLIs they run) make; the password of
// every repository here unless a test says otherwise; object-store block maps cached in the test's folder.
Object.assign(process.env, { VHDVAULT_TEST_SCRYPT_N: '1024', VHDVAULT_PASSWORD: PASSWORD, VHDVAULT_CACHE_DIR: join(work, 'cache') });

/** The built CLI with `env` over this process's environment (a value of undefined removes the variable); stdin an empty pipe. */
function run(env: Record<string, string | undefined>, ...args: string[]): CliResult {
  const full = cliEnv();
  for (const [k, v] of Object.entries(env)) {
    if (v === undefined) delete full[k];
    else full[k] = v;
  }
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', env: full });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** `run` without blocking, so that independent runs overlap. */
function runAsync(env: Record<string, string | undefined>, ...args: string[]): Promise<CliResult> {
  const full = cliEnv();
  for (const [k, v] of Object.entries(env)) {
    if (v === undefined) delete full[k];
    else full[k] = v;
  }
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['pipe', 'pipe', 'pipe'], env: full });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (chunk: string) => (stdout += chunk));
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
    child.stdin.end();
    child.on('error', reject);
    child.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr }));
  });
}

function ok(r: CliResult): CliResult {
  expect(r.code, `exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`).toBe(0);
  return r;
}

/** Every regular file below `root`: its path relative to root, and its bytes. */
async function storedFiles(root: string): Promise<Array<{ rel: string; bytes: Buffer }>> {
  const out: Array<{ rel: string; bytes: Buffer }> = [];
  for (const e of await readdir(root, { recursive: true, withFileTypes: true })) {
    if (!e.isFile()) continue;
    const path = join(e.parentPath, e.name);
    out.push({ rel: relative(root, path), bytes: await readFile(path) });
  }
  return out;
}

/** Write `bytes` into the file at `offset`. */
async function writeAt(path: string, offset: number, bytes: Buffer): Promise<void> {
  const fh = await open(path, 'r+');
  try {
    await fh.write(bytes, 0, bytes.length, offset);
  } finally {
    await fh.close();
  }
}

describe('nothing of the plaintext reaches storage', () => {
  const SIZE = 6 * MiB; // three blocks
  // A pattern no random data or ciphertext holds by chance, repeated over a whole block (and compressible).
  const MARKER = Buffer.from('<<vhdvault-plaintext-marker:9f2c41e7-do-not-store-me>>');
  const STRINGS = ['Quarterly payroll of ACME Widgets: CONFIDENTIAL', 'root:$6$saltsalt$notarealhash:19000:0:99999:7:::', 'BEGIN OPENSSH PRIVATE KEY vhdvault-test'];
  const DELTA_STRINGS = ['the delta writes this sentence, and it must not be seen either', 'SECOND-MARKER-7d1e0b55-in-the-delta'];

  let disk: string;
  let afterFull: string;
  let afterDelta: string;
  /** What must not appear in any stored byte (plaintext samples), and SHA-256 hex of every block written. */
  const needles: Array<{ what: string; bytes: Buffer }> = [];
  const blockDigests = new Set<string>();

  function addBlockDigests(image: Buffer): void {
    for (let at = 0; at < image.length; at += BLOCK) blockDigests.add(createHash('sha256').update(image.subarray(at, at + BLOCK)).digest('hex'));
  }

  beforeAll(async () => {
    const image = randomBytes(SIZE);
    // Block 1: the marker, over and over; blocks 0 and 2: random data with the strings in it.
    for (let at = BLOCK; at < 2 * BLOCK; at += MARKER.length) MARKER.copy(image, at, 0, Math.min(MARKER.length, 2 * BLOCK - at));
    STRINGS.forEach((s, i) => image.write(s, i * 4096 + 100));
    STRINGS.forEach((s, i) => image.write(s, 2 * BLOCK + i * 65536 + 7));
    disk = join(work, 'leak.raw');
    afterFull = join(work, 'leak-full.raw');
    afterDelta = join(work, 'leak-delta.raw');
    await writeFile(afterFull, image);
    addBlockDigests(image);
    // The delta: block 2 rewritten (random data, a second marker, its own strings); blocks 0 and 1 as they were.
    const delta = Buffer.from(image);
    randomBytes(BLOCK).copy(delta, 2 * BLOCK);
    for (let at = 2 * BLOCK + MiB; at < 2 * BLOCK + MiB + 64 * 1024; at += MARKER.length) MARKER.copy(delta, at);
    DELTA_STRINGS.forEach((s, i) => delta.write(s, 2 * BLOCK + i * 8192 + 3));
    await writeFile(afterDelta, delta);
    addBlockDigests(delta);
    needles.push({ what: 'the marker', bytes: MARKER.subarray(0, 24) });
    for (const s of [...STRINGS, ...DELTA_STRINGS]) needles.push({ what: JSON.stringify(s), bytes: Buffer.from(s.slice(0, 24)) });
    // Random data is plaintext too: a sample of each block, as written.
    for (const [image_, name] of [
      [image, 'full'],
      [delta, 'delta'],
    ] as const) {
      for (let b = 0; b < SIZE / BLOCK; b++) needles.push({ what: `random bytes of block ${b} (${name})`, bytes: image_.subarray(b * BLOCK + 50_000, b * BLOCK + 50_032) });
    }
  });

  /** Search every stored byte and name: no plaintext, no SHA-256 of a block (hex or raw) anywhere. */
  async function expectNothingPlain(where: string): Promise<number> {
    const files = await storedFiles(where);
    const digests = [...blockDigests];
    for (const { rel, bytes } of files) {
      for (const n of needles) expect(bytes.indexOf(n.bytes), `${n.what} found in ${rel}`).toBe(-1);
      for (const hex of digests) {
        expect(rel, 'a stored name holds the SHA-256 of a block').not.toContain(hex);
        expect(bytes.indexOf(hex), `${rel} holds the SHA-256 of a block (hex)`).toBe(-1);
        expect(bytes.indexOf(Buffer.from(hex, 'hex')), `${rel} holds the SHA-256 of a block`).toBe(-1);
      }
    }
    return files.length;
  }

  /** init, a full backup, a delta, then both restored exactly, through the CLI. */
  async function roundTrip(repo: string, initArgs: string[], at: string[] = []): Promise<void> {
    ok(vhdvault('init', repo, '--encryption', 'aes-256-gcm', ...initArgs, ...at));
    await cp(afterFull, disk);
    const full = ok(vhdvault('backup', repo, 'vm', '--source', disk, ...at)).stdout.trim().split('\n').at(-1)!;
    await cp(afterDelta, disk);
    ok(vhdvault('backup', repo, 'vm', '--source', disk, ...at));
    const out = join(work, 'out.raw');
    ok(vhdvault('restore', repo, 'vm', out, ...at));
    expect(await sameBytes(out, afterDelta), 'the delta restores exactly').toBe(true);
    ok(vhdvault('restore', repo, 'vm', out, '--backup', full, ...at));
    expect(await sameBytes(out, afterFull), 'the full backup restores exactly').toBe(true);
    await rm(out);
  }

  it('dir layout, gzip, on a folder', async () => {
    const repo = join(work, 'leak-dir');
    await roundTrip(repo, ['--layout', 'dir', '--compression', 'gzip']);
    const files = await storedFiles(repo);
    // Every file is sealed but the plain ones the design names.
    const plain = files.filter((f) => !f.bytes.subarray(0, 4).equals(Buffer.from('VVE\x01', 'latin1'))).map((f) => f.rel);
    expect(plain.every((rel) => rel === 'vhdvault.json' || rel === 'reserve' || rel.startsWith('keys/') || rel.startsWith('access/') || /^disks\/vm\/lock$/.test(rel)), plain.join(', ')).toBe(true);
    expect(await expectNothingPlain(repo)).toBeGreaterThan(10);
  });

  it('objects layout on a folder: block objects named by HMAC, not SHA-256', async () => {
    const repo = join(work, 'leak-objects');
    await roundTrip(repo, ['--layout', 'objects']);
    const objects = (await storedFiles(join(repo, 'disks', 'vm', 'blocks'))).map((f) => f.rel);
    // Block 1 (the marker) is the same in both backups: 3 + 1 objects.
    expect(objects).toHaveLength(4);
    for (const rel of objects) expect(rel).toMatch(/^[0-9a-f]{2}\/[0-9a-f]{64}$/);
    await expectNothingPlain(repo);
  });

  it('objects layout on s3rver: nothing plain in the bytes it stores', async () => {
    const data = await tempDir('vhdvault-enc-s3data-');
    const server = await startS3In(data);
    try {
      // Folder repositories ignore these: left set for the rest of the file.
      Object.assign(process.env, s3Env(server.endpoint));
      const bucket = await newBucket(server.endpoint);
      await roundTrip(`s3://${bucket}/repo`, [], ['--endpoint', server.endpoint]);
    } finally {
      await server.close();
    }
    // s3rver keeps each object in a file named by its key (and its metadata beside it).
    const names = (await storedFiles(data)).map((f) => f.rel);
    expect(names.some((n) => n.includes('vhdvault.json')), names.join('\n')).toBe(true);
    expect(names.filter((n) => n.includes('/blocks/')).length).toBeGreaterThanOrEqual(4);
    await expectNothingPlain(data);
  });
});

describe('keys and passwords', () => {
  const WRONG = (repo: string) => `vhdvault: ${repo}: wrong password (no key file opens with it)\n`;
  let repo: string;
  let firstKey: string;

  /** Does `password` open the repository's keyring (read in this process)? The id of the key it opens, or null. */
  async function opens(root: string, password: string): Promise<string | null> {
    try {
      return (await openKeyring(new LocalStorage(root), password, root)).keyId;
    } catch {
      return null;
    }
  }

  function keyList(root: string, password: string): { format: string; cipher: string; keys: Array<{ id: string; created: string; inUse: boolean; kdf: { name: string; N: number; r: number; p: number } }> } {
    return JSON.parse(ok(run({ VHDVAULT_PASSWORD: password }, 'key', 'list', root, '--json')).stdout);
  }

  beforeAll(async () => {
    repo = join(work, 'keys');
    const r = await Repository.init(repo, { layout: 'dir', compression: 'none', encryption: 'aes-256-gcm', password: { env: { VHDVAULT_PASSWORD: PASSWORD } } });
    firstKey = r.keyInUse!;
    const source = join(work, 'keys.raw');
    await writeFile(source, randomBytes(BLOCK));
    await backup(r, 'vm', { source, concurrency: 1 });
  });

  it('key add, list, remove, passwd; refusals change nothing', async () => {
    const added = ok(run({ VHDVAULT_NEW_PASSWORD: 'second password' }, 'key', 'add', repo));
    const second = /^added key ([0-9a-f]{16})$/.exec(added.stdout.trim())?.[1];
    expect(second, added.stdout).toBeDefined();

    const listed = keyList(repo, 'second password');
    expect(listed.format).toBe('vhdvault-key-list/1');
    expect(listed.cipher).toBe('aes-256-gcm');
    expect(listed.keys.map((k) => k.id).sort()).toEqual([firstKey, second].sort());
    for (const k of listed.keys) {
      expect(Object.keys(k).sort()).toEqual(['created', 'id', 'inUse', 'kdf']);
      expect(k.kdf).toEqual({ name: 'scrypt', N: 1024, r: 8, p: 1 });
      expect(Number.isNaN(Date.parse(k.created))).toBe(false);
      expect(k.inUse).toBe(k.id === second);
    }
    expect(ok(vhdvault('key', 'list', repo)).stdout).toMatch(new RegExp(`^\\*\\s+${firstKey}`, 'm'));

    // A third, from a file; removed by the first password (not the key in use).
    const file = join(work, 'third.txt');
    await writeFile(file, 'third password\n');
    const third = /added key ([0-9a-f]{16})/.exec(ok(vhdvault('key', 'add', repo, '--new-password-file', file)).stdout)![1]!;
    expect(await opens(repo, 'third password')).toBe(third);
    expect(ok(vhdvault('key', 'remove', repo, third)).stdout.trim()).toBe(`removed key ${third}`);
    expect(await opens(repo, 'third password')).toBeNull();
    expect(await opens(repo, PASSWORD)).toBe(firstKey);

    const before = await snapshot(repo);
    expectRefused(vhdvault('key', 'remove', repo, firstKey), firstKey, /key in use/);
    expectRefused(vhdvault('key', 'remove', repo, '0123456789abcdef'), '0123456789abcdef', /no such key/);
    const malformed = vhdvault('key', 'remove', repo, 'not-a-key');
    expect(malformed.code, malformed.stderr).toBe(2);
    expect(malformed.stderr.trim().split('\n')).toHaveLength(1);
    expect(await snapshot(repo)).toEqual(before);

    // passwd: the first password's key file is replaced; the second password still opens.
    const changed = ok(run({ VHDVAULT_NEW_PASSWORD: 'a new first password' }, 'key', 'passwd', repo));
    const replacement = new RegExp(`^password changed: key ([0-9a-f]{16}) replaces ${firstKey}$`).exec(changed.stdout.trim())?.[1];
    expect(replacement, changed.stdout).toBeDefined();
    expect(await opens(repo, 'a new first password')).toBe(replacement);
    expect(await opens(repo, PASSWORD)).toBeNull();
    expect(await opens(repo, 'second password')).toBe(second);
    const old = run({}, 'list', repo);
    expect(old.code).toBe(1);
    expect(old.stderr).toBe(WRONG(repo));
    expect(ok(run({ VHDVAULT_PASSWORD: 'a new first password' }, 'list', repo)).stdout).toContain('vm');

    // The last key: one file left, and it is the one opened.
    ok(run({ VHDVAULT_PASSWORD: 'a new first password' }, 'key', 'remove', repo, second!));
    const last = await snapshot(repo);
    expectRefused(run({ VHDVAULT_PASSWORD: 'a new first password' }, 'key', 'remove', repo, replacement!), replacement!, /key in use|last key/);
    expect(await snapshot(repo)).toEqual(last);
    // Put back as it was for the next tests: the original password.
    ok(run({ VHDVAULT_PASSWORD: 'a new first password', VHDVAULT_NEW_PASSWORD: PASSWORD }, 'key', 'passwd', repo));
  });

  it('a wrong or missing password: one line, exit 1, nothing written, whatever the command', async () => {
    const before = await snapshot(repo);
    const out = join(work, 'never.raw');
    const commands = [['list', repo], ['verify', repo], ['restore', repo, 'vm', out], ['backup', repo, 'vm', '--source', join(work, 'keys.raw')], ['prune', repo, '--keep-last', '1'], ['key', 'list', repo], ['key', 'add', repo], ['key', 'passwd', repo]];
    const limit = pLimit(3);
    await Promise.all(
      commands.map((args) =>
        limit(async () => {
          const wrong = await runAsync({ VHDVAULT_PASSWORD: 'not the password', VHDVAULT_NEW_PASSWORD: 'x' }, ...args);
          expect(wrong.code, args.join(' ')).toBe(1);
          expect(wrong.stdout).toBe('');
          expect(wrong.stderr, args.join(' ')).toBe(WRONG(repo));
          const none = await runAsync({ VHDVAULT_PASSWORD: undefined, VHDVAULT_NEW_PASSWORD: 'x' }, ...args);
          expectRefused(none, repo, /needs a password: set VHDVAULT_PASSWORD, give --password-file, set VHDVAULT_PASSWORD_COMMAND, or run on a terminal/);
        }),
      ),
    );
    expect(existsSync(out)).toBe(false);
    expect(await snapshot(repo)).toEqual(before);
  });

  it('--password-file opens; VHDVAULT_PASSWORD comes before it; the password command after it', async () => {
    const right = join(work, 'right.txt');
    const wrong = join(work, 'wrong.txt');
    await writeFile(right, `${PASSWORD}\n`);
    await writeFile(wrong, 'not it\n');
    expect(ok(run({ VHDVAULT_PASSWORD: undefined }, 'list', repo, '--password-file', right)).stdout).toContain('vm');
    // The environment first: a wrong file is not read when it is set, and a right file does not save a wrong one.
    ok(run({}, 'list', repo, '--password-file', wrong));
    expect(run({ VHDVAULT_PASSWORD: 'not it' }, 'list', repo, '--password-file', right).stderr).toBe(WRONG(repo));
    // The file before the command.
    ok(run({ VHDVAULT_PASSWORD: undefined, VHDVAULT_PASSWORD_COMMAND: 'echo not it' }, 'list', repo, '--password-file', right));
    ok(run({ VHDVAULT_PASSWORD: undefined, VHDVAULT_PASSWORD_COMMAND: `printf '%s\\n' '${PASSWORD}'` }, 'list', repo));
  });

  describe('killed at every step of a key change, every password that worked still opens', () => {
    /** `key <verb>` on a copy of `base`, killed right before its `n`th filesystem change (null: counted, into `count`, not killed). */
    async function killedAt(base: string, n: number | null, verb: 'add' | 'passwd', count?: string): Promise<{ code: number; root: string }> {
      const root = join(work, `kill-${verb}-${n ?? 'count'}`);
      await cp(base, root, { recursive: true });
      const env = cliEnv({ VHDVAULT_NEW_PASSWORD: 'the new one', ...(n === null ? { VHDVAULT_COUNT_OPS: count! } : { VHDVAULT_KILL_AT: String(n) }) });
      const child = spawn(process.execPath, ['-r', PRELOAD, CLI, 'key', verb, root], { stdio: 'ignore', env });
      const [code, signal] = (await once(child, 'exit')) as [number | null, string | null];
      return { code: code ?? (signal === 'SIGKILL' ? -1 : -2), root };
    }

    let base: string;
    beforeAll(async () => {
      base = join(work, 'kill-base');
      await Repository.init(base, { layout: 'objects', compression: 'none', encryption: 'chacha20-poly1305', password: { env: { VHDVAULT_PASSWORD: PASSWORD } } });
      ok(run({ VHDVAULT_NEW_PASSWORD: 'another one' }, 'key', 'add', base));
    });

    for (const verb of ['add', 'passwd'] as const) {
      it(`key ${verb}`, async () => {
        const countFile = join(work, `count-${verb}`);
        const counted = await killedAt(base, null, verb, countFile);
        expect(counted.code).toBe(0);
        await rm(counted.root, { recursive: true, force: true });
        const steps = Number(await readFile(countFile, 'utf8'));
        expect(steps).toBeGreaterThan(2);
        const newOpens: boolean[] = [];
        const limit = pLimit(2);
        await Promise.all(
          Array.from({ length: steps }, (_, i) => i + 1).map((n) =>
            limit(async () => {
              const { code, root } = await killedAt(base, n, verb);
              const at = `after a kill before change ${n} of ${steps}`;
              expect(code, at).toBe(-1);
              const [old, other, added] = [await opens(root, PASSWORD), await opens(root, 'another one'), await opens(root, 'the new one')];
              // The other password always; the changed one as it was until the new key file is whole (add: always).
              expect(other, `the other password ${at}`).not.toBeNull();
              if (verb === 'add') expect(old, `${PASSWORD} ${at}`).not.toBeNull();
              else expect(old ?? added, `neither the old nor the new password opens ${at}`).not.toBeNull();
              newOpens[n] = added !== null;
              // Whatever the kill left (the keyring's lock, a temporary file), the next key change goes through.
              if (n === steps - 1 || n === Math.ceil(steps / 2)) expect(ok(run({ VHDVAULT_PASSWORD: 'another one', VHDVAULT_NEW_PASSWORD: 'after the kill' }, 'key', 'add', root)).stdout).toMatch(/^added key/);
              await rm(root, { recursive: true, force: true });
            }),
          ),
        );
        // The first kills come before the new key file exists, the last ones after it is whole.
        expect(newOpens[1]).toBe(false);
        expect(newOpens[steps]).toBe(true);
      });
    }
  });
});

describe('refusals', () => {
  it('init --layout vhd --encryption: a usage error, one line', async () => {
    const repo = join(work, 'vhd-enc');
    const r = vhdvault('init', repo, '--layout', 'vhd', '--encryption', 'aes-256-gcm');
    expect(r.code, r.stderr).toBe(2);
    expect(r.stdout).toBe('');
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/vhd layout.*cannot be encrypted/);
    expect(existsSync(repo)).toBe(false);
  });

  it('init --encryption without a password: one line, and no repository folder made', async () => {
    const repo = join(work, 'no-password');
    expectRefused(run({ VHDVAULT_PASSWORD: undefined }, 'init', repo, '--encryption', 'aes-256-gcm'), repo, /needs a password/);
    expect(existsSync(repo)).toBe(false);
  });

  it('vhdvault.json stripped of its encryption field: every command refuses, nothing written (key files present, or removed too)', async () => {
    const repo = join(work, 'stripped');
    const r = await Repository.init(repo, { layout: 'dir', compression: 'none', encryption: 'aes-256-gcm', password: { env: { VHDVAULT_PASSWORD: PASSWORD } } });
    const source = join(work, 'stripped.raw');
    await writeFile(source, randomBytes(BLOCK));
    await backup(r, 'vm', { source, concurrency: 1 });
    const configPath = join(repo, 'vhdvault.json');
    const config = JSON.parse(await readFile(configPath, 'utf8')) as Record<string, unknown>;
    delete config.encryption;
    await writeFile(configPath, JSON.stringify(config, null, 2));
    const before = await snapshot(repo);
    const out = join(work, 'stripped-out.raw');
    for (const args of [['list', repo], ['verify', repo], ['restore', repo, 'vm', out], ['backup', repo, 'vm', '--source', source], ['prune', repo, '--keep-last', '1'], ['unlock', repo, 'vm'], ['key', 'list', repo]]) {
      const refused = vhdvault(...args);
      expect(refused.code, `${args.join(' ')}: ${refused.stderr}`).not.toBe(0);
      expect(refused.stdout, args.join(' ')).toBe('');
      expect(refused.stderr.trim().split('\n'), args.join(' ')).toHaveLength(1);
      expect(refused.stderr, args.join(' ')).toContain(`${configPath}: says the repository is not encrypted, but ${join(repo, 'keys')} holds key files`);
    }
    expect(existsSync(out)).toBe(false);
    expect(await snapshot(repo)).toEqual(before);

    // The key files removed as well: the sealed metadata still says what the repository is.
    await rm(join(repo, 'keys'), { recursive: true });
    const stripped = await snapshot(repo);
    // A new disk too: its first backup would otherwise be the repository's first plaintext.
    for (const args of [['list', repo], ['backup', repo, 'vm', '--source', source], ['backup', repo, 'newdisk', '--source', source], ['prune', repo, '--keep-last', '1'], ['restore', repo, 'vm', out]]) {
      const refused = vhdvault(...args);
      expect(refused.code, `${args.join(' ')}: ${refused.stderr}`).toBe(1);
      expect(refused.stderr.trim().split('\n'), args.join(' ')).toHaveLength(1);
      expect(refused.stderr, args.join(' ')).toMatch(/\.json: is sealed \(encrypted\), but .*vhdvault\.json says the repository is not encrypted/);
    }
    expect(existsSync(out)).toBe(false);
    expect(await snapshot(repo)).toEqual(stripped);
  });
});

it('chacha20-poly1305: a full, a delta and both restored, every sealed file naming that cipher', async () => {
  const repo = join(work, 'chacha');
  ok(vhdvault('init', repo, '--encryption', 'chacha20-poly1305', '--layout', 'dir', '--compression', 'brotli'));
  const disk = join(work, 'chacha.raw');
  const first = Buffer.concat([randomBytes(BLOCK), Buffer.alloc(BLOCK), randomBytes(BLOCK)]);
  await writeFile(disk, first);
  const full = ok(vhdvault('backup', repo, 'vm', '--source', disk)).stdout.trim();
  await writeAt(disk, BLOCK + 4096, randomBytes(8192));
  const second = await readFile(disk);
  ok(vhdvault('backup', repo, 'vm', '--source', disk));
  const out = join(work, 'chacha-out.raw');
  ok(vhdvault('restore', repo, 'vm', out));
  expect((await readFile(out)).equals(second)).toBe(true);
  ok(vhdvault('restore', repo, 'vm', out, '--backup', full));
  expect((await readFile(out)).equals(first)).toBe(true);
  expect(ok(vhdvault('verify', repo)).stdout).toMatch(/^ok: 2 backups/);
  const sealed = (await storedFiles(repo)).filter((f) => f.bytes.subarray(0, 4).equals(Buffer.from('VVE\x01', 'latin1')));
  expect(sealed.length).toBeGreaterThan(8);
  for (const f of sealed) expect(f.bytes[4], f.rel).toBe(2);
  expect((await stat(out)).size).toBe(3 * BLOCK);
});
