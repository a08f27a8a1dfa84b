import { UsageError } from '../util/errors.js';
import { enterIdlePriority } from '../util/priority.js';

export const IDLE_PRIORITY_HELP =
  "run the backup's threads only on CPU time nothing else wants (Linux SCHED_IDLE, set with chrt): they never take a time slice from a guest's I/O, and on a busy host the backup takes longer; not with --qemu's direct mode";

/** --idle-priority, before any work: refused where a guest's writes wait for the backup (direct mode), whose copies must not wait for spare CPU. */
export async function applyIdlePriority(wanted: boolean | undefined, directMode: boolean): Promise<void> {
  if (!wanted) return;
  if (directMode) throw new UsageError("--idle-priority with --qemu needs --fleecing: in direct mode the guest's writes wait for the backup's copies, which must not wait for spare CPU");
  await enterIdlePriority();
}
