import { realpath, stat } from 'node:fs/promises';
import { dirname, basename, isAbsolute, resolve } from 'node:path';
import { isSectorSet } from './bitmap.js';
import { SECTOR_SIZE } from './constants.js';
import { isAliasName, resolveAlias } from './alias.js';
import type { VhdDisk } from './disk.js';
import { VaultError } from '../util/errors.js';
import { decodeLocatorPath, PLATFORM_W2KU, PLATFORM_W2RU } from './parentLocator.js';
import type { BlockSource } from './blockSource.js';
import { openDisk } from './openDisk.js';

/** Chains deeper than this are refused as hostile rather than walked. */
const MAX_CHAIN_DEPTH = 4096;

/**
 * A disk and its ancestors, top first. Reading a block takes, sector by
 * sector, the topmost member that holds it: a differencing member holds the
 * sectors whose bitmap bit is 1; a dynamic or fixed member holds all of its
 * allocated blocks (qemu likewise ignores their bitmaps).
 */
export class VhdChain implements BlockSource {
  private constructor(
    readonly members: VhdDisk[],
    /** For each member, the alias file (Xen Orchestra's `*.alias.vhd`) it was reached through, or null. */
    readonly aliases: ReadonlyArray<string | null> = members.map(() => null),
  ) {}

  static async open(path: string): Promise<VhdChain> {
    const members: VhdDisk[] = [];
    const aliases: Array<string | null> = [];
    try {
      const seen = new Set<string>();
      let disk: VhdDisk = await openDisk(path);
      members.push(disk);
      aliases.push(disk.path !== path ? path : null);
      seen.add(await realpath(disk.path));
      while (disk.footer.diskType === 'differencing') {
        if (members.length >= MAX_CHAIN_DEPTH) throw new VaultError(path, `parent chain is deeper than ${MAX_CHAIN_DEPTH} disks`);
        const parent = await openParent(disk, aliases[aliases.length - 1]!, seen);
        members.push(parent.disk);
        aliases.push(parent.alias);
        disk = parent.disk;
      }
      return new VhdChain(members, aliases);
    } catch (err) {
      await Promise.all(members.map((m) => m.close()));
      throw err;
    }
  }

  /**
   * A chain whose members the caller found (a repository resolves parents from
   * its own metadata, never from locators): each link is checked as open() checks
   * the parents it finds. Takes ownership of the members (closed on failure).
   */
  static async fromMembers(members: VhdDisk[]): Promise<VhdChain> {
    try {
      for (let i = 0; i < members.length; i++) {
        const disk = members[i]!;
        const parent = members[i + 1];
        const differencing = disk.footer.diskType === 'differencing';
        if (differencing && !parent) throw new VaultError(disk.path, 'is a differencing disk but its chain names no parent');
        if (!differencing && parent) throw new VaultError(disk.path, `is a ${disk.footer.diskType} disk but its chain names a parent (${parent.path})`);
        if (parent) checkParent(disk, parent);
      }
      return new VhdChain(members);
    } catch (err) {
      await Promise.all(members.map((m) => m.close()));
      throw err;
    }
  }

  get top(): VhdDisk {
    return this.members[0]!;
  }

  get size(): number {
    return this.top.size;
  }

  get blockSize(): number {
    return this.top.blockSize;
  }

  get blockCount(): number {
    return this.top.blockCount;
  }

  /** The block's bytes as the chain presents them, or null when no member stores any of it. */
  async readBlock(block: number): Promise<Buffer | null> {
    const sectors = this.blockSize / SECTOR_SIZE;
    let out: Buffer | null = null;
    // Sectors of `out` still to be taken from a lower member.
    let missing: Uint8Array | null = null;
    let missingCount = 0;
    for (const member of this.members) {
      if (!member.isAllocated(block)) continue;
      const stored = await member.readBlock(block);
      if (stored === null) continue;
      const partial = member.footer.diskType === 'differencing';
      if (out === null) {
        out = stored.data;
        if (!partial) return out;
        missing = new Uint8Array(sectors);
        for (let s = 0; s < sectors; s++) {
          if (!isSectorSet(stored.bitmap, s)) {
            missing[s] = 1;
            missingCount++;
          }
        }
        if (missingCount === 0) return out;
        continue;
      }
      for (let s = 0; s < sectors; s++) {
        if (missing![s] && (!partial || isSectorSet(stored.bitmap, s))) {
          stored.data.copy(out, s * SECTOR_SIZE, s * SECTOR_SIZE, (s + 1) * SECTOR_SIZE);
          missing![s] = 0;
          missingCount--;
        }
      }
      if (missingCount === 0) return out;
    }
    if (out === null) return null;
    for (let s = 0; s < sectors; s++) if (missing![s]) out.fill(0, s * SECTOR_SIZE, (s + 1) * SECTOR_SIZE);
    return out;
  }

  /** Bytes [offset, offset + length) of the virtual disk. */
  async read(offset: number, length: number): Promise<Buffer> {
    if (offset < 0 || offset + length > this.size) throw new RangeError('read outside the disk');
    const out = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const at = offset + done;
      const block = Math.floor(at / this.blockSize);
      const inBlock = at - block * this.blockSize;
      const n = Math.min(this.blockSize - inBlock, length - done);
      const data = await this.readBlock(block);
      if (data) data.copy(out, done, inBlock, inBlock + n);
      done += n;
    }
    return out;
  }

  async close(): Promise<void> {
    await Promise.all(this.members.map((m) => m.close()));
  }
}

/**
 * Where a differencing disk's parent may be, in the order we try them. A child
 * reached through an alias may name its parent relative to the alias's folder
 * (Xen Orchestra does): those candidates come after all the others.
 */
async function parentCandidates(child: VhdDisk, childAlias: string | null): Promise<string[]> {
  const header = child.header!;
  const here = dirname(child.path);
  const candidates: string[] = [];
  const relativePaths: string[] = [];
  const fromChild = (p: string) => {
    if (!isAbsolute(p)) relativePaths.push(p);
    candidates.push(isAbsolute(p) ? p : resolve(here, p));
  };
  const ordered = header.parentLocators
    .map((loc, index) => ({ code: loc.platformCode, index }))
    .filter(({ code }) => code === PLATFORM_W2RU || code === PLATFORM_W2KU)
    .sort((a, b) => rank(a.code) - rank(b.code));
  for (const { index } of ordered) {
    const data = await child.readLocatorData(index);
    if (data === null) continue;
    const p = decodeLocatorPath(data);
    if (p !== '' && !/^[A-Za-z]:/.test(p)) fromChild(p);
  }
  if (header.parentName !== '') {
    const name = header.parentName.replace(/\\/g, '/');
    if (!/^[A-Za-z]:/.test(name)) fromChild(name);
    candidates.push(resolve(here, basename(name)));
    relativePaths.push(basename(name));
  }
  if (childAlias) for (const p of relativePaths) candidates.push(resolve(dirname(childAlias), p));
  return [...new Set(candidates)];
}

function rank(code: string): number {
  return code === PLATFORM_W2RU ? 0 : code === PLATFORM_W2KU ? 1 : 2;
}

/**
 * The first parent candidate that opens and is the parent the child expects
 * (UUID, block size, size). A candidate that exists but fails is passed over
 * for the next one (a stale relative path, say, with the right parent at the
 * absolute one); when none fits, the first failure is the error.
 */
async function openParent(child: VhdDisk, childAlias: string | null, seen: Set<string>): Promise<{ disk: VhdDisk; alias: string | null }> {
  const candidates = await parentCandidates(child, childAlias);
  let firstProblem: unknown = null;
  for (const candidate of candidates) {
    const s = await stat(candidate).catch(() => null);
    if (!s?.isFile() && !s?.isDirectory()) continue;
    // A candidate may be an alias (how XO children name their parent): follow it.
    let c = candidate;
    if (isAliasName(candidate)) {
      try {
        c = await resolveAlias(candidate);
      } catch (err) {
        if (!(err instanceof VaultError)) throw err;
        firstProblem ??= new VaultError(err.file, `${err.problem} (parent of ${child.path})`);
        continue;
      }
    }
    const real = await realpath(c);
    if (seen.has(real)) {
      firstProblem ??= new VaultError(child.path, `parent chain loops: parent ${c} is already in the chain`);
      continue;
    }
    let parent: VhdDisk;
    try {
      parent = await openDisk(c, { fixedBlockSize: child.blockSize });
    } catch (err) {
      if (!(err instanceof VaultError)) throw err;
      // Name the child too: the user is looking at it, not at its parent.
      firstProblem ??= new VaultError(err.file, `${err.problem} (parent of ${child.path})`);
      continue;
    }
    try {
      checkParent(child, parent);
    } catch (err) {
      await parent.close();
      firstProblem ??= err;
      continue;
    }
    seen.add(real);
    return { disk: parent, alias: c !== candidate ? candidate : null };
  }
  if (firstProblem) throw firstProblem;
  const tried = candidates.length > 0 ? `tried ${candidates.join(', ')}` : 'it records no parent name or locator';
  throw new VaultError(child.path, `parent disk not found (${tried})`);
}

/** Does `parent` fit as `child`'s parent (UUID, block size, size)? Throws naming the child. */
export function checkParent(child: VhdDisk, parent: VhdDisk): void {
  const expected = child.header!.parentUuid;
  if (parent.footer.uuid !== expected) {
    throw new VaultError(child.path, `parent ${parent.path} has UUID ${parent.footer.uuid}, this disk expects ${expected}`);
  }
  if (parent.header !== null && parent.blockSize !== child.blockSize) {
    throw new VaultError(child.path, `block size ${child.blockSize} differs from parent ${parent.path}'s ${parent.blockSize}`);
  }
  if (child.size > parent.size) {
    throw new VaultError(child.path, `disk of ${child.size} bytes is larger than its parent ${parent.path} (${parent.size} bytes)`);
  }
}
