/**
 * A backup's point in time with the guest's filesystems quiesced
 * (docs/design/09-live-backups.md §9.8): the guest agent freezes them
 * (`guest-fsfreeze-freeze`: every write in flight lands, the journal is
 * clean), the point in time is set, and they are thawed right after —
 * always: on an error, on SIGINT or SIGTERM, and, after a kill -9, by the
 * next vhdvault that uses the same agent, which a marker file tells.
 */
import { createHash } from 'node:crypto';
import { readFile, realpath, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { UsageError, VaultError } from '../util/errors.js';
import { describeOwner, isOwnerGone, lockOwner, parseOwner } from '../util/owner.js';
import { GuestAgent } from '../qmp/GuestAgent.js';
import type { QmpError } from '../qmp/errors.js';

/** `try`: quiesce when an agent answers, else go on crash-consistent with a warning; `require`: fail instead; `off`: never. */
export type QuiesceMode = 'try' | 'require' | 'off';

export interface Quiesced {
  quiesced: boolean;
  /** Freeze to thaw, when the guest was frozen. */
  frozenMs: number | null;
}

/** What quiescing needs of a guest agent: GuestAgent on a socket, or one reached another way (VirshAgent, through libvirt). */
export interface AgentSession {
  /** What messages name the agent by (GuestAgent: its socket). */
  readonly socketPath: string;
  execute<T = unknown>(command: string, args?: object): Promise<T>;
  close(): void;
}

export interface QuiesceOptions {
  /** The guest agent's socket (--qga), or an agent already at hand (a libvirt domain's: VirshAgent). */
  agent?: string | AgentSession;
  /** What names the VM from run to run (its QMP socket): a freeze a killed run left is found by it, whichever path reached the agent. */
  vm: string;
  mode: QuiesceMode;
  /** Warnings: no agent, an agent that failed, a guest a killed run left frozen. */
  tell(message: string): void;
  timeoutMs?: number;
  /** How setPoint runs when the guest is not frozen (a VM backup pauses the VM instead); default: as it is. */
  unfrozen?: (setPoint: () => Promise<void>) => Promise<void>;
}

const SIGNALS = ['SIGINT', 'SIGTERM'] as const;

/** Run `setPoint` (which must be quick: the guest's writes wait meanwhile) with the guest frozen when it can be. */
export async function atQuiescedPoint(options: QuiesceOptions, setPoint: () => Promise<void>): Promise<Quiesced> {
  const { agent: given, mode } = options;
  if (mode === 'off' || given === undefined) {
    if (mode === 'require') throw new VaultError('--require-quiesce', 'needs a guest agent to freeze the guest: give --qga <socket>');
    await withoutFreeze(options, setPoint);
    return { quiesced: false, frozenMs: null };
  }
  const agent = await connected(given, options);
  if (!agent) {
    await withoutFreeze(options, setPoint);
    return { quiesced: false, frozenMs: null };
  }
  try {
    const marker = await markerPath(options.vm);
    await thawLeftover(agent, marker, options.tell);
    return await frozenAround(agent, marker, options, setPoint);
  } finally {
    agent.close();
  }
}

const withoutFreeze = (options: QuiesceOptions, setPoint: () => Promise<void>) => (options.unfrozen ? options.unfrozen(setPoint) : setPoint());

/** The agent, or null (with a warning) when it does not answer and quiescing is not required. */
async function connected(given: string | AgentSession, options: QuiesceOptions): Promise<AgentSession | null> {
  const path = typeof given === 'string' ? given : given.socketPath;
  try {
    if (typeof given === 'string') return await GuestAgent.connect(given, { timeoutMs: options.timeoutMs ?? agentTimeoutMs() });
    // One at hand has no handshake of its own: a ping tells whether an agent answers.
    await given.execute('guest-ping');
    return given;
  } catch (err) {
    const problem = (err as QmpError).problem ?? (err as Error).message;
    if (options.mode === 'require') throw new VaultError(path, `cannot quiesce the guest (--require-quiesce): ${problem}; nothing was backed up`);
    options.tell(`${path}: ${problem}: backing up without quiescing (crash-consistent)`);
    return null;
  }
}

async function frozenAround(agent: AgentSession, marker: string, options: QuiesceOptions, setPoint: () => Promise<void>): Promise<Quiesced> {
  // Frozen by someone else (another backup of this VM, an administrator): theirs to thaw, not ours.
  if ((await agent.execute<string>('guest-fsfreeze-status')) === 'frozen') {
    if (options.mode === 'require') throw new VaultError(agent.socketPath, 'cannot quiesce the guest (--require-quiesce): it is already frozen by another process, whose thaw vhdvault must not take; nothing was backed up');
    options.tell(`${agent.socketPath}: the guest is already frozen by another process: backing up without freezing or thawing it`);
    await withoutFreeze(options, setPoint);
    return { quiesced: false, frozenMs: null };
  }
  // Written before the freeze: a kill -9 while frozen leaves it for the next run to find.
  await writeFile(marker, JSON.stringify(lockOwner('backup')));
  const deferred = deferSignals();
  const started = performance.now();
  try {
    try {
      await agent.execute('guest-fsfreeze-freeze');
    } catch (err) {
      // A freeze that failed half-way may have frozen some filesystems: thawed below all the same.
      if (options.mode === 'require') throw new VaultError(agent.socketPath, `cannot quiesce the guest (--require-quiesce): ${(err as QmpError).problem}; nothing was backed up`);
      options.tell(`${agent.socketPath}: the guest could not be frozen (${(err as QmpError).problem}): backing up without quiescing (crash-consistent)`);
      await thaw(agent);
      await withoutFreeze(options, setPoint);
      return { quiesced: false, frozenMs: null };
    }
    try {
      await setPoint();
    } finally {
      await thaw(agent);
    }
    return { quiesced: true, frozenMs: Math.round(performance.now() - started) };
  } finally {
    await rm(marker, { force: true });
    deferred.release();
  }
}

/** Thaw, tried three times: a guest left frozen stalls every write in it. */
async function thaw(agent: AgentSession): Promise<void> {
  let last: unknown;
  for (let i = 0; i < 3; i++) {
    try {
      await agent.execute('guest-fsfreeze-thaw');
      return;
    } catch (err) {
      last = err;
    }
  }
  throw new VaultError(agent.socketPath, `could not thaw the guest's filesystems (${(last as QmpError).problem}): the next vhdvault backup of this VM thaws them, or run guest-fsfreeze-thaw through the agent`);
}

/** VHDVAULT_QGA_TIMEOUT_S: seconds each agent command may take (default 10; a slow guest may need more). */
function agentTimeoutMs(): number | undefined {
  const v = process.env.VHDVAULT_QGA_TIMEOUT_S;
  if (v === undefined || v === '') return undefined;
  const n = Number(v);
  if (!Number.isFinite(n) || n <= 0) throw new UsageError(`VHDVAULT_QGA_TIMEOUT_S must be a positive number of seconds, not "${v}"`);
  return n * 1000;
}

/** A guest a killed vhdvault left frozen (its marker names a process gone from here): thawed, and said. */
async function thawLeftover(agent: AgentSession, marker: string, tell: (m: string) => void): Promise<void> {
  const text = await readFile(marker, 'utf8').catch(() => null);
  if (text === null) return;
  const owner = parseOwner(text);
  if (owner && !isOwnerGone(owner, lockOwner('backup'))) return;
  if ((await agent.execute<string>('guest-fsfreeze-status')) === 'frozen') {
    await thaw(agent);
    tell(`${agent.socketPath}: thawed the guest's filesystems, which ${owner ? describeOwner(owner) : 'a vhdvault'} left frozen when it was killed`);
  }
  await rm(marker, { force: true });
}

/** Where a freeze (or, pause.ts, a pause) of this VM is recorded while it lasts. */
export async function markerPath(vm: string, state: 'frozen' | 'paused' = 'frozen'): Promise<string> {
  const real = await realpath(vm).catch(() => vm);
  return join(tmpdir(), `vhdvault-${state}-${createHash('sha256').update(real).digest('hex').slice(0, 16)}.json`);
}

/**
 * While frozen, SIGINT and SIGTERM do not end the process before the thaw: a
 * signal is held and, if nothing else listens for it, delivered again after.
 */
export function deferSignals(): { release(): void } {
  let held: NodeJS.Signals | null = null;
  const hold = (signal: NodeJS.Signals) => {
    held ??= signal;
  };
  for (const s of SIGNALS) process.on(s, hold);
  return {
    release() {
      for (const s of SIGNALS) process.off(s, hold);
      if (held && process.listenerCount(held) === 0) process.kill(process.pid, held);
    },
  };
}
