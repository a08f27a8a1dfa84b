/**
 * Which backups a retention policy keeps, by Proxmox Backup Server's rules:
 * options apply in the order last, hourly, daily, weekly, monthly, yearly;
 * each walks the backups from newest to oldest and keeps the newest backup of
 * each of N distinct periods (local time; weeks are ISO weeks). A period that
 * already holds a backup kept by an earlier option is covered and does not use
 * up N; within a period only the newest backup can be kept by that option.
 * Everything not kept is removed. We add one rule: the newest backup is kept.
 */
export const KEEP_OPTIONS = ['last', 'hourly', 'daily', 'weekly', 'monthly', 'yearly'] as const;
export type KeepOption = (typeof KEEP_OPTIONS)[number];
export type RetentionPolicy = Partial<Record<KeepOption, number>>;

export interface Dated {
  id: string;
  createdAt: string;
}

const pad = (n: number, width = 2) => String(n).padStart(width, '0');

/** ISO 8601 week-numbering year and week of a local date. */
function isoWeek(d: Date): string {
  const day = new Date(d.getFullYear(), d.getMonth(), d.getDate());
  const weekday = (day.getDay() + 6) % 7; // Monday = 0
  day.setDate(day.getDate() - weekday + 3); // the week's Thursday decides its year
  const firstThursday = new Date(day.getFullYear(), 0, 4);
  const week = 1 + Math.round(((day.getTime() - firstThursday.getTime()) / 86400000 - 3 + ((firstThursday.getDay() + 6) % 7)) / 7);
  return `${day.getFullYear()}-W${pad(week)}`;
}

/** The period a backup falls in, for an option (local time). */
export function periodOf(option: KeepOption, b: Dated): string {
  const d = new Date(b.createdAt);
  switch (option) {
    case 'last':
      return b.id;
    case 'hourly':
      return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}`;
    case 'daily':
      return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
    case 'weekly':
      return isoWeek(d);
    case 'monthly':
      return `${d.getFullYear()}-${pad(d.getMonth() + 1)}`;
    case 'yearly':
      return String(d.getFullYear());
  }
}

/** Split backups (any order) into kept and removed ids, each oldest first. */
export function selectRetention<T extends Dated>(backups: T[], policy: RetentionPolicy): { kept: T[]; removed: T[] } {
  const newestFirst = [...backups].sort((a, b) => (a.id < b.id ? 1 : -1));
  const mark = new Map<string, 'keep' | 'remove'>();
  for (const option of KEEP_OPTIONS) {
    const count = policy[option];
    if (!count) continue;
    const covered = new Set(newestFirst.filter((b) => mark.get(b.id) === 'keep').map((b) => periodOf(option, b)));
    const chosen = new Set<string>();
    for (const b of newestFirst) {
      if (mark.has(b.id)) continue;
      const period = periodOf(option, b);
      if (covered.has(period)) continue;
      if (chosen.has(period)) {
        mark.set(b.id, 'remove'); // an older backup of a period this option already kept
        continue;
      }
      if (chosen.size >= count) break;
      chosen.add(period);
      mark.set(b.id, 'keep');
    }
  }
  if (newestFirst[0]) mark.set(newestFirst[0].id, 'keep');
  const oldestFirst = newestFirst.reverse();
  return {
    kept: oldestFirst.filter((b) => mark.get(b.id) === 'keep'),
    removed: oldestFirst.filter((b) => mark.get(b.id) !== 'keep'),
  };
}
