/**
 * `--json`: every document names its format and version, every format is
 * documented, and a failure is a JSON document on stdout besides its one line
 * on stderr.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { JSON_FORMATS } from '../src/cli/json.js';
import { buildProgram } from '../src/cli/program.js';
import { vhdvault, vhdvaultAsync, type CliResult } from './helpers/cli.js';
import { tempDir } from './helpers/files.js';

const dir = await tempDir('vhdvault-json-');
const repo = join(dir, 'repo');
const disk = join(dir, 'disk.raw');

beforeAll(async () => {
  await writeFile(disk, randomBytes(3 * 1024 * 1024));
  expect(vhdvault('init', repo).code).toBe(0);
});

afterAll(async () => {
  const { rm } = await import('node:fs/promises');
  await rm(dir, { recursive: true, force: true });
});

/** The document a successful run printed, after checking its format. */
function documentOf(r: CliResult, format: string): Record<string, unknown> {
  expect(r.code, r.stderr).toBe(0);
  const doc = JSON.parse(r.stdout) as Record<string, unknown>;
  expect(doc.format).toBe(format);
  expect(Object.keys(doc)[0]).toBe('format');
  return doc;
}

/** The error document a failed run printed, after checking it matches its stderr line and exit code. */
function errorOf(r: CliResult, code: number): { message: string; code: number } {
  expect(r.code, r.stderr).toBe(code);
  expect(r.stderr).not.toContain('    at ');
  const lines = r.stdout.trimEnd().split('\n');
  expect(lines).toHaveLength(1);
  const doc = JSON.parse(lines[0]!) as { format: string; error: { message: string; code: number } };
  expect(doc.format).toBe(JSON_FORMATS.error);
  expect(doc.error.code).toBe(code);
  expect(r.stderr).toContain(doc.error.message);
  return doc.error;
}

describe('--json documents', () => {
  it('backup, list, verify, prune, vhd info, job history and vm list each print one versioned object', async () => {
    const backup = documentOf(await vhdvaultAsync('backup', repo, 'web', '--source', disk, '--json'), JSON_FORMATS.backup);
    expect(backup.kind).toBe('full');
    expect(['read', 'digest', 'compress', 'write']).toContain(backup.boundingStage);
    expect(backup).not.toHaveProperty('slowestStage');
    const list = documentOf(await vhdvaultAsync('list', repo, '--json'), JSON_FORMATS.list);
    expect((list.backups as Array<{ id: string }>).map((b) => b.id)).toEqual([backup.id]);
    expect(list.unreadable).toEqual([]);
    const [verify, prune, history, vms] = await Promise.all([
      vhdvaultAsync('verify', repo, '--json'),
      vhdvaultAsync('prune', repo, '--keep-last', '1', '--dry-run', '--json'),
      vhdvaultAsync('job', 'history', repo, '--json'),
      vhdvaultAsync('vm', 'list', repo, '--json'),
    ]);
    expect(documentOf(verify, JSON_FORMATS.verify).ok).toBe(true);
    expect(documentOf(prune, JSON_FORMATS.prune).kept).toEqual([backup.id]);
    expect(documentOf(history, JSON_FORMATS.jobHistory).runs).toEqual([]);
    expect(documentOf(vms, JSON_FORMATS.vmList).backups).toEqual([]);
    const vhd = join(dir, 'disk.vhd');
    expect(vhdvault('vhd', 'convert', disk, vhd).code).toBe(0);
    expect(documentOf(vhdvault('vhd', 'info', vhd, '--json'), JSON_FORMATS.vhdInfo).type).toBe('dynamic');
  });

  it('job history reads a run report an earlier version wrote (slowestStage) as the current one', async () => {
    await mkdir(join(repo, 'jobs', 'old'), { recursive: true });
    const v1 = {
      format: 'vhdvault-job-run', job: 'old', jobFile: '/etc/old.yaml', runId: '20260101T000000000Z-000000', trigger: 'manual',
      startedAt: '2026-01-01T00:00:00.000Z', finishedAt: '2026-01-01T00:00:01.000Z', durationMs: 1000, ok: true,
      disks: [{ disk: 'web', ok: true, id: 'x', kind: 'full', durationMs: 900, slowestStage: 'read' }],
      retention: null, verify: null, replication: null, healthCheck: null,
      stages: { read: { busyMs: 1, bytes: 1 }, digest: { busyMs: 0, bytes: 0 }, compress: { busyMs: 0, bytes: 0 }, write: { busyMs: 0, bytes: 0 }, replicate: { busyMs: 0, bytes: 0 } },
      boundingStage: 'read',
    };
    await writeFile(join(repo, 'jobs', 'old', `${v1.runId}.json`), JSON.stringify(v1));
    const history = documentOf(await vhdvaultAsync('job', 'history', repo, '--json'), JSON_FORMATS.jobHistory);
    const [run] = history.runs as Array<{ format: string; disks: Array<Record<string, unknown>> }>;
    expect(run!.format).toBe(JSON_FORMATS.jobRun);
    expect(run!.disks[0]).toMatchObject({ disk: 'web', boundingStage: 'read' });
    expect(run!.disks[0]).not.toHaveProperty('slowestStage');
    expect((history.trends as Array<{ bounding: Record<string, number> }>)[0]!.bounding).toEqual({ read: 1 });
  });
});

describe('failures with --json', () => {
  it('a failure is a JSON document on stdout with the stderr line and exit code 1', async () => {
    const e = errorOf(await vhdvaultAsync('list', repo, 'nosuch', '--json'), 1);
    expect(e.message).toMatch(/has no backups of disk "nosuch"/);
    errorOf(await vhdvaultAsync('verify', join(dir, 'nowhere'), '--json'), 1);
  });

  it('a usage error is one too, with exit code 2, whether commander or the command refuses', async () => {
    expect(errorOf(await vhdvaultAsync('list', repo, '--bogus', '--json'), 2).message).toMatch(/unknown option '--bogus'/);
    expect(errorOf(await vhdvaultAsync('backup', repo, 'web', '--json'), 2).message).toMatch(/give --source/);
  });

  it('without --json, a failure prints nothing on stdout', async () => {
    const r = await vhdvaultAsync('list', repo, 'nosuch');
    expect(r.code).toBe(1);
    expect(r.stdout).toBe('');
  });
});

describe('documentation', () => {
  it('docs/json.md names every format, and every command with --json has one', async () => {
    const doc = await readFile(new URL('../docs/json.md', import.meta.url), 'utf8');
    for (const format of Object.values(JSON_FORMATS)) expect(doc, format).toContain(`\`${format}\``);
    const withJson: string[] = [];
    const walk = (cmd: ReturnType<typeof buildProgram>, path: string[]) => {
      for (const sub of cmd.commands) walk(sub, [...path, sub.name()]);
      if (cmd.options.some((o) => o.long === '--json')) withJson.push(path.join(' '));
    };
    walk(buildProgram(), []);
    expect(withJson.length).toBeGreaterThan(10);
    for (const command of withJson) expect(doc, command).toContain(`| \`${command}\` |`);
  });
});
