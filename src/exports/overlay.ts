/**
 * An instant-restore overlay: a folder outside the repository holding
 * `overlay.json` (which backup it sits on) and `overlay.vhd`, a differencing
 * VHD over that backup. `serve --writable` keeps a client's writes there, so
 * the backup itself never changes; `restore --from-overlay` turns backup plus
 * overlay into a full disk. One process uses an overlay at a time (`lock`).
 */
import { mkdir, readdir, readFile, realpath, rm, stat, writeFile } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, relative, resolve, sep } from 'node:path';
import pLimit from 'p-limit';
import { Errno } from '../nbd/constants.js';
import { ExportError } from '../nbd/errors.js';
import type { NbdExport, ReadPiece } from '../nbd/export.js';
import type { Extent } from '../nbd/transmission.js';
import { isSectorSet } from '../vhd/bitmap.js';
import { SECTOR_SIZE } from '../vhd/constants.js';
import { describeFsError, UsageError, VaultError } from '../util/errors.js';
import type { BlockSource } from '../vhd/source.js';
import { VhdFile } from '../vhd/VhdFile.js';
import { DynamicVhdWriter } from '../vhd/VhdWriter.js';
import { pathExists } from '../util/files.js';
import { fsyncDirectory } from '../util/fsync.js';
import { type BackupExport, pushPiece, segments } from './backupExport.js';
import { openBackupData } from '../store/chain.js';
import { describeOwner, isOwnerGone, lockOwner, parseOwner } from '../util/owner.js';
import { pinBackup } from '../store/overlayPins.js';
import type { BackupMetadata, Repository } from '../store/repository.js';
import type { RestoreLayer } from '../store/restore.js';

const INFO = 'overlay.json';
const DATA = 'overlay.vhd';
const LOCK = 'lock';

/** `overlay.json`: written before the VHD, so a folder with a VHD always says what it sits on. */
export interface OverlayInfo {
  format: 1;
  /** The repository's path when the overlay was made (informative: the repository may move). */
  repository: string;
  disk: string;
  backup: string;
  /** The backup's UUID: the overlay's parent must still be this very backup. */
  uuid: string;
  size: number;
  createdAt: string;
}

/** The folder a `serve --writable` of this backup uses when none is named. */
export const defaultOverlayDir = (disk: string, id: string) => resolve(`${disk}-${id}.overlay`);

export async function readOverlayInfo(dir: string): Promise<OverlayInfo> {
  const s = await stat(dir).catch(() => null);
  if (!s) throw new VaultError(dir, 'no such overlay folder');
  if (!s.isDirectory()) throw new VaultError(dir, 'is not a folder (an overlay is a folder made by vhdvault serve --writable)');
  const path = join(dir, INFO);
  let info: OverlayInfo;
  try {
    info = JSON.parse(await readFile(path, 'utf8')) as OverlayInfo;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new VaultError(path, code === 'ENOENT' ? 'is missing: not an overlay folder made by vhdvault serve --writable' : 'is not valid JSON');
  }
  if (info?.format !== 1 || typeof info.disk !== 'string' || typeof info.backup !== 'string' || typeof info.uuid !== 'string' || !Number.isSafeInteger(info.size)) {
    throw new VaultError(path, 'is not an overlay description this version understands');
  }
  return info;
}

/** An overlay folder in use by this process: its VHD open, its lock held. */
export class Overlay {
  private constructor(
    readonly dir: string,
    readonly info: OverlayInfo,
    readonly vhd: VhdFile,
  ) {}

  /**
   * Open the overlay in `dir` over backup `meta`, creating it when the folder
   * has none (only with `create`). An overlay over another backup, or one a
   * live process uses, is refused; nothing in it is ever replaced.
   */
  static async open(repo: Repository, meta: BackupMetadata, dir: string, options: { create: boolean; writable: boolean }): Promise<Overlay> {
    const at = resolve(dir);
    await refuseInsideRepository(repo, at);
    await prepareFolder(at, options.create);
    await takeLock(at);
    try {
      let info: OverlayInfo;
      if (await pathExists(join(at, INFO))) {
        info = await readOverlayInfo(at);
        if (info.disk !== meta.disk || info.uuid !== meta.uuid) {
          throw new VaultError(join(at, INFO), `belongs to backup ${info.backup} of disk "${info.disk}", not to backup ${meta.id} of "${meta.disk}": serve that backup (--backup ${info.backup}) or pick another folder`);
        }
      } else {
        if (!options.create) throw new VaultError(join(at, INFO), 'is missing: not an overlay folder made by vhdvault serve --writable');
        if (await pathExists(join(at, DATA))) throw new VaultError(join(at, DATA), 'exists without overlay.json: not ours, left alone (pick another folder)');
        info = { format: 1, repository: repo.root, disk: meta.disk, backup: meta.id, uuid: meta.uuid, size: meta.size, createdAt: new Date().toISOString() };
        await writeFile(join(at, INFO), `${JSON.stringify(info, null, 2)}\n`, { flag: 'wx' });
        await fsyncDirectory(at);
      }
      // Registered before any write can land in it, and again on every open (a pin removed by hand comes back).
      await pinBackup(repo, meta, await realpath(at));
      const data = join(at, DATA);
      if (!(await pathExists(data))) await createOverlayVhd(repo, meta, data);
      const vhd = await VhdFile.open(data, { writable: options.writable });
      if (vhd.footer.diskType !== 'differencing' || vhd.header?.parentUuid !== meta.uuid || vhd.size !== meta.size) {
        await vhd.close();
        throw new VaultError(data, `is not a differencing disk over backup ${meta.id}`);
      }
      return new Overlay(at, info, vhd);
    } catch (err) {
      await rm(join(at, LOCK), { force: true });
      throw err;
    }
  }

  async close(): Promise<void> {
    await this.vhd.close();
    await rm(join(this.dir, LOCK), { force: true });
  }
}

/** The real path of `path`, however spelt: its deepest existing ancestor resolved (symlinks included), the rest appended. */
async function realPathOf(path: string): Promise<string> {
  const rest: string[] = [];
  for (let at = path; ; at = dirname(at)) {
    const real = await realpath(at).catch(() => null);
    if (real !== null) return join(real, ...rest.reverse());
    if (dirname(at) === at) return path;
    rest.push(basename(at));
  }
}

async function refuseInsideRepository(repo: Repository, at: string): Promise<void> {
  const root = await realpath(repo.root);
  const rel = relative(root, await realPathOf(at));
  if (rel === '' || (rel !== '..' && !rel.startsWith(`..${sep}`) && !isAbsolute(rel))) throw new UsageError(`${at}: an overlay cannot live inside the repository (${root})`);
}

/** Files an overlay folder may hold besides ours: none (a folder with other things in it is someone's). */
const OURS = new Set([INFO, DATA, LOCK]);

/**
 * The overlay folder: made when missing (its parent must exist), refused when
 * it is not a folder, or holds anything but an overlay's files.
 */
async function prepareFolder(at: string, create: boolean): Promise<void> {
  const s = await stat(at).catch(() => null);
  if (s && !s.isDirectory()) throw new VaultError(at, 'is not a folder');
  if (!s) {
    if (!create) throw new VaultError(at, 'no such overlay folder');
    // Not recursive: a mistyped parent should be an error, not a tree of new folders.
    await mkdir(at).catch((err: unknown) => {
      const code = (err as NodeJS.ErrnoException).code;
      throw new VaultError(at, code === 'ENOENT' ? `its parent folder ${dirname(at)} does not exist` : describeFsError(err));
    });
    return;
  }
  const stray = (await readdir(at)).filter((name) => !OURS.has(name) && !name.startsWith('.'));
  if (stray.length > 0 && !(await pathExists(join(at, INFO)))) {
    throw new VaultError(at, `holds other files (${stray.slice(0, 3).join(', ')}${stray.length > 3 ? ', …' : ''}) and no overlay: name an empty or new folder`);
  }
}

/**
 * The overlay's lock: its owner (pid, host, boot, process start, as a disk
 * lock records it), created exclusively. A lock whose owner is provably gone
 * (dead, an earlier boot, or its pid reused by another process) is taken over.
 */
async function takeLock(dir: string): Promise<void> {
  const path = join(dir, LOCK);
  const me = lockOwner('serve --writable');
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      await writeFile(path, `${JSON.stringify(me)}\n`, { flag: 'wx' });
      return;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw new VaultError(path, describeFsError(err));
    }
    const holder = parseOwner(await readFile(path, 'utf8').catch(() => ''));
    if (holder && !isOwnerGone(holder, me)) throw new VaultError(dir, `overlay is in use by ${describeOwner(holder)}`);
    // Unreadable (not ours) or its owner is gone.
    await rm(path, { force: true });
  }
  throw new VaultError(dir, 'overlay lock keeps changing: is another vhdvault using it?');
}

/** An empty differencing VHD whose parent is the backup's data (by UUID; locators say where it was). */
async function createOverlayVhd(repo: Repository, meta: BackupMetadata, path: string): Promise<void> {
  const parentPath = repo.localPath(repo.dataKey(meta));
  const parent = await openBackupData(repo, meta);
  await parent.close();
  const writer = await DynamicVhdWriter.create(path, {
    size: meta.size,
    blockSize: meta.blockSize,
    parent: { uuid: meta.uuid, timestamp: parent.footer.timestamp, relativePath: relative(resolve(path, '..'), parentPath), absolutePath: parentPath },
  });
  await writer.finish();
}

/**
 * A backup plus its overlay, served writable: reads take each sector from the
 * overlay where it holds it, else from the backup; writes land in the overlay
 * only. Writes run one at a time (a partial sector is read, patched, rewritten).
 */
export class OverlayExport implements NbdExport {
  readonly writable = true;
  private readonly writes = pLimit(1);

  constructor(
    private readonly base: BackupExport,
    private readonly overlay: Overlay,
  ) {}

  get size(): number {
    return this.base.size;
  }

  private get vhd(): VhdFile {
    return this.overlay.vhd;
  }

  async read(offset: number, length: number): Promise<ReadPiece[]> {
    const pieces: ReadPiece[] = [];
    for (const s of segments(offset, length, this.base.blockSize)) {
      const bitmap = await this.vhd.readBitmap(s.block);
      const first = Math.floor(s.inBlock / SECTOR_SIZE);
      const last = Math.ceil((s.inBlock + s.length) / SECTOR_SIZE);
      let set = 0;
      if (bitmap) for (let i = first; i < last; i++) if (isSectorSet(bitmap, i)) set++;
      if (set === 0) {
        for (const p of await this.base.read(s.offset, s.length)) pushPiece(pieces, p);
        continue;
      }
      const mine = await this.vhd.readBlockRange(s.block, s.inBlock, s.length);
      if (set < last - first) {
        const theirs = flatten(await this.base.read(s.offset, s.length), s.length);
        for (let i = first; i < last; i++) {
          if (isSectorSet(bitmap!, i)) continue;
          const from = Math.max(i * SECTOR_SIZE, s.inBlock) - s.inBlock;
          const to = Math.min((i + 1) * SECTOR_SIZE, s.inBlock + s.length) - s.inBlock;
          theirs.copy(mine, from, from, to);
        }
      }
      pieces.push({ offset: s.offset, data: mine });
    }
    return pieces;
  }

  async allocation(offset: number, length: number): Promise<Extent[]> {
    const extents = await this.base.allocation(offset, length);
    // A block the overlay holds is data whatever the backup says.
    const out: Extent[] = [];
    let at = offset;
    for (const e of extents) {
      for (const s of segments(at, e.length, this.base.blockSize)) {
        const flags = this.vhd.isAllocated(s.block) ? 0 : e.flags;
        const prev = out.at(-1);
        if (prev && prev.flags === flags) prev.length += s.length;
        else out.push({ length: s.length, flags });
      }
      at += e.length;
    }
    return out;
  }

  write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    return this.writes(async () => {
      for (const s of segments(offset, data.length, this.base.blockSize)) {
        const first = Math.floor(s.inBlock / SECTOR_SIZE);
        const last = Math.ceil((s.inBlock + s.length) / SECTOR_SIZE);
        const sectorStart = s.block * this.base.blockSize + first * SECTOR_SIZE;
        let buf = data.subarray(s.offset - offset, s.offset - offset + s.length);
        if (s.inBlock % SECTOR_SIZE !== 0 || s.length % SECTOR_SIZE !== 0) {
          // A partial sector: the sectors as they read now, with the new bytes laid over.
          const whole = flatten(await this.read(sectorStart, (last - first) * SECTOR_SIZE), (last - first) * SECTOR_SIZE);
          buf.copy(whole, s.inBlock - first * SECTOR_SIZE);
          buf = whole;
        }
        await this.vhd.writeBlockSectors(s.block, first, buf).catch(toExportError);
      }
      if (fua) await this.vhd.flush().catch(toExportError);
    });
  }

  async writeZeroes(offset: number, length: number, fua: boolean): Promise<void> {
    const zeros = Buffer.alloc(Math.min(length, this.base.blockSize));
    for (const s of segments(offset, length, this.base.blockSize)) await this.write(s.offset, zeros.subarray(0, s.length), false);
    if (fua) await this.flush();
  }

  /** The spec lets a trimmed range keep its data: nothing to do (the overlay never shrinks). */
  async trim(): Promise<void> {}

  async flush(): Promise<void> {
    await this.writes(() => this.vhd.flush().catch(toExportError));
  }
}

function toExportError(err: unknown): never {
  const code = (err as NodeJS.ErrnoException)?.code;
  throw new ExportError(code === 'ENOSPC' ? Errno.ENOSPC : Errno.EIO, (err as Error).message);
}

function flatten(pieces: ReadPiece[], length: number): Buffer {
  const out = Buffer.alloc(length);
  let at = 0;
  const start = pieces[0]?.offset ?? 0;
  for (const p of pieces) {
    at = p.offset - start;
    if ('data' in p) p.data.copy(out, at);
  }
  return out;
}

/**
 * A backup's blocks (already checked against its digests) with the overlay's
 * sectors laid over them: what `restore --from-overlay` writes out.
 */
export function overlaySource(base: BlockSource, overlay: VhdFile): BlockSource {
  return {
    size: base.size,
    blockSize: base.blockSize,
    blockCount: base.blockCount,
    readBlock: async (block) => {
      const below = await base.readBlock(block);
      const stored = await overlay.readBlock(block);
      if (!stored) return below;
      const out = below ? Buffer.from(below) : Buffer.alloc(base.blockSize);
      for (let s = 0; s < base.blockSize / SECTOR_SIZE; s++) {
        if (isSectorSet(stored.bitmap, s)) stored.data.copy(out, s * SECTOR_SIZE, s * SECTOR_SIZE, (s + 1) * SECTOR_SIZE);
      }
      return out;
    },
    close: () => base.close(),
  };
}

/** An overlay folder as a restore's layer (restore --from-overlay): its writes laid over the backup they sit on. */
export function overlayLayer(dir: string): RestoreLayer {
  return {
    path: dir,
    info: () => readOverlayInfo(dir),
    async open(repo, meta) {
      const overlay = await Overlay.open(repo, meta, dir, { create: false, writable: false });
      return { over: (source) => overlaySource(source, overlay.vhd), allocated: (block) => overlay.vhd.isAllocated(block), close: () => overlay.close() };
    },
  };
}
