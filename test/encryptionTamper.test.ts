/**
 * Tampering with an encrypted repository's stored files (docs/design/12-encryption.md §12.4):
 * a flipped byte, a truncation, two files of a kind swapped between backups, a block moved
 * to another index, and a file rolled back to the version a merge replaced. Each is
 * detected where the binding and the sealed metadata say what must be there: verify names
 * it, a restore of the damaged backup fails with one line and no output, prune refuses
 * and changes nothing, and what the damage does not touch still restores exactly.
 * The repositories are made in this process (set-up); what is checked runs the built CLI.
 */
import { createHash, randomBytes } from 'node:crypto';
import { cp, open, readFile, rename, rm, truncate, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import type { CliResult } from './helpers/cli.js';
import { vhdvault, vhdvaultAsync } from './helpers/cli.js';
import { sha256, tempDir } from './helpers/files.js';
import { isCoordination, snapshot } from './helpers/repoFixture.js';
import { backup } from '../src/store/backup.js';
import { Repository } from '../src/store/repository.js';
import { restore } from '../src/store/restore.js';
import { VaultError } from '../src/util/errors.js';

const MiB = 1024 * 1024;
const BLOCK = 2 * MiB;
const work = await tempDir('vhdvault-enc-tamper-');
Object.assign(process.env, { VHDVAULT_TEST_SCRYPT_N: '1024', VHDVAULT_PASSWORD: 'tamper test password', VHDVAULT_CACHE_DIR: join(work, 'cache') });

type Layout = 'dir' | 'objects';

/** vm: F (blocks 0–2), D1 (rewrites 1 and 3), D2 (rewrites 1 and 2); other: one full backup. */
interface Base {
  root: string;
  F: string;
  D1: string;
  D2: string;
  other: string;
  /** SHA-256 of the disk at each backup (by id). */
  content: Map<string, string>;
  /** Objects layout: each backup's block object names (hex HMACs) by block. */
  names: Map<string, string[]>;
}

async function makeBase(layout: Layout): Promise<Base> {
  const root = join(work, `base-${layout}`);
  const repo = await Repository.init(root, { layout, compression: 'none', encryption: 'aes-256-gcm' });
  const disk = join(work, `vm-${layout}.raw`);
  const image = Buffer.concat([randomBytes(3 * BLOCK), Buffer.alloc(BLOCK)]);
  const content = new Map<string, string>();
  const ids: string[] = [];
  for (const rewrite of [[], [1, 3], [1, 2]]) {
    for (const b of rewrite) randomBytes(BLOCK).copy(image, b * BLOCK);
    await writeFile(disk, image);
    const { id } = await backup(repo, 'vm', { source: disk, concurrency: 1 });
    ids.push(id);
    content.set(id, createHash('sha256').update(image).digest('hex'));
  }
  const otherDisk = join(work, `other-${layout}.raw`);
  await writeFile(otherDisk, randomBytes(BLOCK));
  const { id: other } = await backup(repo, 'other', { source: otherDisk, concurrency: 1 });
  content.set(other, await sha256(otherDisk));
  const names = new Map<string, string[]>();
  if (layout === 'objects') {
    for (const id of ids) {
      const map = await repo.storage.get(repo.digestsKey('vm', id));
      names.set(id, Array.from({ length: map.length / 32 }, (_, b) => map.toString('hex', b * 32, b * 32 + 32)));
    }
  }
  const [F, D1, D2] = ids as [string, string, string];
  return { root, F, D1, D2, other, content, names };
}

async function flip(path: string, at: (size: number) => number = (size) => Math.floor(size / 2)): Promise<void> {
  const bytes = await readFile(path);
  const i = at(bytes.length);
  bytes[i] = bytes[i]! ^ 0x01;
  await writeFile(path, bytes);
}

async function cut(path: string): Promise<void> {
  const bytes = await readFile(path);
  await truncate(path, bytes.length - 1);
}

async function swap(a: string, b: string): Promise<void> {
  const t = `${a}.swap`;
  await rename(a, t);
  await rename(b, a);
  await rename(t, b);
}

/** One kind of damage: what it does, the backup it damages, what verify must name, and the backups it leaves whole. */
interface Damage {
  name: string;
  victim: (b: Base) => string;
  apply: (vm: string, b: Base, old: string) => Promise<void>;
  /** What verify's output must contain. */
  named: (b: Base) => RegExp;
  /** Backups of vm the damage leaves whole (other's always is). */
  intact: (b: Base) => string[];
  /** Applied to the repository after `prune --keep-last 1` (a rollback of what its merges rewrote). */
  afterMerge?: true;
  /** The old file describes the backup's content as it is: a restore may go on, and then gives exactly that content. */
  restores?: true;
  /**
   * Why `prune --keep-last 1` may go on: it checks the chains' structure (files present and
   * openable, UUIDs, parents, each backup's digests bound to it), never block data.
   */
  pruneGoesOn?: string;
}

const BLOCK_DATA = 'prune reads no block data: a damaged block is found by verify and by the restores that read it';

const esc = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/** An object's path below disks/vm. */
const object = (hex: string) => join('blocks', hex.slice(0, 2), hex);

function dirDamages(): Damage[] {
  const file = (id: string, name: string) => `${id}.vhd-dir/${name}`;
  const d1 = (b: Base) => b.D1;
  const intactF = (b: Base) => [b.F];
  const names = (...re: Array<(b: Base) => string>) => (b: Base) => new RegExp(re.map((f) => esc(f(b))).join('.*'));
  const damages: Damage[] = [];
  for (const [what, name] of [
    ['metadata', (b: Base) => `${b.D1}.json`],
    ['digests', (b: Base) => `${b.D1}.digests`],
    ['footer', (b: Base) => file(b.D1, 'footer')],
    ['header', (b: Base) => file(b.D1, 'header')],
    ['bat', (b: Base) => file(b.D1, 'bat')],
    ['block file', (b: Base) => file(b.D1, 'blocks/0/1')],
  ] as const) {
    const pruneGoesOn = what === 'block file' ? BLOCK_DATA : undefined;
    damages.push({ name: `${what}: a byte flipped`, victim: d1, apply: (vm, b) => flip(join(vm, name(b))), named: what === 'block file' ? (b) => new RegExp(`${esc(b.D1)}.*(block 1|blocks/0/1)`) : names(name), intact: intactF, pruneGoesOn });
  }
  // Truncation where it meets another check than authentication (the digests' size) or reads another path (a block).
  for (const [what, name] of [
    ['digests', (b: Base) => `${b.D1}.digests`],
    ['block file', (b: Base) => file(b.D1, 'blocks/0/3')],
  ] as const) {
    const pruneGoesOn = what === 'block file' ? BLOCK_DATA : undefined;
    damages.push({ name: `${what}: truncated by a byte`, victim: d1, apply: (vm, b) => cut(join(vm, name(b))), named: what === 'block file' ? (b) => new RegExp(`${esc(b.D1)}.*(block 3|blocks/0/3)`) : names(name), intact: intactF, pruneGoesOn });
  }
  for (const [what, name] of [
    ['metadata', (id: string) => `${id}.json`],
    ['digests', (id: string) => `${id}.digests`],
    ['footer', (id: string) => file(id, 'footer')],
    ['header', (id: string) => file(id, 'header')],
    ['bat', (id: string) => file(id, 'bat')],
    ['block file (same index)', (id: string) => file(id, 'blocks/0/1')],
  ] as const) {
    const pruneGoesOn = what.startsWith('block file') ? BLOCK_DATA : undefined;
    damages.push({ name: `${what}: swapped between D1 and D2`, victim: d1, apply: (vm, b) => swap(join(vm, name(b.D1)), join(vm, name(b.D2))), named: (b) => new RegExp(esc(b.D1)), intact: intactF, pruneGoesOn });
  }
  damages.push({
    name: 'block file: moved over another index of the same backup',
    victim: d1,
    apply: (vm, b) => rename(join(vm, file(b.D1, 'blocks/0/3')), join(vm, file(b.D1, 'blocks/0/1'))),
    named: (b) => new RegExp(`${esc(b.D1)}.*(block 1|blocks/0/1)`),
    intact: intactF,
  });
  damages.push({
    name: 'block file: moved to an index the backup does not store',
    victim: d1,
    apply: (vm, b) => rename(join(vm, file(b.D1, 'blocks/0/3')), join(vm, file(b.D1, 'blocks/0/2'))),
    named: (b) => new RegExp(`${esc(b.D1)}.*(block 3|blocks/0/3)`),
    intact: intactF,
  });
  // After prune --keep-last 1 only D2 is left, in F's directory (its bat and footer rewritten by the merges' identity steps).
  const d2 = (b: Base) => b.D2;
  const none = () => [];
  const rollback = (name: string, from: (b: Base) => string, to: (b: Base) => string, named: (b: Base) => RegExp): Damage => ({
    name: `rollback: ${name}`,
    victim: d2,
    afterMerge: true,
    apply: (vm, b, old) => cp(join(old, from(b)), join(vm, to(b))),
    named,
    intact: none,
  });
  damages.push(rollback("D2's metadata as it was before the merges", (b) => `${b.D2}.json`, (b) => `${b.D2}.json`, (b) => new RegExp(esc(b.D2))));
  damages.push(rollback("the merged bat to F's, before the identity steps rewrote it", (b) => file(b.F, 'bat'), (b) => file(b.D2, 'bat'), (b) => new RegExp(`${esc(b.D2)}.*block 3`)));
  damages.push(rollback("the merged bat to D2's own, before the merge", (b) => file(b.D2, 'bat'), (b) => file(b.D2, 'bat'), (b) => new RegExp(esc(b.D2))));
  damages.push(rollback("the merged footer to F's, before the identity steps rewrote it", (b) => file(b.F, 'footer'), (b) => file(b.D2, 'footer'), (b) => new RegExp(`${esc(b.D2)}.*UUID`)));
  damages.push(rollback("the merged footer to D2's own, before the merge", (b) => file(b.D2, 'footer'), (b) => file(b.D2, 'footer'), (b) => new RegExp(esc(b.D2))));
  damages.push(rollback("block 1 to F's, the version the merges replaced", (b) => file(b.F, 'blocks/0/1'), (b) => file(b.D2, 'blocks/0/1'), (b) => new RegExp(`${esc(b.D2)}.*block 1`)));
  return damages;
}

function objectsDamages(): Damage[] {
  const d1 = (b: Base) => b.D1;
  const intactF = (b: Base) => [b.F];
  const damages: Damage[] = [];
  // D1's objects of blocks 1 and 3 are its own: F and D2 name other objects there.
  const own = (b: Base, block: number) => object(b.names.get(b.D1)![block]!);
  for (const [what, name] of [
    ['metadata', (b: Base) => `${b.D1}.json`],
    ['block map', (b: Base) => `${b.D1}.digests`],
    ['block object', (b: Base) => own(b, 1)],
  ] as const) {
    const pruneGoesOn = what === 'block object' ? BLOCK_DATA : undefined;
    damages.push({ name: `${what}: a byte flipped`, victim: d1, apply: (vm, b) => flip(join(vm, name(b))), named: (b) => new RegExp(esc(name(b))), intact: intactF, pruneGoesOn });
    if (what !== 'metadata') damages.push({ name: `${what}: truncated by a byte`, victim: d1, apply: (vm, b) => cut(join(vm, name(b))), named: (b) => new RegExp(esc(name(b))), intact: intactF, pruneGoesOn });
  }
  damages.push({ name: 'metadata: swapped between D1 and D2', victim: d1, apply: (vm, b) => swap(join(vm, `${b.D1}.json`), join(vm, `${b.D2}.json`)), named: (b) => new RegExp(esc(`${b.D1}.json`)), intact: intactF });
  damages.push({ name: 'block map: swapped between D1 and D2', victim: d1, apply: (vm, b) => swap(join(vm, `${b.D1}.digests`), join(vm, `${b.D2}.digests`)), named: (b) => new RegExp(esc(`${b.D1}.digests`)), intact: intactF });
  damages.push({
    name: "block object: swapped with another backup's",
    victim: d1,
    apply: (vm, b) => swap(join(vm, own(b, 1)), join(vm, object(b.names.get(b.D2)![2]!))),
    named: (b) => new RegExp(esc(own(b, 1))),
    intact: intactF,
    pruneGoesOn: BLOCK_DATA,
  });
  damages.push({
    name: "block object: another block's object put under its name",
    victim: d1,
    apply: (vm, b) => cp(join(vm, own(b, 3)), join(vm, own(b, 1))),
    named: (b) => new RegExp(esc(own(b, 1))),
    intact: intactF,
    pruneGoesOn: BLOCK_DATA,
  });
  damages.push({
    name: "rollback: D2's metadata as it was before the merges",
    victim: (b) => b.D2,
    afterMerge: true,
    apply: (vm, b, old) => cp(join(old, `${b.D2}.json`), join(vm, `${b.D2}.json`)),
    named: (b) => new RegExp(esc(b.D2)),
    intact: () => [],
    // D2's block map is the whole disk: the old metadata (a delta of D1, gone) still describes its content.
    restores: true,
  });
  return damages;
}

type Expect = typeof expect;

/** A one-line failure, no stack. */
function oneLine(e: Expect, r: CliResult, what: string): void {
  const context = `${what}: exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`;
  e(r.code, context).toBe(1);
  e(r.stderr, context).not.toContain('    at ');
  e(r.stderr.trimEnd().split('\n'), context).toHaveLength(1);
}

/** Restore backup `id` of `disk` in this process: its content's SHA-256, or null when it is refused (a VaultError). */
async function restored(root: string, disk: string, id: string, to: string): Promise<string | null> {
  try {
    await restore(await Repository.open(root), disk, to, { backup: id, format: 'raw' });
  } catch (err) {
    if (err instanceof VaultError) return null;
    throw err;
  }
  const digest = await sha256(to);
  await rm(to);
  return digest;
}

for (const layout of ['dir', 'objects'] as const) {
  // Concurrent: each case is a few CLI runs on its own copy, mostly waiting for them.
  describe.concurrent(`${layout} layout`, () => {
    let base: Base;
    let merged: string;
    beforeAll(async () => {
      base = await makeBase(layout);
      merged = join(work, `merged-${layout}`);
      await cp(base.root, merged, { recursive: true });
      const pruned = vhdvault('prune', merged, '--keep-last', '1');
      expect(pruned.code, pruned.stderr).toBe(0);
      expect(existsSync(join(merged, 'disks', 'vm', `${base.D2}.json`))).toBe(true);
      expect(existsSync(join(merged, 'disks', 'vm', `${base.F}.json`))).toBe(false);
    });

    let n = 0;
    for (const damage of layout === 'dir' ? dirDamages() : objectsDamages()) {
      it(damage.name, async ({ expect: e }) => {
        const tag = `${layout}-${n++}`;
        const root = join(work, tag);
        await cp(damage.afterMerge ? merged : base.root, root, { recursive: true });
        const vm = join(root, 'disks', 'vm');
        await damage.apply(vm, base, join(base.root, 'disks', 'vm'));
        const victim = damage.victim(base);
        const before = await snapshot(root, isCoordination);
        const out = join(work, `${tag}-restored.raw`);

        const [verify, restoredVictim] = await Promise.all([vhdvaultAsync('verify', root), vhdvaultAsync('restore', root, 'vm', out, '--backup', victim)]);
        e(verify.code, `verify: ${verify.stdout}${verify.stderr}`).toBe(1);
        e(verify.stderr, 'verify').not.toContain('    at ');
        e(verify.stdout + verify.stderr, 'what verify names').toMatch(damage.named(base));
        if (damage.restores && restoredVictim.code === 0) {
          // The old file describes the same content: a restore that goes on gives exactly that.
          e(await sha256(out), `restore of ${victim}`).toBe(base.content.get(victim));
          await rm(out);
        } else {
          oneLine(e, restoredVictim, `restore of ${victim}`);
          e(existsSync(out), 'a failed restore leaves no output').toBe(false);
        }
        e(await snapshot(root, isCoordination), 'verify and restore change nothing').toEqual(before);

        // What the damage leaves whole restores exactly (checked before prune changes anything).
        for (const id of [...damage.intact(base), base.other]) {
          e(await restored(root, id === base.other ? 'other' : 'vm', id, join(work, `${tag}-${id}.raw`)), `backup ${id} restores exactly`).toBe(base.content.get(id));
        }

        const pruned = await vhdvaultAsync('prune', root, '--keep-last', '1');
        if (damage.afterMerge && pruned.code === 0) {
          // One backup of vm is left: nothing to merge, nothing changed.
          e(pruned.stdout).toMatch(/merged: 0/);
          e(await snapshot(root, isCoordination), 'a prune with nothing to do changes nothing').toEqual(before);
        } else if (damage.pruneGoesOn && pruned.code === 0) {
          // Prune checks structure, not what it does not read (see pruneGoesOn): then nothing it kept may be silently wrong.
          const kept = await (await Repository.open(root)).backups('vm');
          let failed = 0;
          for (const meta of kept) {
            const got = await restored(root, 'vm', meta.id, join(work, `${tag}-kept-${meta.id}.raw`));
            if (got === null) failed++;
            else e(got, `kept backup ${meta.id} restores exactly or not at all`).toBe(base.content.get(meta.id));
          }
          if (failed > 0) e((await vhdvaultAsync('verify', root)).code, 'verify after prune reports what cannot be restored').toBe(1);
        } else {
          oneLine(e, pruned, 'prune --keep-last 1');
          e(pruned.stderr).toMatch(/prune refused, nothing changed/);
          e(await snapshot(root, isCoordination), 'a refused prune changes nothing').toEqual(before);
        }
        await rm(root, { recursive: true, force: true });
      });
    }

    if (layout === 'dir') {
      // Not detected, and documented as such: a locator is bound to (disk, its name) like every small file of a
      // VHD directory, so one of another backup of the disk opens; vhdvault finds parents by metadata, never by
      // locator, so what it reads is unchanged. (A tool that followed the stored locators would be misled.)
      it('parent locators swapped between D1 and D2: undetected, and nothing vhdvault reads changes', async ({ expect: e }) => {
        const root = join(work, `${layout}-locators`);
        await cp(base.root, root, { recursive: true });
        const vm = join(root, 'disks', 'vm');
        await swap(join(vm, `${base.D1}.vhd-dir`, 'parentLocatorEntry0'), join(vm, `${base.D2}.vhd-dir`, 'parentLocatorEntry0'));
        const verify = await vhdvaultAsync('verify', root);
        e(verify.code, verify.stderr).toBe(0);
        for (const id of [base.D1, base.D2]) e(await restored(root, 'vm', id, join(work, `locators-${id}.raw`)), `backup ${id}`).toBe(base.content.get(id));
        await rm(root, { recursive: true, force: true });
      });
    }
  });
}
