import { randomBytes } from 'node:crypto';
import { type Cipher, open, OVERHEAD, seal } from '../crypto/aead.js';
import { type MasterKey, openKeyring } from '../crypto/keyring.js';
import { type PasswordSources, readPassword } from '../crypto/password.js';
import { type BindingOf, SealedStorage } from '../crypto/SealedStorage.js';
import type { Storage } from '../storage/Storage.js';
import type { ChunkSeal } from '../vhd/chunkSeal.js';
import type { EncryptionConfig } from './metadata.js';
import { blockFile } from '../vhd/VhdDirectory.js';

/**
 * What an encrypted repository binds each object to, and how a repository's
 * storage is unlocked (docs/design/12-encryption.md §12.4). The binding names
 * where an object *belongs* — never the temporary name it is written under, nor,
 * for a dir-layout block, the backup that holds it — so commits and merges stay
 * renames and no block is ever sealed twice.
 */

/** What a worker thread needs to seal and digest as its repository does (structured-cloned: buffers arrive as Uint8Array). */
export interface Sealing {
  cipher: Cipher;
  dataKey: Uint8Array;
  macKey: Uint8Array;
  repositoryId: string;
}

export const newRepositoryId = (): string => randomBytes(8).toString('hex');

/** Top-level names that stay plain: the configuration, the key files, and coordination files that say nothing of a disk. */
const PLAIN_TOP = new Set(['vhdvault.json', 'keys', 'reserve', 'access']);

/** A folder holding a VHD directory's files: committed, staged, set aside by a merge, or a merge's replaced blocks. */
const isDirectoryFolder = (name: string) => name.includes('.vhd-dir') || /^\..+\.replaced\.tmp$/.test(name);

/** What a file of a dir-layout VHD directory of `disk` is bound to: a block file to its index, any other file to its name. */
function directoryBinding(disk: string, name: string): string {
  const m = /^blocks\/(\d+)\/(\d+)$/.exec(name);
  return m ? `dir-block\0${disk}\0${Number(m[1]) * 1000 + Number(m[2])}` : `dir-file\0${disk}\0${name}`;
}

/** A temporary name's final one: `.<x>.deleting.tmp` was `<x>.json`, `.<x>.tmp` becomes `<x>`. */
function finalName(name: string): string {
  const deleting = /^\.(.+)\.deleting\.tmp$/.exec(name);
  if (deleting) return `${deleting[1]}.json`;
  const staged = /^\.(.+)\.tmp$/.exec(name);
  return staged ? staged[1]! : name;
}

/** The binding of every object of the repository `repositoryId`, by storage key. */
export function bindingOf(repositoryId: string): BindingOf {
  const prefix = `vhdvault/1\0${repositoryId}\0`;
  return (k) => {
    const parts = k.split('/');
    if (PLAIN_TOP.has(parts[0]!)) return null;
    if (parts[0] === 'disks' && parts.length === 3 && /^lock(\.takeover)?$/.test(parts[2]!)) return null;
    if (parts[0] === 'disks' && parts.length >= 4) {
      const [, disk, folder, ...rest] = parts as [string, string, string, ...string[]];
      // A merge's replaced blocks are set aside flat, by index.
      if (/^\..+\.replaced\.tmp$/.test(folder) && rest.length === 1 && /^\d+$/.test(rest[0]!)) return prefix + directoryBinding(disk, blockFile(Number(rest[0])));
      if (isDirectoryFolder(folder)) return prefix + directoryBinding(disk, rest.join('/'));
      if (folder === 'blocks') return prefix + `object\0${disk}\0${rest.join('/')}`;
    }
    return prefix + `key\0${[...parts.slice(0, -1), finalName(parts.at(-1)!)].join('/')}`;
  };
}

const masterOf = (s: Sealing): MasterKey => ({ cipher: s.cipher, dataKey: Buffer.from(s.dataKey), macKey: Buffer.from(s.macKey) });

/** The files of one disk's VHD directories, sealed as the storage seals them (the dir layout reads them in place). */
export function directorySeal(s: Sealing, disk: string): ChunkSeal {
  const master = masterOf(s);
  const prefix = `vhdvault/1\0${s.repositoryId}\0`;
  return {
    overhead: OVERHEAD,
    seal: (name, stored) => seal(master.cipher, master.dataKey, stored, prefix + directoryBinding(disk, name)),
    open: (name, sealed, file) => open(master.dataKey, sealed, prefix + directoryBinding(disk, name), file),
  };
}

/** `inner` as an encrypted repository's storage. */
export function sealedStorage(inner: Storage, s: Sealing): SealedStorage {
  return new SealedStorage(inner, masterOf(s), bindingOf(s.repositoryId));
}

/** An unlocked repository: its master key, and the key file that opened it (the key in use). */
export interface Unlocked {
  sealing: Sealing;
  keyId: string;
}

/** Unlocked repositories of this process, by storage and id: a process asks for each password once. */
const unlocked = new Map<string, Unlocked>();

/** Open the keyring of the repository at `inner` with its password (asked for once per process). */
export async function unlock(inner: Storage, encryption: EncryptionConfig, sources: PasswordSources): Promise<Unlocked> {
  const id = `${JSON.stringify(inner.descriptor)}\0${encryption.id}`;
  const known = unlocked.get(id);
  if (known) return known;
  const root = inner.describe('');
  const { master, keyId } = await openKeyring(inner, await readPassword(root, sources), root);
  const result = { sealing: sealingOf(master, encryption.id), keyId };
  unlocked.set(id, result);
  return result;
}

export function sealingOf(master: MasterKey, repositoryId: string): Sealing {
  return { cipher: master.cipher, dataKey: master.dataKey, macKey: master.macKey, repositoryId };
}
