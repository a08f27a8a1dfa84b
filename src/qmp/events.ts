/**
 * QMP events, routed by name to listeners, and waits for one event.
 *
 * QEMU may send the event a command causes *before* the command's reply
 * (block-export-del's BLOCK_EXPORT_DELETED does, on 7.2), so a wait started
 * after the reply would miss it. A wait listens from the moment it is
 * created: create it, then send the command, then await it.
 */
import type { QmpError } from './errors.js';
import { QmpStateError, QmpTimeoutError } from './errors.js';
import type { QmpEvent } from './qmpWire.js';

export type EventListener = (event: QmpEvent) => void;
export type EventFilter = (event: QmpEvent) => boolean;

/** A wait for one event: a promise that can be cancelled when the command it follows failed. */
export type EventWait = Promise<QmpEvent> & { cancel(): void };

/** Every event name, for on(). */
export const ANY_EVENT = '*';

export class EventHub {
  private readonly listeners = new Map<string, Set<EventListener>>();
  /** Set once the connection is over: every wait fails with it, at once or later. */
  private ended: QmpError | null = null;
  private readonly waits = new Set<(err: QmpError) => void>();

  /** `subject` names the socket in errors. */
  constructor(private readonly subject: string) {}

  /** Call `listener` for each event named `name` (or ANY_EVENT) from now on; returns the unsubscribe. */
  on(name: string, listener: EventListener): () => void {
    const set = this.listeners.get(name) ?? new Set();
    this.listeners.set(name, set.add(listener));
    return () => void set.delete(listener);
  }

  emit(event: QmpEvent): void {
    for (const name of [event.event, ANY_EVENT]) {
      for (const listener of [...(this.listeners.get(name) ?? [])]) {
        try {
          listener(event);
        } catch (err) {
          // A listener's bug must not stop the routing of replies: report it as uncaught, later.
          queueMicrotask(() => {
            throw err;
          });
        }
      }
    }
  }

  /**
   * The next event named `name` that passes `filter`, listening from now.
   * Fails after `timeoutMs` with QmpTimeoutError, or with the connection's
   * end. A wait nobody awaits (its command failed) does no harm: its failure
   * is handled here, and cancel() releases it at once.
   */
  waitFor(name: string, filter: EventFilter, timeoutMs: number): EventWait {
    let cancel = () => {};
    const promise = new Promise<QmpEvent>((resolve, reject) => {
      if (this.ended) return reject(this.ended);
      const done = (settle: () => void) => {
        clearTimeout(timer);
        off();
        this.waits.delete(fail);
        settle();
      };
      const fail = (err: QmpError) => done(() => reject(err));
      const off = this.on(name, (event) => {
        if (filter(event)) done(() => resolve(event));
      });
      const timer = setTimeout(() => fail(new QmpTimeoutError(this.subject, `no ${name} event within ${seconds(timeoutMs)}`)), timeoutMs);
      this.waits.add(fail);
      cancel = () => fail(new QmpStateError(this.subject, `the wait for ${name} was cancelled`));
    });
    promise.catch(() => undefined);
    return Object.assign(promise, { cancel: () => cancel() });
  }

  /** The connection is over: fail every wait, now and later, with `err`; drop the listeners. */
  end(err: QmpError): void {
    this.ended ??= err;
    for (const fail of [...this.waits]) fail(this.ended);
    this.listeners.clear();
  }
}

export const seconds = (ms: number) => `${ms % 1000 === 0 ? ms / 1000 : (ms / 1000).toFixed(1)} s`;
