/**
 * What keeps a source's prune from removing the backup the next replication
 * builds on (docs/design/04-repository.md §4.14): after each disk's replication, the source
 * records `replicas/<disk>/<hash of the destination's real path>.json`
 * ({destination, disk, backup, uuid, host, updatedAt}) naming the newest backup
 * both repositories hold. Like zrep's and syncoid's common snapshot, it stays
 * until a newer one is replicated. A record is stale only when provably so:
 * written on this host, its destination is a readable repository, and that
 * repository no longer holds the backup (by id and UUID). Anything else —
 * an unmounted destination, another host's record — keeps its backup.
 */
import { hostname } from 'node:os';
import { isNotFound, key } from '../storage/Storage.js';
import { VaultError } from '../util/errors.js';
import { pinKeys } from './names.js';
import { type BackupMetadata, Repository } from './repository.js';
import { targetSources } from '../crypto/password.js';

const REPLICAS = 'replicas';

export interface ReplicaPin {
  format: 1;
  /** The destination repository's real path (symlinks resolved). */
  destination: string;
  disk: string;
  /** The newest backup the source and the destination both hold. */
  backup: string;
  uuid: string;
  host: string;
  updatedAt: string;
}

const { pinsKey, pinKey } = pinKeys(REPLICAS);

/** Record that `destination` (a real path) holds `meta`, the newest backup it shares with this repository. */
export async function pinReplica(repo: Repository, meta: BackupMetadata, destination: string): Promise<void> {
  const pin: ReplicaPin = { format: 1, destination, disk: meta.disk, backup: meta.id, uuid: meta.uuid, host: hostname(), updatedAt: new Date().toISOString() };
  await repo.writeJson(pinKey(meta.disk, destination), pin);
}

/** The pin this repository keeps for `destination`'s copy of `disk`, or null. */
export async function readReplicaPin(repo: Repository, disk: string, destination: string): Promise<ReplicaPin | null> {
  return parsePin(await repo.storage.get(pinKey(disk, destination)).catch(() => null));
}

function parsePin(bytes: Buffer | null): ReplicaPin | null {
  if (bytes === null) return null;
  try {
    const pin = JSON.parse(bytes.toString('utf8')) as ReplicaPin;
    return pin !== null && typeof pin.backup === 'string' && typeof pin.destination === 'string' ? pin : null;
  } catch {
    return null;
  }
}

/** Provably gone: the destination opens as a repository here and holds no backup of that id and UUID. */
async function provablyStale(pin: ReplicaPin): Promise<boolean> {
  if (pin.host !== hostname()) return false;
  let destination: Repository;
  try {
    destination = await Repository.open(pin.destination, { password: { ...targetSources(), prompt: false } });
  } catch {
    return false; // unmounted, moved, unreadable: cannot tell, so it pins
  }
  try {
    return (await destination.backup(pin.disk, pin.backup)).uuid !== pin.uuid;
  } catch (err) {
    // A missing metadata file is proof; any other failure to read it is not.
    return err instanceof VaultError && !(await destination.storage.head(destination.metadataKey(pin.disk, pin.backup)));
  }
}

/**
 * The backups of `disk` that replications build on, each with its
 * destination. Provably stale pins are removed unless `dryRun` (call with the
 * disk's lock held).
 */
export async function replicaPinnedBackups(repo: Repository, disk: string, options: { dryRun?: boolean } = {}): Promise<Map<string, string>> {
  const pinned = new Map<string, string>();
  let names: string[];
  try {
    names = await repo.storage.list(pinsKey(disk));
  } catch (err) {
    if (isNotFound(err)) return pinned;
    throw err;
  }
  for (const name of names.filter((n) => n.endsWith('.json'))) {
    const k = key(pinsKey(disk), name);
    // An unreadable pin pins nothing and is left alone: not ours to judge.
    const pin = parsePin(await repo.storage.get(k).catch(() => null));
    if (pin === null || pin.disk !== disk) continue;
    if (await provablyStale(pin)) {
      if (!options.dryRun) await repo.storage.delete(k);
      continue;
    }
    pinned.set(pin.backup, [pinned.get(pin.backup), pin.destination].filter(Boolean).join(', '));
  }
  return pinned;
}
