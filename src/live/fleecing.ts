/**
 * Fleecing mode's copy target: a sparse image of the disk's size in a folder
 * on fast local storage, so that a guest write waits only for a local copy.
 * It is deleted after every backup; FleecingWatch samples how much it holds
 * and cuts the backup short past --fleecing-max.
 */
import { open, readdir, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { VaultError } from '../util/errors.js';
import { blockdevAdd, blockdevDel } from '../qmp/commands.js';
import type { CopyTarget, Undo, ViewNames } from './frozenView.js';
import type { QmpClient } from '../qmp/QmpClient.js';

const IMAGE_SUFFIX = '.fleece.raw';

export class FleecingImage implements CopyTarget {
  readonly path: string;

  constructor(
    readonly dir: string,
    names: ViewNames,
    backupId: string,
    private readonly size: number,
  ) {
    this.path = join(dir, `${names.exportOf(backupId)}${IMAGE_SUFFIX}`);
  }

  async add(qmp: QmpClient, name: string): Promise<Undo> {
    const fh = await open(this.path, 'wx');
    const remove = () => rm(this.path, { force: true });
    try {
      await fh.truncate(this.size); // sparse: only copied data takes space
    } catch (err) {
      await remove();
      throw err;
    } finally {
      await fh.close();
    }
    try {
      // unmap: what the frozen view discards (discard after read) is punched out of the image.
      await blockdevAdd(qmp, { driver: 'file', 'node-name': name, filename: this.path, discard: 'unmap' });
    } catch (err) {
      await remove();
      throw err;
    }
    return async () => {
      await blockdevDel(qmp, name);
      await remove();
    };
  }
}

/** Delete the fleecing images of `names`' guest node that killed runs left in `dir` (never one a running backup uses). */
export async function removeLeftoverImages(dir: string, names: ViewNames): Promise<void> {
  for (const name of await readdir(dir)) {
    if (name.endsWith(IMAGE_SUFFIX) && names.isLeftover(name)) await rm(join(dir, name), { force: true });
  }
}

/** Allocated bytes of the fleecing image, sampled about every 100 ms; the peak, and a trip past `max`. */
export class FleecingWatch {
  peak = 0;
  /** What the image held at the last sample. */
  last = 0;
  /** Bytes discards took out of the image (measured around each): with `last`, what was copied into it. */
  freed = 0;
  /** Set when the image grew past `max`: why the backup was cut short. */
  overflow: VaultError | null = null;
  private readonly timer: NodeJS.Timeout;
  private sampling: Promise<void> = Promise.resolve();

  constructor(
    private readonly image: string,
    private readonly max: number | null,
    private readonly onOverflow: () => void,
  ) {
    this.timer = setInterval(() => {
      this.sampling = this.sampling.then(() => this.sample());
    }, 100);
  }

  /** Stop sampling, after a last sample (call it before the image is deleted). */
  async stop(): Promise<void> {
    clearInterval(this.timer);
    await this.sampling;
    await this.sample();
  }

  /** Run a discard of the frozen view, counting what it took out of the image (less what copies added meanwhile). */
  async measureFreed(discard: () => Promise<void>): Promise<void> {
    const before = await this.allocated();
    await discard();
    this.freed += Math.max(0, before - (await this.allocated()));
  }

  private allocated(): Promise<number> {
    return stat(this.image).then(
      (s) => s.blocks * 512,
      () => 0, // gone: the view is torn down
    );
  }

  private async sample(): Promise<void> {
    const used = await this.allocated();
    this.last = used;
    this.peak = Math.max(this.peak, used);
    if (this.max !== null && used > this.max && !this.overflow) {
      this.overflow = new VaultError(this.image, `the fleecing image grew to ${used} bytes, past --fleecing-max ${this.max}: backup aborted (the guest's writes went on unharmed)`);
      this.onOverflow();
    }
  }
}
