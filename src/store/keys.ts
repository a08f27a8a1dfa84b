import { key } from '../storage/Storage.js';
import { checkBackupId, checkDiskName, isBackupId } from './names.js';

/**
 * Where everything of a repository is, as storage keys (docs/design/04-repository.md §4.2): one
 * place for the names, shared by the repository and its layout drivers.
 * A layout names only its data object (`<id>.vhd-dir`, `<id>.vhd` or, in the
 * objects layout, the block map `<id>.digests`) and what lies inside it.
 */
export const CONFIG_FILE = 'vhdvault.json';
const DISKS_DIR = 'disks';

export const disksKey = (): string => DISKS_DIR;

export const diskKey = (disk: string): string => key(DISKS_DIR, checkDiskName(disk));

/** A name in a disk's folder. */
export const inDisk = (disk: string, name: string): string => key(diskKey(disk), name);

export const metadataKey = (disk: string, id: string): string => inDisk(disk, `${checkBackupId(id)}.json`);

/** One digest per block of the disk (the objects layout's block map has this name too). */
export const digestsKey = (disk: string, id: string): string => inDisk(disk, `${checkBackupId(id)}.digests`);

/** `.<name>.tmp`: where something is written before its commit; a name cleanup may remove. */
export const stagedName = (name: string): string => `.${name}.tmp`;

export const stagedDigestsKey = (disk: string, id: string): string => inDisk(disk, stagedName(`${checkBackupId(id)}.digests`));

/** The metadata of a backup being committed: while it exists, its staged files are not garbage. */
export const pendingMetadataKey = (disk: string, id: string): string => inDisk(disk, stagedName(`${checkBackupId(id)}.json`));

/** A deletion in progress: the backup's metadata, moved aside (§4.9). */
export const deletingKey = (disk: string, id: string): string => inDisk(disk, `.${checkBackupId(id)}.deleting.tmp`);

/** Direct mode's copy-before-write target (live/copyStore.ts): never committed, garbage once its backup ends. */
export const copiesKey = (disk: string, id: string): string => inDisk(disk, stagedName(`${checkBackupId(id)}.copies`));

/** A retention merge in progress (store/merge.ts). */
export const mergeJournalKey = (disk: string): string => inDisk(disk, 'merge.json');

/** The backup id of a deletion intent (`.<id>.deleting.tmp`), else null. */
export function deletingId(name: string): string | null {
  const m = /^\.(.+)\.deleting\.tmp$/.exec(name);
  return m && isBackupId(m[1]!) ? m[1]! : null;
}

/** The backup id of a pending metadata name (`.<id>.json.tmp`), else null. */
export function pendingId(name: string): string | null {
  const m = /^\.(.+)\.json\.tmp$/.exec(name);
  return m && isBackupId(m[1]!) ? m[1]! : null;
}

/** Objects layout: the folder of a disk's block objects (layouts/blockObjects.ts). */
export const blocksKey = (disk: string): string => inDisk(disk, 'blocks');
