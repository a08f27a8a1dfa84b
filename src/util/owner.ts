import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import { bootId, pidNamespace, processAlive, processStart } from './processes.js';

/**
 * Who a process is, as a lock, a claim, a marker or a reader registration
 * records it: enough to prove, on its own host, that it is gone, and a random
 * token that no other record shares, whatever the host and pid.
 */
export interface LockOwner {
  pid: number;
  host: string;
  startedAt: string;
  command: string;
  /** This boot of the host (Linux boot_id): a record from an earlier boot is stale. */
  bootId?: string;
  /** The owner's start time in clock ticks since boot (/proc/<pid>/stat): tells a reused pid from the owner. */
  processStart?: string;
  /** The owner's PID namespace: its pid says nothing in another one (a container with the same host name). */
  pidNamespace?: string;
  /** Random, one per owner record: no two owners share it, whatever their host and pid. */
  token?: string;
}

/** Who we are, with a new token. */
export function lockOwner(command: string): LockOwner {
  return {
    pid: process.pid,
    host: hostname(),
    startedAt: new Date().toISOString(),
    command,
    bootId: bootId(),
    processStart: processStart(process.pid),
    pidNamespace: pidNamespace(),
    token: randomBytes(8).toString('hex'),
  };
}

/** An owner record, or null when the text is not one. */
export function parseOwner(text: string): LockOwner | null {
  try {
    const v = JSON.parse(text) as LockOwner;
    return v !== null && Number.isSafeInteger(v.pid) && typeof v.host === 'string' ? v : null;
  } catch {
    return null;
  }
}

export function describeOwner(o: LockOwner): string {
  return `process ${o.pid} on host ${o.host} (${o.command}, since ${o.startedAt})`;
}

/** Is the owner certainly gone? Only provable on the same host, boot and PID namespace. */
export function isOwnerGone(holder: LockOwner, me: LockOwner): boolean {
  if (holder.host !== me.host) return false;
  if (holder.bootId && me.bootId && holder.bootId !== me.bootId) return true;
  // Another PID namespace (a container with this host's name): its pid cannot be looked up from here.
  // (Owner records of earlier versions carry none: they are judged as they always were.)
  if (holder.pidNamespace && me.pidNamespace && holder.pidNamespace !== me.pidNamespace) return false;
  if (!processAlive(holder.pid)) return true;
  // The pid is in use: by the owner, or by a process that reused it.
  const start = holder.processStart ? processStart(holder.pid) : undefined;
  return start !== undefined && start !== holder.processStart;
}

/** Was this owner seen running, here (same host, boot and PID namespace, same process start)? */
export function seenRunning(holder: LockOwner, me: LockOwner): boolean {
  const here = holder.host === me.host && (!holder.bootId || holder.bootId === me.bootId) && (!holder.pidNamespace || holder.pidNamespace === me.pidNamespace);
  if (!here || !processAlive(holder.pid)) return false;
  return !holder.processStart || processStart(holder.pid) === holder.processStart;
}
