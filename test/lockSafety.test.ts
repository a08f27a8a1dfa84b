// vitest: slow (a long file: started first on a fresh checkout, see vitest.config.ts)
/**
 * No interleaving of writers loses data, whatever the delays (docs/design/05-writing-safely.md §5.1).
 *
 * A backup and a prune of one S3 repository, each through its own proxy: one
 * of them has its n-th request held (kept from the store, or its reply kept
 * from it) while the other runs from start to end, longer than the held one's
 * request timeout, so its SDK retries meanwhile. Then a writer paused by
 * SIGSTOP, and one whose lock a person removed while it was held up. After
 * every round verify is clean, and at the end every backup listed restores
 * to the disk as it was backed up.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFile, rm } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, type CliResult, cliEnv } from './helpers/cli.js';
import { makeRaw, tempDir } from './helpers/files.js';
import { type Hold, type HoldProxy, type Seen, startHoldProxy } from './helpers/holdProxy.js';
import { scribble } from './helpers/pruneChain.js';
import { newBucket, s3Engines, s3Env } from './helpers/s3.js';
import { listBackups } from '../src/store/list.js';
import { Repository } from '../src/store/repository.js';
import { restore } from '../src/store/restore.js';
import { verify } from '../src/store/verify.js';

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;

const dir = await tempDir('vhdvault-locksafety-');
const engines = s3Engines();
// s3rver for the tests of the lock's logic; the held rounds run on every engine.
const s3 = await engines.find((e) => e.name === 's3rver')!.server();
Object.assign(process.env, s3Env(s3.endpoint), { VHDVAULT_CACHE_DIR: join(dir, 'cache') });

/** A CLI run through `proxy` (null: straight to the store at `direct`), with a handle on the child to pause it. */
function cli(proxy: HoldProxy | null, args: string[], env: NodeJS.ProcessEnv = {}, direct = s3.endpoint): { pid: number; done: Promise<CliResult> } {
  const endpoint = proxy?.endpoint ?? direct;
  // A short request timeout, so that a held request times out and is retried while the other command runs.
  const child = spawn(process.execPath, [CLI, ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: cliEnv({ AWS_ENDPOINT_URL: endpoint, VHDVAULT_S3_TIMEOUT_MS: '1500', VHDVAULT_S3_ATTEMPTS: '8', ...env }),
  });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
  child.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
  const done = new Promise<CliResult>((resolve) => child.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr })));
  return { pid: child.pid!, done };
}

/**
 * Exit 0, or exit 1 whose last line says the disk is locked, the lock was lost, or the
 * lock's creation is held up by a live rival's claim (a line saying whom it waits for may
 * come before): never a crash, never anything else.
 */
function expectCleanOutcome(r: CliResult, what: string): void {
  const context = `${what}: exit ${r.code}\n${r.stdout}\n${r.stderr}`;
  if (r.code === 0) return;
  expect(r.code, context).toBe(1);
  expect(r.stderr, context).not.toContain('    at ');
  expect(r.stderr.trimEnd().split('\n').at(-1), context).toMatch(/is locked by process|lost its lock|still contended after 10 s: a claim of process/);
}

/**
 * A repository with a disk, and what the disk held at each backup: every
 * backup listed must restore to exactly that.
 */
class Subject {
  readonly content = new Map<string, string>();
  private round = 0;
  constructor(
    readonly repo: string,
    readonly disk: string,
    /** The store's own endpoint (commands not given a proxy go straight there). */
    readonly endpoint: string,
  ) {}

  static async create(name: string, endpoint = s3.endpoint): Promise<Subject> {
    const repo = `s3://${await newBucket(endpoint)}/repo`;
    const disk = join(dir, `${name}.raw`);
    await makeRaw(disk, SIZE, [[0, SIZE]]);
    const s = new Subject(repo, disk, endpoint);
    expect((await s.cli(['init', repo]).done).code).toBe(0);
    for (let i = 0; i < 3; i++) expect((await s.backup(null).done).code).toBe(0);
    return s;
  }

  /** Change a block, then back it up; the content is recorded under the id the backup prints. */
  backup(proxy: HoldProxy | null, env: NodeJS.ProcessEnv = {}): { pid: number; done: Promise<CliResult> } {
    const round = this.round++;
    const pending = (async () => {
      await scribble(this.disk, [round % (SIZE / (2 * MiB))]);
      const sum = createHash('sha256').update(await readFile(this.disk)).digest('hex');
      const run = cli(proxy, ['backup', this.repo, 'vm', '--source', this.disk, '--json', '--concurrency', '1'], env, this.endpoint);
      return { run, sum };
    })();
    let pid = 0;
    const done = pending.then(async ({ run, sum }) => {
      pid = run.pid;
      const r = await run.done;
      if (r.code === 0) this.content.set((JSON.parse(r.stdout) as { id: string }).id, sum);
      return r;
    });
    return {
      get pid() {
        return pid;
      },
      done,
    };
  }

  prune(proxy: HoldProxy | null, env: NodeJS.ProcessEnv = {}) {
    return cli(proxy, ['prune', this.repo, 'vm', '--keep-last', '3'], env, this.endpoint);
  }

  /** Any command, straight to the store. */
  cli(args: string[], env: NodeJS.ProcessEnv = {}) {
    return cli(null, args, env, this.endpoint);
  }

  open(): Promise<Repository> {
    return Repository.open({ root: this.repo, endpoint: this.endpoint });
  }

  async ids(): Promise<string[]> {
    return (await listBackups(await this.open(), 'vm')).backups.map((b) => b.id);
  }

  /** verify, in this process (its public API): no problem found. */
  async verifyClean(): Promise<void> {
    const report = await verify(await this.open(), 'vm');
    expect(report.problems).toEqual([]);
  }

  /** Every backup listed restores (in this process) to the disk as it was backed up. */
  async restoreAll(): Promise<void> {
    const repo = await this.open();
    const ids = await this.ids();
    expect(ids.length).toBeGreaterThan(0);
    for (const id of ids) {
      const out = join(dir, `restored-${id}.raw`);
      await restore(repo, 'vm', out, { backup: id, format: 'raw' });
      expect(createHash('sha256').update(await readFile(out)).digest('hex'), `backup ${id}`).toBe(this.content.get(id));
      await rm(out);
    }
  }
}

/** How a round holds its request: every pairing of where and patience, in turn. */
interface Mode {
  where: Hold['where'];
  patient: boolean;
}
const MODES: Mode[] = [
  { where: 'request', patient: true },
  { where: 'reply', patient: false },
  { where: 'reply', patient: true },
  { where: 'request', patient: false },
];

/** Rounds per order of the two commands: LOCK_ROUNDS (a number, or `all` for every request of the held command); default 4 on s3rver, 2 on Ceph. */
const ROUNDS = process.env.LOCK_ROUNDS;

/**
 * The request to hold in round i of `rounds`, when the held command made `total`
 * requests last time: spread over all of them, shifted by the seed from run to run.
 */
function pick(i: number, rounds: number, total: number, seed: number): number {
  if (ROUNDS === 'all') return i + 1;
  const step = total / rounds;
  return Math.min(total, 1 + Math.floor(i * step + (((seed * (i + 7)) % 997) / 997) * step));
}

for (const engine of engines)
describe.skipIf(engine.skip !== undefined)(`a backup and a prune, one held up at any request while the other runs (${engine.title})`, () => {
  let subject: Subject;
  let endpoint: string;
  // Ceph's rounds cost more (its requests are slower): fewer by default.
  const count = ROUNDS === 'all' ? Infinity : Number(process.env.LOCK_ROUNDS ?? (engine.name === 'ceph' ? 2 : 4));
  const seed = Number(process.env.LOCK_SEED ?? Date.now() % 100_000);
  const proxies: HoldProxy[] = [];
  beforeAll(async () => {
    console.log(`lockSafety: LOCK_SEED=${seed}`);
    endpoint = (await engine.server()).endpoint;
    subject = await Subject.create(`held-${engine.name}`, endpoint);
  });
  afterAll(async () => {
    for (const p of proxies) await p.close();
  });

  /** How many requests a command makes when nothing is held. */
  async function requestsOf(run: (p: HoldProxy) => { done: Promise<CliResult> }): Promise<number> {
    const proxy = await startHoldProxy(endpoint);
    proxies.push(proxy);
    expect((await run(proxy).done).code).toBe(0);
    return proxy.seen.length;
  }

  /**
   * Hold request n of `held` (where: request or reply) until `other` ran from start to end.
   * `patient`: the held command's request timeout (60 s) outlasts the hold, so it waits for
   * that one request while the other runs whole, and its request lands, or its reply comes,
   * only after (the slow reply of the trial's F1); else (1.5 s) its SDK retries meanwhile
   * and it races the other. Both must end cleanly (done, or refused for the lock), and the
   * repository stay sound.
   */
  async function round(held: 'backup' | 'prune', n: number, { where, patient }: Mode): Promise<number> {
    const proxy = await startHoldProxy(endpoint);
    proxies.push(proxy);
    let release!: () => void;
    const until = new Promise<void>((resolve) => (release = resolve));
    let started!: (r: Seen) => void;
    const holding = new Promise<Seen>((resolve) => (started = resolve));
    proxy.rule = (r) => (r.n === n ? { where, until } : null);
    proxy.onHold = (r) => started(r);
    const env = patient ? { VHDVAULT_S3_TIMEOUT_MS: '60000' } : {};
    const first = held === 'backup' ? subject.backup(proxy, env) : subject.prune(proxy, env);
    // The held command may end before its n-th request (refused, or fewer requests this time).
    const heldRequest = await Promise.race([holding, first.done.then(() => null)]);
    let other: CliResult | null = null;
    if (heldRequest) {
      other = await (held === 'backup' ? subject.prune(null) : subject.backup(null)).done;
      // Past the held one's request timeout when it is not patient: its SDK has retried meanwhile.
      if (!patient) await new Promise((r) => setTimeout(r, 1600));
    }
    release();
    const r = await first.done;
    const what = `${held} with request ${n} (${heldRequest ? `${heldRequest.method} ${heldRequest.path}` : 'not reached'}) held at the ${where}${patient ? ', patient' : ''}`;
    if (process.env.LOCK_VERBOSE) console.log(`${what}: exit ${r.code}${other ? `, other exit ${other.code}` : ''}\n${r.stderr}${other?.stderr ?? ''}`);
    expectCleanOutcome(r, what);
    if (other) expectCleanOutcome(other, `the other command, during ${what}`);
    await proxy.close();
    await subject.verifyClean();
    // Refused early, it says nothing of how many requests a full run makes.
    return r.code === 0 ? proxy.seen.length : 0;
  }

  /** Rounds until every request was held once (LOCK_ROUNDS=all) or the count is reached. */
  async function rounds(held: 'backup' | 'prune', before?: () => Promise<void>): Promise<void> {
    let total = await requestsOf((p) => (held === 'backup' ? subject.backup(p) : subject.prune(p)));
    for (let i = 0; i < count && (ROUNDS !== 'all' || i < total); i++) {
      await before?.();
      const made = await round(held, pick(i, count, total, seed), MODES[(i + (held === 'prune' ? 1 : 0)) % MODES.length]!);
      // A command that ran to its end tells how many requests the next one makes.
      if (made > 0) total = made;
    }
  }

  // Every request held once takes about 6 s a round: far past the suite's 300 s guard.
  const timeout = ROUNDS === 'all' ? 4 * 3600_000 : undefined;

  it('backup held, prune runs: every round clean, every backup restores', { timeout }, async () => {
    await rounds('backup');
    await subject.restoreAll();
  });

  it('prune held, backup runs: every round clean, every backup restores', { timeout }, async () => {
    // A backup first each round, so that each prune has something to merge and collect.
    await rounds('prune', async () => {
      expect((await subject.backup(null).done).code).toBe(0);
    });
    await subject.restoreAll();
  });
});

describe.concurrent('a paused writer', () => {
  it('keeps its lock however long it is stopped; the prune is refused; unlock is refused; it commits when resumed', async () => {
    const subject = await Subject.create('paused');
    const proxy = await startHoldProxy(s3.endpoint);
    // Stop the backup at its first block upload: it holds the lock then.
    let stopped!: () => void;
    const atUpload = new Promise<void>((resolve) => (stopped = resolve));
    const run = subject.backup(proxy);
    proxy.rule = (r) => (r.method === 'PUT' && r.path.includes('/blocks/') ? { where: 'request', until: atUpload } : null);
    let paused = false;
    proxy.onHold = () => {
      if (paused) return;
      paused = true;
      process.kill(run.pid, 'SIGSTOP');
      stopped();
    };
    await atUpload;
    // Longer than any request timeout or limit the stopped process had running.
    await new Promise((r) => setTimeout(r, 2000));
    const prune = await subject.prune(null).done;
    expect(prune.code, prune.stderr).toBe(1);
    expect(prune.stderr).toMatch(/is locked by process \d+ on host .* \(backup, since .*\); if that process is gone, run `vhdvault unlock /);
    const unlock = await cli(null, ['unlock', subject.repo, 'vm']).done;
    expect(unlock.code).toBe(1);
    expect(unlock.stderr).toMatch(/which is running: stop it, or let it finish, rather than unlock/);
    process.kill(run.pid, 'SIGCONT');
    const r = await run.done;
    expect(r.code, r.stderr).toBe(0);
    await proxy.close();
    await subject.verifyClean();
    expect((await subject.prune(null).done).code).toBe(0);
    await subject.verifyClean();
    await subject.restoreAll();
  });

  it('whose lock a person removed meanwhile commits nothing, and what it uploaded is collected', async () => {
    const subject = await Subject.create('lost');
    const before = await subject.ids();
    const proxy = await startHoldProxy(s3.endpoint);
    // Hold the last look at the lock before the commit (the first GET of it after a block upload).
    let uploaded = false;
    let release!: () => void;
    const until = new Promise<void>((resolve) => (release = resolve));
    let atConfirm!: () => void;
    const confirming = new Promise<void>((resolve) => (atConfirm = resolve));
    proxy.rule = (r) => {
      if (r.method === 'PUT' && r.path.includes('/blocks/')) uploaded = true;
      return uploaded && r.method === 'GET' && /\/disks\/vm\/lock(\?|$)/.test(r.path) ? { where: 'request', until } : null;
    };
    proxy.onHold = () => atConfirm();
    const run = subject.backup(proxy);
    await confirming;
    // A person, believing the backup gone, released its lock; a backup on another host took one.
    const { storage } = await subject.open();
    const other = { pid: 4242, host: `${hostname()}-elsewhere`, startedAt: new Date().toISOString(), command: 'backup', token: 'feedfeedfeedfeed' };
    await storage.put('disks/vm/lock', JSON.stringify(other));
    release();
    const r = await run.done;
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr).toMatch(/lost its lock while this backup ran \(it is now held by process 4242 on host .*-elsewhere/);
    await proxy.close();
    expect(await subject.ids()).toEqual(before);
    // The other host's holder is gone, a person says so; the next prune collects what the backup uploaded.
    const unlock = await cli(null, ['unlock', subject.repo, 'vm']).done;
    expect(unlock.stdout).toMatch(/removed the lock of process 4242 on host/);
    const prune = await cli(null, ['prune', subject.repo, 'vm', '--keep-last', '9', '--json']).done;
    expect(prune.code, prune.stderr).toBe(0);
    expect((JSON.parse(prune.stdout) as { collected: { objects: number } }).collected.objects).toBeGreaterThan(0);
    await subject.verifyClean();
    await subject.restoreAll();
  });
});

describe.concurrent('waits on another host', () => {
  it('a reader registered by a process on another host holds a prune only VHDVAULT_WAIT_S, with who and how to end it; unlock releases it', async () => {
    const subject = await Subject.create('reader');
    const { storage } = await subject.open();
    const reader = { pid: 77, host: 'other-host', startedAt: '2026-12-07T00:00:00.000Z', command: 'restore', token: '0123456789abcdef' };
    await storage.put('access/vm/reader-77-abcd', JSON.stringify(reader));
    // Three backups kept of four: the prune has a merge to do, so it waits for readers.
    expect((await subject.backup(null).done).code).toBe(0);
    const r = await subject.prune(null, { VHDVAULT_WAIT_S: '1' }).done;
    expect(r.code).toBe(1);
    const lines = r.stderr.trimEnd().split('\n');
    expect(lines[0]).toBe(`vhdvault: waiting for process 77 on host other-host (restore, since 2026-12-07T00:00:00.000Z) to finish reading vm; if it is gone, run \`vhdvault unlock ${subject.repo} vm\``);
    expect(lines.at(-1)).toMatch(/gave up after 1 s waiting for process 77 on host other-host .*; if that process is gone, run `vhdvault unlock /);
    const unlock = await cli(null, ['unlock', subject.repo, 'vm']).done;
    expect(unlock.code, unlock.stderr).toBe(0);
    expect(unlock.stdout).toBe('unlocked vm: removed the registration of process 77 on host other-host (restore, since 2026-12-07T00:00:00.000Z)\n');
    expect((await subject.prune(null).done).code).toBe(0);
    await subject.verifyClean();
    await subject.restoreAll();
  });

  it('a prune on another host that died holding the lock mid-merge: readers say so and give up; after unlock the next reader finishes the merge', async () => {
    const subject = await Subject.create('merge');
    expect((await subject.backup(null).done).code).toBe(0);
    // Stop a prune right after it wrote its merge journal (its reply held, then the process killed).
    const proxy = await startHoldProxy(s3.endpoint);
    let journaled!: () => void;
    const atJournal = new Promise<void>((resolve) => (journaled = resolve));
    const never = new Promise<void>(() => undefined);
    proxy.rule = (r) => (r.method === 'PUT' && r.path.includes('merge.json') ? { where: 'reply', until: never } : null);
    proxy.onHold = () => journaled();
    const prune = subject.prune(proxy);
    await atJournal;
    process.kill(prune.pid, 'SIGKILL');
    await prune.done;
    await proxy.close();
    // As if that prune had run on another host: its lock and marker name one.
    const { storage } = await subject.open();
    for (const k of ['disks/vm/lock', 'access/vm/exclusive']) {
      const owner = JSON.parse((await storage.get(k)).toString('utf8')) as { host: string };
      await storage.put(k, JSON.stringify({ ...owner, host: 'other-host' }));
    }
    const list = await cli(null, ['list', subject.repo, 'vm'], { VHDVAULT_WAIT_S: '1' }).done;
    expect(list.code).toBe(1);
    expect(list.stderr).toMatch(/^vhdvault: waiting for process \d+ on host other-host \(prune, since .*\) to finish changing vm; if it is gone, run `vhdvault unlock /);
    expect(list.stderr).toMatch(/gave up after 1 s waiting for process \d+ on host other-host/);
    const unlock = await cli(null, ['unlock', subject.repo, 'vm']).done;
    expect(unlock.code, unlock.stderr).toBe(0);
    expect(unlock.stdout).toMatch(/removed the lock of process \d+ on host other-host \(prune/);
    const after = await cli(null, ['list', subject.repo, 'vm']).done;
    expect(after.code, after.stderr).toBe(0);
    expect(after.stderr).toBe('');
    expect(await storage.head('disks/vm/merge.json')).toBeNull();
    await subject.verifyClean();
    await subject.restoreAll();
  });
});

describe.concurrent('exclusive creation without conditional writes', () => {
  it.each(engines.filter((e) => e.skip === undefined).map((e) => [e.name, e] as const))('a creator held up after its claim is never overtaken, however long: the other gives up naming it (%s)', async (_, engine) => {
    const { endpoint } = await engine.server();
    const proxy = await startHoldProxy(endpoint);
    const bucket = await newBucket(endpoint);
    const { openS3Storage } = await import('../src/storage/S3Storage.js');
    const slow = await openS3Storage({ kind: 's3', bucket, prefix: 'p', endpoint: proxy.endpoint }, { conditionalWrites: 'off', timeoutMs: 60_000 });
    const fast = await openS3Storage({ kind: 's3', bucket, prefix: 'p', endpoint }, { conditionalWrites: 'off' });
    expect(await fast.conditionalWrites()).toBe(false);
    let release!: () => void;
    const until = new Promise<void>((resolve) => (release = resolve));
    let held!: () => void;
    const holding = new Promise<void>((resolve) => (held = resolve));
    // The slow creator's listing of the claims, after its claim is written: held past the fast one's whole wait.
    proxy.rule = (r) => (r.method === 'GET' && r.path.includes('list-type=2') && r.path.includes('.claims') ? { where: 'reply', until } : null);
    proxy.onHold = () => held();
    const first = slow.put('lock', 'slow', { ifAbsent: true });
    await holding;
    const second = await fast.put('lock', 'fast', { ifAbsent: true }).then(
      (v) => v,
      (e: Error) => e,
    );
    expect(second).toBeInstanceOf(Error);
    expect((second as Error).message).toMatch(/lock: still contended after 10 s: a claim of process \d+ on host .* \(exclusive create, since .*\) \(s3:\/\/.*\/p\/\.claims\/.*\); if that process is gone, delete that object/);
    release();
    expect(await first).toBe(true);
    expect((await fast.get('lock')).toString()).toBe('slow');
    expect(await fast.list('.claims')).toEqual([]);
    slow.close();
    fast.close();
    await proxy.close();
  });

  it('a claim its owner left when killed here is removed by the next creator, which then creates', async () => {
    const bucket = await newBucket(s3.endpoint);
    const { openS3Storage } = await import('../src/storage/S3Storage.js');
    const storage = await openS3Storage({ kind: 's3', bucket, prefix: 'p', endpoint: s3.endpoint }, { conditionalWrites: 'off' });
    const { createHash: hash } = await import('node:crypto');
    const dead = { pid: 2 ** 22 + 12345, host: hostname(), startedAt: new Date().toISOString(), command: 'exclusive create', token: 'deaddeaddeaddead' };
    const folder = `.claims/${hash('sha256').update(storage.describe('lock')).digest('hex')}`;
    await storage.put(`${folder}/1-dead`, JSON.stringify(dead));
    const started = Date.now();
    expect(await storage.put('lock', 'mine', { ifAbsent: true })).toBe(true);
    expect(Date.now() - started).toBeLessThan(5000);
    expect(await storage.head(`${folder}/1-dead`)).toBeNull();
    storage.close();
  });
});
