import { mkdtemp, open, readFile, rm, stat, truncate, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { vhdvault } from './cli.js';
import type { Cipher } from '../../src/crypto/aead.js';
import { sha256 } from './files.js';
import { expectEncrypted } from './store.js';
import { Repository } from '../../src/store/repository.js';
import { copyFixture, type Fixture, isCoordination, makeFixture, snapshot } from './repoFixture.js';

/**
 * One fault at a time in every kind of file a repository holds, in both
 * layouts; then every command runs. None may delete data of a committed
 * backup or crash, each must name the problem, and every backup the fault does
 * not touch must still restore exactly.
 */

/** Flip bytes at `offset` (negative: from the end). */
async function flip(path: string, offset: number, length = 8): Promise<void> {
  const fh = await open(path, 'r+');
  try {
    const at = offset >= 0 ? offset : (await fh.stat()).size + offset;
    const buf = Buffer.alloc(length);
    await fh.read(buf, 0, length, at);
    for (let i = 0; i < length; i++) buf[i]! ^= 0xa5;
    await fh.write(buf, 0, length, at);
  } finally {
    await fh.close();
  }
}

interface Fault {
  name: string;
  apply(f: Fixture, victim: string): Promise<void>;
  /** What verify's report must contain (a name, or the problem). */
  named: (victim: string) => RegExp;
  /** Harmless by design (a stale lock): every command succeeds. */
  benign?: boolean;
  /** Every command refuses (a damaged journal). */
  blocksAll?: boolean;
}

const disk = (f: Fixture) => join(f.repo, 'disks', 'vm');

/** Store `text` at `key` sealed as the repository seals it (damaged content, not damaged bytes). */
async function putSealed(f: Fixture, key: string, text: string): Promise<void> {
  await (await Repository.open(f.repo)).storage.put(key, text);
}

export function faults(layout: 'dir' | 'vhd', sealed = false): Fault[] {
  // In an encrypted repository, damage within a file's bytes is an authentication failure of that file;
  // a damaged content sealed as vhdvault would seal it must read as it does unencrypted.
  const authFailed = (file: string) => new RegExp(`${file.replaceAll('.', '\\.')}: authentication failed: damaged, or not where it belongs`);
  const data = (f: Fixture, id: string) => join(disk(f), `${id}.${layout === 'dir' ? 'vhd-dir' : 'vhd'}`);
  const common: Fault[] = [
    { name: 'metadata deleted', apply: (f, v) => rm(join(disk(f), `${v}.json`)), named: (v) => new RegExp(`${v}.json is missing`) },
    {
      name: 'metadata corrupted',
      apply: (f, v) => (sealed ? putSealed(f, `disks/vm/${v}.json`, '{"format":1,') : writeFile(join(disk(f), `${v}.json`), '{"format":1,')),
      named: (v) => new RegExp(`${v}.json: is not valid JSON`),
    },
    ...(sealed ? [{ name: 'metadata bytes flipped', apply: (f: Fixture, v: string) => flip(join(disk(f), `${v}.json`), 40), named: (v: string) => authFailed(`${v}.json`) }] : []),
    { name: 'digests deleted', apply: (f, v) => rm(join(disk(f), `${v}.digests`)), named: (v) => new RegExp(`${v}.digests is missing`) },
    {
      name: 'digests truncated',
      apply: (f, v) => truncate(join(disk(f), `${v}.digests`), 40),
      named: (v) => (sealed ? authFailed(`${v}.digests`) : new RegExp(`${v}.digests: digests file has 40 bytes`)),
    },
    {
      name: 'stale lock with garbage in it',
      apply: async (f) => {
        await writeFile(join(disk(f), 'lock'), 'garbage');
        await utimes(join(disk(f), 'lock'), new Date(0), new Date(0));
      },
      named: () => /^ok:/,
      benign: true,
    },
    {
      name: 'merge journal damaged',
      apply: (f) => (sealed ? putSealed(f, 'disks/vm/merge.json', '{"format":1,"parent":') : writeFile(join(disk(f), 'merge.json'), '{"format":1,"parent":')),
      named: () => /merge\.json: the journal of an interrupted retention merge is damaged/,
      blocksAll: true,
    },
    ...(sealed
      ? [
          {
            name: 'merge journal bytes flipped',
            apply: async (f: Fixture) => {
              await putSealed(f, 'disks/vm/merge.json', '{"format":1,"parent":');
              await flip(join(disk(f), 'merge.json'), 20, 4);
            },
            named: () => authFailed('merge.json'),
            blocksAll: true,
          },
        ]
      : []),
  ];
  if (layout === 'dir') {
    return [
      ...common,
      { name: 'footer corrupted', apply: (f, v) => flip(join(data(f, v), 'footer'), 0), named: (v) => new RegExp(`${v}.vhd-dir/footer`) },
      { name: 'header corrupted', apply: (f, v) => flip(join(data(f, v), 'header'), 40), named: (v) => new RegExp(`${v}.vhd-dir/header`) },
      { name: 'bat deleted', apply: (f, v) => rm(join(data(f, v), 'bat')), named: (v) => new RegExp(`${v}.vhd-dir/bat`) },
      { name: 'block deleted', apply: (f, v) => rm(join(data(f, v), 'blocks', '0', '0')), named: (v) => new RegExp(`${v}.vhd-dir.*blocks/0/0`) },
      {
        name: 'block corrupted',
        apply: (f, v) => flip(join(data(f, v), 'blocks', '0', '0'), 4096),
        named: (v) => (sealed ? new RegExp(`backup ${v} block 0: .*${v}\\.vhd-dir: block 0 \\(blocks/0/0\\) authentication failed`) : new RegExp(`backup ${v} block 0: stored data does not match its digest`)),
      },
    ];
  }
  return [
    ...common,
    { name: 'footer corrupted', apply: (f, v) => flip(data(f, v), -512 + 64), named: (v) => new RegExp(`${v}.vhd`) },
    { name: 'header corrupted', apply: (f, v) => flip(data(f, v), 512 + 40), named: (v) => new RegExp(`${v}.vhd`) },
    { name: 'bat corrupted', apply: (f, v) => flip(data(f, v), 1536, 4), named: (v) => new RegExp(`${v}.vhd`) },
    {
      name: 'block corrupted',
      // The delta stores one block: its data starts after the headers, the bat and the block's bitmap.
      apply: async (f, v) => flip(data(f, v), (await stat(data(f, v))).size - 512 - 4096),
      named: (v) => new RegExp(`backup ${v} block 0: stored data does not match its digest`),
    },
  ];
}

const noStack = (s: string) => expect(s, s).not.toMatch(/\n\s+at |node:internal/);

/** The suite for one layout (a file per layout, so that vitest's two workers share them). */
export function faultSuite(layout: 'dir' | 'vhd', encryption?: Cipher): void {
  describe(`one fault at a time (layout ${layout}${encryption ? `, encrypted with ${encryption}` : ''})`, () => {
    let base: Fixture; // F ← D1 ← D2; the fault hits D1
    let dir: string;
    beforeAll(async () => {
      dir = await mkdtemp(join(tmpdir(), `vhdvault-faults-${layout}-`));
      base = await makeFixture(join(dir, `base-${layout}`), layout, 3, undefined, encryption);
      if (encryption) await expectEncrypted(base.repo);
    });
    afterAll(() => rm(dir, { recursive: true, force: true }));
    let n = 0;
    for (const fault of faults(layout, encryption !== undefined)) {
      it(fault.name, async () => {
        const f = await copyFixture(base, join(dir, `${layout}-${n++}`));
        const [full, victim, top] = f.ids as [string, string, string];
        await fault.apply(f, victim);
        const faulted = await snapshot(f.repo, (rel) => isCoordination(rel) || rel.endsWith('merge.json'));
        const unchanged = async (after: string) => {
          const now = await snapshot(f.repo, isCoordination);
          for (const [file, sig] of Object.entries(faulted)) expect(now[file], `${file} after ${after}`).toBe(sig);
        };

        const list = vhdvault('list', f.repo);
        noStack(list.stderr);
        expect(list.code).toBe(fault.blocksAll ? 1 : 0);
        await unchanged('list');

        const verify = vhdvault('verify', f.repo);
        noStack(verify.stderr);
        expect(verify.code, verify.stderr).toBe(fault.benign ? 0 : 1);
        expect(fault.benign ? verify.stdout : verify.stderr).toMatch(fault.named(victim));
        await unchanged('verify');

        // The full backup does not depend on D1: it restores exactly whatever happened to D1.
        for (const id of [full, victim, top]) {
          const out = join(dir, `${layout}-${n}-${id}.raw`);
          const r = vhdvault('restore', f.repo, 'vm', out, '--backup', id);
          noStack(r.stderr);
          if (r.code === 0) expect(await sha256(out), `restore of ${id} exited 0`).toBe(f.content.get(id));
          else {
            expect(r.code).toBe(1);
            expect(r.stderr.trim().split('\n'), r.stderr).toHaveLength(1);
            expect(id === full && !fault.blocksAll, `the full backup must restore: ${r.stderr}`).toBe(false);
          }
          await rm(out, { force: true });
        }
        await unchanged('restore');

        const backup = vhdvault('backup', f.repo, 'vm', '--source', `${base.repo}.raw`);
        noStack(backup.stderr);
        expect(backup.code, backup.stderr).toBe(fault.blocksAll ? 1 : 0);
        await unchanged('backup');

        const prune = vhdvault('prune', f.repo, '--keep-last', '1');
        noStack(prune.stderr);
        if (prune.code !== 0) {
          expect(prune.code).toBe(1);
          expect(prune.stderr.trim().split('\n').at(-1)).toMatch(/prune refused, nothing changed|merge\.json/);
          await unchanged('prune');
        } else {
          // Only a fault that leaves every chain's structure sound lets prune go on.
          expect(['stale lock with garbage in it', 'block corrupted']).toContain(fault.name);
        }
        // A damaged file is never "repaired" by deleting it: the victim's files are where the fault left them, or merged.
        if (fault.name.startsWith('metadata')) expect((await readFile(join(disk(f), `${victim}.digests`))).length).toBeGreaterThan(0);
      });
    }
  });
}
