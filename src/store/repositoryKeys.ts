import { addKey, changePassword, KEYS, type KeyInfo, listKeys, type MasterKey, removeKey } from '../crypto/keyring.js';
import { key } from '../storage/Storage.js';
import { VaultError } from '../util/errors.js';
import { DiskLock } from './lock.js';
import type { Repository } from './repository.js';

/**
 * The key commands of an encrypted repository (docs/design/12-encryption.md
 * §12.3), each change under the keyring's lock (`keys/lock`): two removals
 * running at once, each keeping its own key in use, could otherwise remove
 * each other's last key.
 */

export interface ListedKey extends KeyInfo {
  /** The key file this process opened the repository with. */
  inUse: boolean;
}

function masterOf(repo: Repository): MasterKey {
  const sealing = repo.sealing;
  if (!sealing) throw new VaultError(repo.root, 'is not encrypted: it has no keys (an encrypted repository is made by vhdvault init --encryption)');
  return { cipher: sealing.cipher, dataKey: Buffer.from(sealing.dataKey), macKey: Buffer.from(sealing.macKey) };
}

export async function listRepositoryKeys(repo: Repository): Promise<ListedKey[]> {
  masterOf(repo);
  return (await listKeys(repo.storage)).map((k) => ({ ...k, inUse: k.id === repo.keyInUse }));
}

/** Run `change` holding the keyring's lock. */
async function underKeyLock<T>(repo: Repository, command: string, change: () => Promise<T>): Promise<T> {
  const lockKey = key(KEYS, 'lock');
  const where = repo.storage.describe(KEYS);
  const lock = await DiskLock.acquireAt(repo.storage, lockKey, command, where, () => new VaultError(where, `another key change is running; if it is gone, remove ${repo.storage.describe(lockKey)}`));
  try {
    await lock.confirm();
    return await change();
  } finally {
    await lock.release();
  }
}

/** A key file for another password; its id. */
export function addRepositoryKey(repo: Repository, password: string): Promise<string> {
  const master = masterOf(repo);
  return underKeyLock(repo, 'key add', () => addKey(repo.storage, master, password));
}

/** Remove key `id`: never the key in use, never the last readable one. */
export function removeRepositoryKey(repo: Repository, id: string): Promise<void> {
  masterOf(repo);
  return underKeyLock(repo, 'key remove', () => removeKey(repo.storage, id, repo.keyInUse!));
}

/** A new password for the key in use: the new key file, then the old one's removal. The new key's id. */
export function changeRepositoryPassword(repo: Repository, password: string): Promise<string> {
  const master = masterOf(repo);
  return underKeyLock(repo, 'key passwd', () => changePassword(repo.storage, master, repo.keyInUse!, password));
}
