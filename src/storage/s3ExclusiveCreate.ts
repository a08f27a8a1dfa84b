import { createHash, randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { describeOwner, isOwnerGone, type LockOwner, lockOwner, parseOwner } from '../util/owner.js';
import { StorageError } from './Storage.js';

/** Where exclusive creators leave their claims; hidden from list('') and listAll(''). */
export const CLAIMS = '.claims';
/** How long an exclusive create may keep losing to live claims before it gives up. */
const CONTENDED_MS = 10_000;
/**
 * A rival claim is read (to see whether its owner is gone) only once it has been
 * seen this long: a live creator's claim lasts a few requests, and reading every
 * claim on every look made a 20-way race on a loaded store outlast CONTENDED_MS.
 * This decides only when to look, never whether a claim is given up.
 */
const JUDGE_AFTER_MS = 1_000;

/** One create's view of its rivals: when each claim was first seen, and its owner as last read (and when). */
interface Contest {
  started: number;
  me: LockOwner;
  firstSeen: Map<string, number>;
  owners: Map<string, { owner: LockOwner | null; at: number }>;
}

/** What the claim protocol needs of an S3 store (S3Storage provides it). */
export interface ClaimStore {
  describe(k: string): string;
  exists(k: string): Promise<boolean>;
  /** PUT with `If-None-Match: *`: false when the store answered that something is there. */
  putIfNoneMatch(k: string, data: Buffer | string): Promise<boolean>;
  put(k: string, data: Buffer | string): Promise<unknown>;
  get(k: string): Promise<Buffer>;
  /** The objects below `prefix` (relative keys) with the store's modification times. */
  listWithTimes(prefix: string): Promise<{ key: string; time: number }[]>;
  deleteMany(keys: string[]): Promise<void>;
}

export type ConditionalWrites = 'auto' | 'on' | 'off';

/**
 * Exclusive creation on an S3 store (docs/design/05-writing-safely.md §5.1).
 *
 * Where the store honours `If-None-Match: *` (AWS S3, Ceph RGW, MinIO, R2),
 * one conditional PUT is the whole protocol. Where it ignores it (s3rver, some
 * older stores), creators take turns through claims: each writes its claim
 * before it lists the others, so with S3's strong read-after-write and list
 * consistency, whichever lists second sees the first, and at most one creator
 * at a time goes on to HEAD and PUT. A claim is never given up by its age (a
 * paused or slow creator keeps it, however long it takes); only one whose
 * owner is provably gone (on this host) is removed by another creator.
 */
export class ExclusiveCreator {
  private honoured: Promise<boolean> | null;

  constructor(
    private readonly store: ClaimStore,
    mode: ConditionalWrites,
  ) {
    this.honoured = mode === 'auto' ? null : Promise.resolve(mode === 'on');
  }

  /** Does the store refuse a second `If-None-Match: *` PUT? Asked once, of a probe object of our own. */
  conditionalWrites(): Promise<boolean> {
    this.honoured ??= this.probe();
    return this.honoured;
  }

  async create(k: string, data: Buffer | string): Promise<boolean> {
    if (await this.conditionalWrites()) return this.store.putIfNoneMatch(k, data);
    return this.createByClaims(k, data);
  }

  private async probe(): Promise<boolean> {
    const probe = `${CLAIMS}/probe-${randomBytes(8).toString('hex')}`;
    try {
      await this.store.putIfNoneMatch(probe, 'probe');
      return !(await this.store.putIfNoneMatch(probe, 'probe'));
    } catch (err) {
      // A store that rejects the header outright (501 NotImplemented, 400) does not honour it either.
      const code = (err as StorageError).code ?? '';
      if (/NotImplemented|S3_501|InvalidArgument|S3_400/.test(code)) return false;
      throw err;
    } finally {
      await this.store.deleteMany([probe]).catch(() => undefined);
    }
  }

  private async createByClaims(k: string, data: Buffer | string): Promise<boolean> {
    const folder = `${CLAIMS}/${createHash('sha256').update(this.store.describe(k)).digest('hex')}`;
    const contest: Contest = { started: Date.now(), me: lockOwner('exclusive create'), firstSeen: new Map(), owners: new Map() };
    const me = contest.me;
    for (let round = 0; ; round++) {
      if (round > 0) await sleep(5 + Math.random() * Math.min(35 * 2 ** round, 500));
      // Present already: no claim needed to say so (and the losers of a race leave fast).
      if (await this.store.exists(k)) return false;
      // Having lost once, claim again only when the others' claims are gone: fewer claims, less contention.
      if (round > 0 && (await this.rivals(k, folder, null, contest)).count > 0) continue;
      const mine = `${folder}/${Date.now()}-${randomBytes(8).toString('hex')}`;
      await this.store.put(mine, JSON.stringify(me));
      try {
        // The oldest claim holds on while the younger ones withdraw: all withdrawing, all the time, would livelock.
        for (;;) {
          const r = await this.rivals(k, folder, mine, contest);
          if (r.count === 0) return await this.putChecked(k, data);
          if (!r.oldest) break;
          await sleep(5 + Math.random() * 10);
        }
      } finally {
        // A claim left behind holds up later creators until its owner is seen gone: failing here must not fail a create that succeeded.
        await this.store.deleteMany([mine]).catch(() => undefined);
      }
    }
  }

  /** HEAD, then PUT: alone under our claim, nobody else does either meanwhile. */
  private async putChecked(k: string, data: Buffer | string): Promise<boolean> {
    if (await this.store.exists(k)) return false;
    return this.store.putIfNoneMatch(k, data);
  }

  /**
   * The live claims other than `mine`: how many, and whether mine is the oldest.
   * Claims whose owner is provably gone are removed; one that holds us up past
   * the contention limit is named in the error.
   */
  private async rivals(k: string, folder: string, mine: string | null, contest: Contest): Promise<{ count: number; oldest: boolean }> {
    const listed = (await this.store.listWithTimes(folder)).sort((a, b) => a.time - b.time || (a.key < b.key ? -1 : 1));
    const live: { key: string; owner: LockOwner | null }[] = [];
    const now = Date.now();
    for (const c of listed) {
      if (c.key === mine) {
        live.push({ key: c.key, owner: contest.me });
        continue;
      }
      const since = contest.firstSeen.get(c.key) ?? now;
      contest.firstSeen.set(c.key, since);
      // Judged again each JUDGE_AFTER_MS: an owner alive at one look may be killed before the next.
      const judged = contest.owners.get(c.key);
      if (now - since >= JUDGE_AFTER_MS && (!judged || now - judged.at >= JUDGE_AFTER_MS)) {
        const text = await this.store.get(c.key).then((b) => b.toString('utf8'), () => null);
        if (text === null) continue; // withdrawn meanwhile
        const owner = claimOwner(text);
        contest.owners.set(c.key, { owner, at: now });
        if (owner && isOwnerGone(owner, contest.me)) {
          await this.store.deleteMany([c.key]).catch(() => undefined);
          continue;
        }
      }
      live.push({ key: c.key, owner: contest.owners.get(c.key)?.owner ?? null });
    }
    const others = live.filter((c) => c.key !== mine);
    if (others.length > 0 && now - contest.started > CONTENDED_MS) throw this.heldUp(k, others);
    return { count: others.length, oldest: live[0]?.key === mine };
  }

  private heldUp(k: string, others: { key: string; owner: LockOwner | null }[]): StorageError {
    const first = others.find((c) => c.owner) ?? others[0];
    const who = first!.owner ? describeOwner(first!.owner) : 'an unknown process';
    const more = others.length > 1 ? ` and ${others.length - 1} more` : '';
    const why = `still contended after ${CONTENDED_MS / 1000} s: a claim of ${who} (${this.store.describe(first!.key)})${more}; if that process is gone, delete that object`;
    return new StorageError(this.store.describe(k), why, 'CONTENDED');
  }
}

/** A claim's owner: a record, or `pid@host` as earlier versions wrote it. */
function claimOwner(text: string): LockOwner | null {
  const legacy = /^(\d+)@(\S+)\n?$/.exec(text);
  if (legacy) return { pid: Number(legacy[1]), host: legacy[2]!, startedAt: 'unknown', command: 'exclusive create' };
  return parseOwner(text);
}
