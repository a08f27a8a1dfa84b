/**
 * Retention of VM backups as units: prune's policy chooses among a VM's
 * records; a record not kept goes before its disks' backups, a kept one
 * keeps every disk's backup; backups a failed VM backup left outside any
 * record go, and those newer than every record (a VM backup being taken)
 * stay. The disks' backups are made with `vhdvault backup --source`, the
 * records written through the public vmRecord API, as `vm backup` does.
 */
import { join } from 'node:path';
import { beforeEach, describe, expect, it } from 'vitest';
import { newBackupId } from '../src/store/names.js';
import { Repository } from '../src/store/repository.js';
import { vmRecords, writeVmRecord } from '../src/store/vmRecord.js';
import { vhdvaultAsync } from './helpers/cli.js';
import { makeRaw, tempDir } from './helpers/files.js';

const MiB = 1024 * 1024;

describe('prune of VM backups', () => {
  let dir: string;
  let repo: string;
  let round = 0;

  beforeEach(async () => {
    dir = await tempDir('vhdvault-vmprune-');
    repo = join(dir, 'repo');
    expect((await vhdvaultAsync('init', repo)).code).toBe(0);
  });

  /** The next backup of one disk of VM "web": its id. */
  async function diskBackup(target: string): Promise<string> {
    const image = join(dir, `${target}.raw`);
    round++;
    await makeRaw(image, 8 * MiB, [[(round % 4) * 2 * MiB, 4096]]);
    const r = await vhdvaultAsync('backup', repo, `web.${target}`, '--source', image);
    expect(r.code, r.stderr).toBe(0);
    return r.stdout.trim();
  }

  /** A whole VM backup: both disks, then the record naming them. */
  async function vmBackup(): Promise<{ id: string; disks: Record<string, string> }> {
    const disks = { vda: await diskBackup('vda'), vdb: await diskBackup('vdb') };
    const r = await Repository.open(repo);
    const latest = (await vmRecords(r, 'web')).at(-1)?.id;
    const id = newBackupId(latest);
    const definition = { kind: 'qemu' as const, machine: 'pc', memoryMiB: 256, cpus: 1, kernel: null, initrd: null, append: null, disks: [], agent: false };
    await writeVmRecord(r, { format: 1, vm: 'web', id, createdAt: new Date().toISOString(), disks, quiesced: false, frozenMs: null, pausedMs: 1, checkpoint: null, definition });
    return { id, disks };
  }

  const listed = async (disk: string) => {
    const r = await vhdvaultAsync('list', repo, disk, '--json');
    return (JSON.parse(r.stdout) as { backups: Array<{ id: string }> }).backups.map((b) => b.id);
  };
  const vmList = async () => (JSON.parse((await vhdvaultAsync('vm', 'list', repo, 'web', '--json')).stdout) as { backups: Array<{ id: string; disks: Record<string, string> }> }).backups;

  it('keeps or removes whole VM backups: the kept ones keep every disk, a failed one\'s leftovers go, a newer one stays', async () => {
    await vmBackup();
    const failedVda = await diskBackup('vda'); // a VM backup that failed before vdb: no record
    const second = await vmBackup();
    const third = await vmBackup();
    const inFlight = await diskBackup('vda'); // a VM backup still being taken: newer than every record

    const dry = await vhdvaultAsync('prune', repo, '--keep-last', '2', '--dry-run', '--json');
    expect(dry.code, dry.stderr).toBe(0);
    expect((await vmList()).length).toBe(3);

    const r = await vhdvaultAsync('prune', repo, '--keep-last', '2', '--json');
    expect(r.code, r.stderr).toBe(0);
    const report = JSON.parse(r.stdout) as { vms: Array<{ vm: string; kept: string[]; removed: string[] }> };
    expect(report.vms).toEqual([{ vm: 'web', kept: [second.id, third.id], removed: [expect.any(String)] }]);
    expect(JSON.parse(dry.stdout).vms).toEqual(report.vms);

    expect((await vmList()).map((v) => v.id)).toEqual([second.id, third.id]);
    // Every disk backup a kept VM backup names is there; the failed one's is gone; the newest stays.
    expect(await listed('web.vda')).toEqual([second.disks.vda, third.disks.vda, inFlight]);
    expect(await listed('web.vdb')).toEqual([second.disks.vdb, third.disks.vdb]);
    expect(await listed('web.vda')).not.toContain(failedVda);
    for (const v of await vmList()) {
      for (const [target, id] of Object.entries(v.disks)) {
        const out = join(dir, `restored-${target}-${id}.raw`);
        const restored = await vhdvaultAsync('restore', repo, `web.${target}`, out, '--backup', id);
        expect(restored.code, restored.stderr).toBe(0);
      }
    }
    const verify = await vhdvaultAsync('verify', repo);
    expect(verify.code, verify.stderr).toBe(0);
  });

  it('replication copies a VM backup once all its disks are at the destination, and the destination keeps VM backups whole', async () => {
    const dst = join(dir, 'dst');
    expect((await vhdvaultAsync('init', dst)).code).toBe(0);
    const first = await vmBackup();
    // Only one disk replicated: its VM backup is not recorded there (it would not restore whole).
    const one = await vhdvaultAsync('replicate', repo, dst, 'web.vda', '--json');
    expect(one.code, one.stderr).toBe(0);
    expect(JSON.parse(one.stdout).vmBackups).toEqual([]);
    const both = await vhdvaultAsync('replicate', repo, dst, '--json');
    expect(both.code, both.stderr).toBe(0);
    expect(JSON.parse(both.stdout).vmBackups).toEqual([`web ${first.id}`]);
    await vmBackup();
    const third = await vmBackup();
    const kept = await vhdvaultAsync('replicate', repo, dst, '--keep-last', '1', '--json');
    expect(kept.code, kept.stderr).toBe(0);
    const at = async (d: string) => (JSON.parse((await vhdvaultAsync('list', dst, d, '--json')).stdout) as { backups: Array<{ id: string }> }).backups.map((b) => b.id);
    const dstVms = () => vhdvaultAsync('vm', 'list', dst, '--json').then((r) => (JSON.parse(r.stdout) as { backups: Array<{ id: string }> }).backups.map((v) => v.id));
    // Recorded there after its prune: the newest VM backup, whose disks the prune kept as newer than every record.
    expect(await dstVms()).toContain(third.id);
    expect(await at('web.vda')).toContain(third.disks.vda);
    // The next replication's prune applies the policy to the records.
    expect((await vhdvaultAsync('replicate', repo, dst, '--keep-last', '1')).code).toBe(0);
    expect(await dstVms()).toEqual([third.id]);
    expect(await at('web.vda')).toEqual([third.disks.vda]);
    expect(await at('web.vdb')).toEqual([third.disks.vdb]);
  });

  it('pruning one disk of a VM applies the policy to the VM: no record is left naming a removed backup', async () => {
    await vmBackup();
    await vmBackup();
    const last = await vmBackup();
    const r = await vhdvaultAsync('prune', repo, 'web.vda', '--keep-last', '1');
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/remove {2}VM backup web /);
    expect((await vmList()).map((v) => v.id)).toEqual([last.id]);
    expect(await listed('web.vda')).toEqual([last.disks.vda]);
    // The other disk follows at its own prune.
    expect((await listed('web.vdb')).length).toBe(3);
    expect((await vhdvaultAsync('prune', repo, 'web.vdb', '--keep-last', '1')).code).toBe(0);
    expect(await listed('web.vdb')).toEqual([last.disks.vdb]);
  });
});
