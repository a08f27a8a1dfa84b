/**
 * When a job runs: its cron schedule, read by croner, in its time zone (or,
 * without one, the local zone of the process that runs it).
 *
 * A schedule has 5 fields (minute hour day-of-month month day-of-week), or 6
 * with seconds in front; croner's @daily-style nicknames pass too.
 *
 * Daylight saving time, as measured with croner 11.0.1 in Europe/Berlin
 * (test/jobFile.test.ts keeps it so). We set croner's `fixedTimeRule:
 * 'no-wildcard'`, as Vixie cron does, so a nightly backup is never skipped or
 * doubled by a list or range of hours:
 * - A fixed-time job (no `*` or step in its seconds, minutes and hours, e.g.
 *   `30 2 * * *` or `30 2,14 * * *`):
 *   - a local time skipped by spring-forward runs once, at the first valid time
 *     after the gap: `30 2 * * *` runs at 03:00 CEST on 2026-03-29 (several
 *     times in the gap, like `15,45 2 * * *`, make that one run);
 *   - a local time repeated by fall-back runs once, at its first occurrence:
 *     02:30 CEST (00:30 UTC) on 2026-10-25, not again at 02:30 CET.
 * - An interval job (a `*` or a step there, e.g. `0 * * * *` or `0 0-23/6 * * *`):
 *   times inside the gap are skipped, and the repeated hour runs on both passes.
 */
import { Cron } from 'croner';

export interface JobSchedule {
  schedule: string;
  /** An IANA zone; null: the local zone of this process. */
  timezone: string | null;
}

const CRON_OPTIONS = { mode: '5-or-6-parts', fixedTimeRule: 'no-wildcard', paused: true } as const;

/** A paused croner instance for the schedule (it never fires by itself: no callback, no timer). */
export function cronOf(s: JobSchedule): Cron {
  return new Cron(s.schedule, s.timezone === null ? CRON_OPTIONS : { ...CRON_OPTIONS, timezone: s.timezone });
}

/** What is wrong with a schedule, or null. Time zones are checked by checkTimezone. */
export function checkSchedule(pattern: string): string | null {
  const fields = pattern.trim().split(/\s+/);
  // croner also takes an ISO date as a one-off "pattern": a job repeats, so only cron.
  if (!pattern.trim().startsWith('@') && fields.length !== 5 && fields.length !== 6) {
    return `expected a cron schedule of 5 fields (minute hour day-of-month month day-of-week), or 6 with seconds first, got ${fields.length} field${fields.length === 1 ? '' : 's'} in ${JSON.stringify(pattern)}`;
  }
  let cron: Cron;
  try {
    cron = cronOf({ schedule: pattern, timezone: null });
  } catch (err) {
    return `${JSON.stringify(pattern)} is not a valid cron schedule: ${(err as Error).message.replace(/^Cron\w*:\s*/, '')}`;
  }
  if (cron.nextRun() === null) return `${JSON.stringify(pattern)} never fires (no such date)`;
  return null;
}

/**
 * The zone name as written if Intl (ICU's time zone data, which croner uses)
 * knows it, else null. Not replaced by ICU's canonical name: that is sometimes
 * an older one (Asia/Kolkata would become Asia/Calcutta).
 */
export function checkTimezone(name: string): string | null {
  try {
    new Intl.DateTimeFormat('en-US', { timeZone: name });
    return name;
  } catch {
    return null;
  }
}

/** The zone this process runs in (TZ, else the system's). */
export function localZone(): string {
  return Intl.DateTimeFormat().resolvedOptions().timeZone;
}

/** The zone a job's times are read in. */
export function scheduleZone(s: JobSchedule): string {
  return s.timezone ?? localZone();
}

/** The first run strictly after `after` (a run exactly at `after` is not returned), or null if none. */
export function nextRunAfter(s: JobSchedule, after: Date): Date | null {
  return cronOf(s).nextRun(after);
}

/** The last run strictly before `before`, or null: lets a daemon see a run it missed while it was down. */
export function previousRunBefore(s: JobSchedule, before: Date): Date | null {
  return cronOf(s).previousRuns(1, before)[0] ?? null;
}

/** The next run after `from` (default now), or null. */
export function nextRun(s: JobSchedule, from = new Date()): Date | null {
  return nextRunAfter(s, from);
}

/** The next `count` runs after `from` (default now), in order; fewer only if the schedule ends. */
export function nextRuns(s: JobSchedule, count: number, from = new Date()): Date[] {
  return cronOf(s).nextRuns(count, from);
}

/**
 * How long to wait for `at`, capped so that a timer can hold it: Node's
 * setTimeout fires at once for more than 2^31-1 ms (about 24.8 days), so a
 * daemon waits in steps of at most this and looks again.
 */
export const MAX_TIMER_MS = 2 ** 31 - 1;
export function delayUntil(at: Date, now = new Date()): number {
  return Math.min(Math.max(0, at.getTime() - now.getTime()), MAX_TIMER_MS);
}

const ISO_PARTS = new Map<string, Intl.DateTimeFormat>();

/** `date` as ISO 8601 local time in `zone` with its offset: `2026-03-29T03:00:00+02:00`. */
export function isoInZone(date: Date, zone: string): string {
  let format = ISO_PARTS.get(zone);
  if (!format) {
    format = new Intl.DateTimeFormat('en-US', {
      timeZone: zone,
      hourCycle: 'h23',
      year: 'numeric',
      month: '2-digit',
      day: '2-digit',
      hour: '2-digit',
      minute: '2-digit',
      second: '2-digit',
      timeZoneName: 'longOffset',
    });
    ISO_PARTS.set(zone, format);
  }
  const part = Object.fromEntries(format.formatToParts(date).map((p) => [p.type, p.value]));
  // "GMT+05:30", or plain "GMT" for UTC itself.
  const offset = (part.timeZoneName ?? 'GMT').replace(/^GMT/, '') || '+00:00';
  return `${part.year}-${part.month}-${part.day}T${part.hour}:${part.minute}:${part.second}${offset}`;
}

/** `date` for a person, in `zone`: `Sun 29 Mar 2026, 03:00:00 CEST`. */
export function humanInZone(date: Date, zone: string): string {
  return date.toLocaleString('en-GB', { timeZone: zone, weekday: 'short', day: 'numeric', month: 'short', year: 'numeric', hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23', timeZoneName: 'short' });
}
