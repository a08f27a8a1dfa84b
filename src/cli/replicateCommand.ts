import { Command } from 'commander';
import { targetSources } from '../crypto/password.js';
import { checkDiskName } from '../store/names.js';
import type { DiskReplication } from '../store/replicate.js';
import { Repository } from '../store/repository.js';
import { KEEP_OPTIONS } from '../store/retention.js';
import { type Progress, progressBar } from './progress.js';
import { EXIT_FAILURE, ExitStatus } from './run.js';
import { parseRate } from './sizes.js';
import { formatBytes } from '../util/sizes.js';
import { parseKeep, retentionPolicy } from './storeCommands.js';
import { JSON_FORMATS, printJson } from './json.js';

/** One line for a person: what one disk's replication did. */
function describeDisk(r: DiskReplication): string {
  if (r.error !== undefined) return `${r.disk}: failed: ${r.error}`;
  const sent = r.copied.reduce((n, c) => n + c.bytesSent, 0);
  const deltas = r.copied.filter((c) => c.how === 'delta').length;
  const fulls = r.copied.filter((c) => c.how === 'full');
  const copied = r.copied.length === 0 ? 'up to date' : `${r.copied.length} copied (${deltas} delta, ${fulls.length} full), ${formatBytes(sent)} sent`;
  const why = fulls.filter((c) => c.reason).map((c) => `; full ${c.id}: ${c.reason}`).join('');
  const pruned = r.pruned.length > 0 ? `, ${r.pruned.length} pruned at the destination` : '';
  return `${r.disk}: ${copied}${pruned}; in common: ${r.common ?? 'none'}${why}`;
}

export function replicateCommand(): Command {
  const cmd = new Command('replicate')
    .description("copy to <dst-repo> the backups it lacks (only the blocks each delta stores), then apply the destination's retention")
    .argument('<src-repo>', 'the repository to copy from')
    .argument('<dst-repo>', 'an initialised repository (vhdvault init), not the source')
    .argument('[disk...]', 'disks to replicate (default: every disk of the source)');
  for (const option of KEEP_OPTIONS) cmd.option(`--keep-${option} <n>`, `destination retention: keep the newest backup of this many ${option === 'last' ? 'backups' : `${option} periods`}`, parseKeep);
  cmd
    .option('--max-write <rate>', 'write bandwidth limit at the destination, e.g. 20M (per second)', parseRate)
    .option('--target-password-file <file>', "an encrypted destination's password, when it differs from the source's (also VHDVAULT_TARGET_PASSWORD, VHDVAULT_TARGET_PASSWORD_COMMAND)")
    .option('--json', 'print one JSON object')
    .action(async (srcRoot: string, dstRoot: string, disks: string[], opts: Record<string, unknown>) => {
      for (const disk of disks) checkDiskName(disk);
      const keep = KEEP_OPTIONS.some((o) => opts[`keep${o[0]!.toUpperCase()}${o.slice(1)}`] !== undefined);
      const retention = keep ? retentionPolicy(opts) : undefined;
      const json = opts.json === true;
      const src = await Repository.open(srcRoot);
      const dst = await Repository.open(dstRoot, { password: targetSources() });
      // One bar per disk, replaced when the next disk starts.
      const bar: { disk: string | null; progress: Progress | null } = { disk: null, progress: null };
      let report;
      try {
        const { replicate } = await import('../store/replicate.js');
        report = await replicate(src, dst, disks.length > 0 ? disks : undefined, {
          retention,
          maxWrite: opts.maxWrite as number | undefined,
          onProgress: (disk, done, total, bytes) => {
            if (bar.disk !== disk) {
              bar.progress?.stop();
              bar.disk = disk;
              bar.progress = progressBar(`replicate ${disk}`, json, 'sent');
            }
            bar.progress!.update(done, total, bytes);
          },
          onWait: (message) => console.error(`vhdvault: ${message}`),
          onWarning: (message) => console.error(`vhdvault: warning: ${message}`),
        });
      } finally {
        bar.progress?.stop();
      }
      if (json) printJson(JSON_FORMATS.replicate, report);
      else {
        for (const r of report.disks) console.log(describeDisk(r));
        for (const v of report.vmBackups) console.log(`VM backup ${v}: recorded at the destination (every disk there)`);
        const { read, write } = report.stages;
        console.log(`${formatBytes(report.totals.bytesSent)} sent in ${(report.durationMs / 1000).toFixed(1)} s; busy: read ${(read.busyMs / 1000).toFixed(1)} s, write ${(write.busyMs / 1000).toFixed(1)} s (${report.boundingStage} bounded it)`);
      }
      for (const r of report.disks) if (r.error !== undefined) console.error(`vhdvault: ${r.disk}: ${r.error}`);
      if (report.totals.failed > 0) throw new ExitStatus(EXIT_FAILURE);
    });
  return cmd;
}
