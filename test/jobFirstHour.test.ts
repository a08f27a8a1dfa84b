/**
 * Jobs as a new user meets them (issue 20): `job check` looks at what a run
 * would meet, without running anything, and lists every problem; `job run`
 * shows each disk's progress on a terminal and says nothing off one;
 * `job run --full` takes a full backup of every disk.
 */
import { spawnSync } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { CLI, vhdvaultAsync } from './helpers/cli.js';
import { makeRaw, tempDir } from './helpers/files.js';
import { initRepo, listed } from './helpers/store.js';

const MiB = 1024 * 1024;
const hasScript = spawnSync('script', ['--version']).status === 0;

let dir: string;
let repo: string;
beforeAll(async () => {
  dir = await tempDir('vhdvault-jobhour-');
  repo = join(dir, 'repo');
  await initRepo(repo, 'dir');
  for (const disk of ['alpha', 'beta']) await makeRaw(join(dir, `${disk}.raw`), 6 * MiB, [[0, 6 * MiB]]);
});

async function jobFile(name: string, text: string): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, text);
  return path;
}

const job = (repository: string, disks: string) => `name: hour\nschedule: "0 3 * * *"\nrepository: ${repository}\ndisks:\n${disks}`;
const FILE_DISKS = '  - name: alpha\n    source: alpha.raw\n  - name: beta\n    source: beta.raw\n';

describe('job check looks at what a run would meet', () => {
  it('a job whose places are all there passes: exit 0, nothing on stderr', async () => {
    const socket = join(dir, 'nbd.sock');
    const server = createServer((c) => c.destroy());
    await new Promise<void>((resolve) => server.listen(socket, resolve));
    try {
      const file = await jobFile('good.yaml', job('repo', `${FILE_DISKS}  - name: gamma\n    source: "nbd+unix:///x?socket=${socket}"\n`));
      const r = await vhdvaultAsync('job', 'check', file);
      expect(r.code, r.stderr).toBe(0);
      expect(r.stderr).toBe('');
      const json = await vhdvaultAsync('job', 'check', file, '--json');
      expect(json.code, json.stderr).toBe(0);
      expect(JSON.parse(json.stdout).problems).toEqual([]);
    } finally {
      server.close();
    }
  });

  it('a repository never initialised and a missing source: each a line naming it, exit 1', async () => {
    const file = await jobFile('missing.yaml', job('nowhere', `${FILE_DISKS}  - name: gamma\n    source: gamma.raw\n  - name: delta\n    source: "nbd+unix:///x?socket=${join(dir, 'alpha.raw')}"\n`));
    const r = await vhdvaultAsync('job', 'check', file);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stdout).toContain('job hour'); // the summary still shows
    expect(r.stderr.trimEnd().split('\n')).toEqual([
      `vhdvault: ${file}: repository: ${join(dir, 'nowhere')}: is not a vhdvault repository (no vhdvault.json); create one with \`vhdvault init\``,
      `vhdvault: ${file}: disk gamma: source: ${join(dir, 'gamma.raw')}: no such file or directory`,
      `vhdvault: ${file}: disk delta: source: ${join(dir, 'alpha.raw')}: is not a socket`,
    ]);
    const json = await vhdvaultAsync('job', 'check', file, '--json');
    expect(json.code).toBe(1);
    expect(json.stderr).toBe('');
    expect(JSON.parse(json.stdout).problems).toEqual([
      `repository: ${join(dir, 'nowhere')}: is not a vhdvault repository (no vhdvault.json); create one with \`vhdvault init\``,
      `disk gamma: source: ${join(dir, 'gamma.raw')}: no such file or directory`,
      `disk delta: source: ${join(dir, 'alpha.raw')}: is not a socket`,
    ]);
  });

  it('a file with several mistakes lists every one, not the first "(and N more)"', async () => {
    const text = `${job('repo', `${FILE_DISKS}  - name: alpha\n    source: again.raw\n  - name: q\n    qmp: /run/q.qmp\n`)}concurrency: 0\nverify: some\nretention: { keeplast: 2 }\n`;
    const file = await jobFile('mistakes.yaml', text);
    const r = await vhdvaultAsync('job', 'check', file);
    expect(r.code).toBe(2);
    expect(r.stdout).toBe('');
    expect(r.stderr).not.toMatch(/more problem/);
    const lines = r.stderr.trimEnd().split('\n');
    expect(lines.map((line) => line.slice(`vhdvault: ${file}: `.length).split(':')[0])).toEqual(['concurrency', 'verify', 'retention.keeplast']);
    // With the values right, the checks across keys: each too.
    const fixed = await jobFile('mistakes2.yaml', text.replace('concurrency: 0\nverify: some\nretention: { keeplast: 2 }\n', ''));
    const again = await vhdvaultAsync('job', 'check', fixed);
    expect(again.code).toBe(2);
    expect(again.stderr.trimEnd().split('\n').map((line) => line.slice(`vhdvault: ${fixed}: `.length).split(':')[0])).toEqual(['disks[2].name', 'disks[3].node']);
  });
});

describe('job run', () => {
  it('off a terminal says nothing on stderr (no progress lines leak from the backups)', async () => {
    const file = await jobFile('quiet.yaml', job('repo', FILE_DISKS));
    const r = await vhdvaultAsync('job', 'run', file);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toBe('');
    expect(r.stdout).toMatch(/^job hour run \S+ \(manual\): ok/);
  });

  it('--full takes a full backup of every disk, after deltas', async () => {
    const file = await jobFile('full.yaml', job('repo', FILE_DISKS));
    expect((await vhdvaultAsync('job', 'run', file)).code).toBe(0);
    const r = await vhdvaultAsync('job', 'run', file, '--full');
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/alpha\s+full\s+.*\(job run --full\)/);
    for (const disk of ['alpha', 'beta']) expect((await listed(repo, disk)).map((b) => b.kind).slice(-2), disk).toEqual(['delta', 'full']);
  });

  it.skipIf(!hasScript)('on a terminal shows each disk by name with its progress', async () => {
    const file = await jobFile('shown.yaml', job('repo', FILE_DISKS));
    const command = [process.execPath, CLI, 'job', 'run', file].map((s) => `'${s}'`).join(' ');
    const r = spawnSync('script', ['-qec', command, '/dev/null'], { encoding: 'utf8', timeout: 60_000 });
    expect(r.status, r.stdout).toBe(0);
    for (const disk of ['alpha', 'beta']) {
      expect(r.stdout).toMatch(new RegExp(`${disk} \\d+% [\\d.]+ (B|KiB|MiB) read`));
      expect(r.stdout).toMatch(new RegExp(`Z ${disk}: (full|delta) \\S+`));
    }
    expect(r.stdout).not.toContain('vhdvault-progress');
  });
});
