/**
 * What a person reads (issue 20): list has a header over aligned columns;
 * each prune line names its disk; sizes are in one style everywhere; a
 * progress display shows no rate or ETA before they mean something.
 */
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { describeProgress, formatEta, progressFigures } from '../src/cli/progress.js';
import { formatBytes } from '../src/util/sizes.js';
import { columns } from '../src/util/words.js';
import { vhdvaultAsync } from './helpers/cli.js';
import { makeRaw, tempDir } from './helpers/files.js';
import { backupOf, initRepo } from './helpers/store.js';

const MiB = 1024 * 1024;

describe('the commands a person reads', () => {
  let dir: string;
  let repo: string;

  beforeAll(async () => {
    dir = await tempDir('vhdvault-human-');
    repo = join(dir, 'repo');
    await initRepo(repo, 'dir');
    // A short name and a long one; a disk small enough that its sizes are not in MiB.
    await makeRaw(join(dir, 'a.raw'), 4 * MiB, [[0, 4 * MiB]]);
    await makeRaw(join(dir, 'small.raw'), 136 * 1024, [[0, 136 * 1024]]);
    for (let i = 0; i < 3; i++) await backupOf(repo, 'a', join(dir, 'a.raw'));
    for (let i = 0; i < 2; i++) await backupOf(repo, 'webserver-disk0', join(dir, 'small.raw'));
  });

  it('list: a header, then the backups in aligned columns, sizes in binary units', async () => {
    const r = await vhdvaultAsync('list', repo);
    expect(r.code, r.stderr).toBe(0);
    const lines = r.stdout.trimEnd().split('\n');
    expect(lines).toHaveLength(6);
    expect(lines[0]).toMatch(/^disk\s+backup\s+kind\s+created\s+size\s+stored$/);
    // Each column starts where its header does.
    for (const header of ['backup', 'kind', 'created', 'size', 'stored']) {
      const at = lines[0]!.indexOf(header);
      for (const line of lines.slice(1)) expect(line[at - 1], `${header} in ${line}`).toBe(' ');
      for (const line of lines.slice(1)) expect(line[at], `${header} in ${line}`).not.toBe(' ');
    }
    expect(lines[1]).toMatch(/^a\s+\S+\s+full\s+\S+\s+4\.0 MiB\s+4\.0 MiB$/);
    expect(lines[4]).toMatch(/^webserver-disk0\s+\S+\s+full\s+\S+\s+136\.0 KiB\s+[\d.]+ (KiB|MiB)$/);
    expect(r.stdout).not.toMatch(/\d B\b/);
  });

  it('prune: every line names its disk', async () => {
    const r = await vhdvaultAsync('prune', repo, '--keep-last', '1', '--dry-run');
    expect(r.code, r.stderr).toBe(0);
    const lines = r.stdout.trimEnd().split('\n');
    const perBackup = lines.filter((line) => /^would (keep|remove|merge) /.test(line));
    // Per disk: one kept, the others removed, each merged forward into the next.
    expect(perBackup).toHaveLength(8);
    for (const line of perBackup) expect(line).toMatch(/^would (keep|remove|merge)\s+(a|webserver-disk0)\s+\d{8}T/);
    expect(perBackup.filter((line) => line.includes(' webserver-disk0 '))).toHaveLength(3);
    expect(lines.at(-1)).toBe('would merge: 3');
  });

  it('restore says the size it wrote in the same units', async () => {
    const r = await vhdvaultAsync('restore', repo, 'webserver-disk0', join(dir, 'out.raw'));
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/to \S+out\.raw \(raw, 136\.0 KiB\)$/m);
  });
});

describe('formatting', () => {
  it('formatBytes: bytes, then binary units with one decimal', () => {
    expect([0, 512, 1023, 1024, 140019, 30 * MiB, 1.5 * 1024 * MiB, 3 * 1024 ** 4].map(formatBytes)).toEqual(['0 B', '512 B', '1023 B', '1.0 KiB', '136.7 KiB', '30.0 MiB', '1.5 GiB', '3.0 TiB']);
  });

  it('progress: no rate or ETA from the first instants; then both, from the time so far', () => {
    // The first frame: a whole block already read, a millisecond in.
    expect(progressFigures({ done: 1, total: 100, bytes: 2 * MiB, seconds: 0.001 })).toEqual({ percent: '1%', bytes: '2.0 MiB', rate: '…', eta: '…' });
    expect(progressFigures({ done: 0, total: 100, bytes: 0, seconds: 5 })).toMatchObject({ rate: '…', eta: '…' });
    expect(progressFigures({ done: 25, total: 100, bytes: 50 * MiB, seconds: 2 })).toEqual({ percent: '25%', bytes: '50.0 MiB', rate: '25.0 MiB/s', eta: '6s' });
    expect(progressFigures({ done: 100, total: 100, bytes: 200 * MiB, seconds: 4 })).toMatchObject({ percent: '100%', eta: '0s' });
    expect(progressFigures({ done: 0, total: 0, bytes: 0, seconds: 0 }).percent).toBe('…');
  });

  it('a unit\'s progress on one line, and ETAs of minutes and hours', () => {
    expect(describeProgress('alpha', { done: 0, total: 0, bytes: 0, seconds: 0 })).toBe('alpha …');
    expect(describeProgress('alpha', { done: 3, total: 10, bytes: 6 * MiB, seconds: 0.2 })).toBe('alpha 30% 6.0 MiB read');
    expect(describeProgress('alpha', { done: 5, total: 10, bytes: 10 * MiB, seconds: 2 })).toBe('alpha 50% 10.0 MiB read, 5.0 MiB/s, ETA 2s');
    expect([59, 61, 3599, 3600, 7830].map(formatEta)).toEqual(['59s', '1m 01s', '59m 59s', '1h 00m', '2h 10m']);
  });

  it('columns: each padded to its widest cell, the last one not', () => {
    expect(columns([['a', 'bb', 'c'], ['ccc', 'd', 'e']])).toEqual(['a    bb  c', 'ccc  d   e']);
  });
});
