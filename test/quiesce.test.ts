// vitest: slow (boots a real Linux guest; started first on a fresh checkout, see vitest.config.ts)
/**
 * Live backups of a real Linux guest quiesced through its guest agent
 * (`backup --qemu … --qga`): the backup is taken with the guest's ext4
 * frozen, so the restored image is clean without a journal replay; a
 * vhdvault killed while the guest is frozen leaves it frozen only until the
 * next backup through that agent, which thaws it and says so; an agent that
 * never answers gives a crash-consistent backup with a warning, or with
 * --require-quiesce a refusal that commits nothing.
 */
import { spawn } from 'node:child_process';
import { createConnection, createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, type CliResult, cliEnv, vhdvaultAsync } from './helpers/cli.js';
import { tempDir } from './helpers/files.js';
import { bootGuest, e2fsck, ext4Cat, type Guest, guestSkip, guestTitle, makeExt4Disk } from './helpers/guest.js';
import { QgaClient } from './helpers/qga.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe.skipIf(guestSkip !== undefined)(guestTitle('live backups quiesced through the guest agent'), () => {
  let dir: string;
  let guest: Guest;
  let repo: string;
  const servers: Server[] = [];

  beforeAll(async () => {
    dir = await tempDir('vhdvault-quiesce-');
    const image = join(dir, 'vda.raw');
    await makeExt4Disk(image, 32);
    guest = await bootGuest({ disks: [image], writer: true });
    repo = join(dir, 'repo');
    expect((await vhdvaultAsync('init', repo)).code).toBe(0);
  });
  afterAll(async () => {
    for (const s of servers) s.close();
    await guest?.kill();
  });

  /** `vhdvault backup` of the guest's disk, with its child process (to kill it). */
  function backup(...extra: string[]): { pid: number; done: Promise<CliResult> } {
    const { device, node } = guest.disks[0]!;
    const args = ['backup', repo, 'vm', '--qemu', guest.qmpSocket, '--device', device, '--node', node, '--fleecing', dir, '--json', ...extra];
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: cliEnv({ VHDVAULT_QGA_TIMEOUT_S: '2' }) });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
    child.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
    return { pid: child.pid!, done: new Promise((resolve) => child.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr }))) };
  }

  /** The guest's filesystem as the latest backup holds it: clean as it is (no journal replay), and its counter. */
  async function restoredCounter(): Promise<number> {
    const out = join(dir, 'restored.raw');
    const r = await vhdvaultAsync('restore', repo, 'vm', out);
    expect(r.code, r.stderr).toBe(0);
    const fsck = await e2fsck(out);
    expect(fsck.code, fsck.output).toBe(0);
    return Number.parseInt(await ext4Cat(out, '/counter'), 10);
  }

  async function agentStatus(): Promise<string> {
    const qga = await QgaClient.connect(guest.qgaSocket);
    try {
      return await qga.execute<string>('guest-fsfreeze-status');
    } finally {
      await qga.close();
    }
  }

  /** A Unix socket in front of the guest's agent that calls `onLine` with each line vhdvault sends (false: do not pass it on). */
  async function agentProxy(onLine: (line: string) => boolean): Promise<string> {
    const path = join(dir, `qga-proxy-${servers.length}.sock`);
    const server = createServer((client) => {
      const agent = createConnection({ path: guest.qgaSocket });
      agent.pipe(client);
      let pending = '';
      client.on('data', (chunk: Buffer) => {
        pending += chunk.toString('latin1');
        for (let nl = pending.indexOf('\n'); nl !== -1; nl = pending.indexOf('\n')) {
          const line = pending.slice(0, nl + 1);
          pending = pending.slice(nl + 1);
          if (onLine(line)) agent.write(Buffer.from(line, 'latin1'));
        }
      });
      client.on('close', () => agent.destroy());
      agent.on('error', () => client.destroy());
      client.on('error', () => agent.destroy());
    });
    servers.push(server);
    await new Promise<void>((resolve) => server.listen(path, resolve));
    return path;
  }

  it('freezes the guest only while the point in time is set: quiesced, frozenMs reported, the restored ext4 clean without a replay', async () => {
    for (const extra of [[], []]) {
      const r = await backup('--qga', guest.qgaSocket, ...extra).done;
      expect(r.code, r.stderr).toBe(0);
      const report = JSON.parse(r.stdout) as { quiesced: boolean; frozenMs: number | null; kind: string };
      expect(report.quiesced).toBe(true);
      expect(report.frozenMs).toBeGreaterThan(0);
      console.log(`quiesced ${report.kind} backup: guest frozen ${report.frozenMs} ms`);
      expect(await restoredCounter()).toBeGreaterThan(0);
    }
    expect(await agentStatus()).toBe('thawed');
  });

  it('killed while the guest is frozen: the next backup thaws it, says so, and the guest writes again', async () => {
    let run: { pid: number; done: Promise<CliResult> } | null = null;
    // Kill vhdvault as it asks for the thaw: the guest stays frozen, as after any kill -9 inside the window.
    const proxy = await agentProxy((line) => {
      if (!line.includes('guest-fsfreeze-thaw')) return true;
      process.kill(run!.pid, 'SIGKILL');
      return false;
    });
    run = backup('--qga', proxy);
    expect((await run.done).code).toBe(-1);
    expect(await agentStatus()).toBe('frozen');
    const next = await backup('--qga', guest.qgaSocket).done;
    expect(next.code, next.stderr).toBe(0);
    expect(next.stderr).toMatch(new RegExp(`thawed the guest's filesystems, which process ${run.pid} on host .* left frozen when it was killed`));
    expect(await agentStatus()).toBe('thawed');
    // The guest's writer goes on: a later backup holds a later counter.
    const before = await restoredCounter();
    await sleep(500);
    expect((await backup().done).code).toBe(0);
    expect(await restoredCounter()).toBeGreaterThan(before);
  });

  it('a guest another process froze is neither frozen nor thawed by the backup: it stays as that process left it', async () => {
    const qga = await QgaClient.connect(guest.qgaSocket);
    try {
      expect(await qga.execute('guest-fsfreeze-freeze')).toBeGreaterThan(0);
    } finally {
      await qga.close();
    }
    try {
      const r = await backup('--qga', guest.qgaSocket).done;
      expect(r.code, r.stderr).toBe(0);
      expect(r.stderr).toMatch(/the guest is already frozen by another process: backing up without freezing or thawing it/);
      expect((JSON.parse(r.stdout) as { quiesced: boolean }).quiesced).toBe(false);
      expect(await agentStatus()).toBe('frozen');
    } finally {
      const again = await QgaClient.connect(guest.qgaSocket);
      await again.execute('guest-fsfreeze-thaw').finally(() => again.close());
    }
    expect(await agentStatus()).toBe('thawed');
  });

  it('an agent that never answers: crash-consistent with a warning, or with --require-quiesce nothing committed', async () => {
    const silent = join(dir, 'silent.sock');
    const server = createServer(() => undefined);
    servers.push(server);
    await new Promise<void>((resolve) => server.listen(silent, resolve));
    const count = async () => (JSON.parse((await vhdvaultAsync('list', repo, 'vm', '--json')).stdout) as { backups: unknown[] }).backups.length;
    const before = await count();

    const loose = await backup('--qga', silent).done;
    expect(loose.code, loose.stderr).toBe(0);
    expect(loose.stderr).toMatch(/silent\.sock: guest-sync: the guest agent did not answer within 2 s .*: backing up without quiescing \(crash-consistent\)/);
    expect((JSON.parse(loose.stdout) as { quiesced: boolean }).quiesced).toBe(false);

    const strict = await backup('--qga', silent, '--require-quiesce').done;
    expect(strict.code).toBe(1);
    expect(strict.stderr.trimEnd().split('\n')).toHaveLength(1);
    expect(strict.stderr).toMatch(/cannot quiesce the guest \(--require-quiesce\): .*nothing was backed up/);
    expect(await count()).toBe(before + 1);
    expect(await agentStatus()).toBe('thawed');
  });
});
