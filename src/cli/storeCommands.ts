import { Command, InvalidArgumentError, Option } from 'commander';
import type { LiveBackupOptions, LiveBackupReport } from '../live/liveBackup.js';
import { DEFAULT_CBW_TIMEOUT } from '../live/defaults.js';
import { parseNbdUri } from '../nbd/uri.js';
import { type BackupMetadata, Repository, type LayoutName as Layout } from '../store/repository.js';
import type { RestoreFormat } from '../store/restore.js';
import type { PruneReport } from '../store/prune.js';
import { KEEP_OPTIONS, type RetentionPolicy } from '../store/retention.js';
import { UsageError } from '../util/errors.js';
import { columns, plural } from '../util/words.js';
import { checkBackupId } from '../store/names.js';
import { type Compression, COMPRESSIONS } from '../vhd/compression.js';
import { type Cipher, CIPHERS } from '../crypto/aead.js';
import { progressBar } from './progress.js';
import { parseRate, parseSize } from './sizes.js';
import { formatBytes } from '../util/sizes.js';
import { EXIT_FAILURE, ExitStatus } from './run.js';
import { JSON_FORMATS, printJson } from './json.js';
import { applyIdlePriority, IDLE_PRIORITY_HELP } from './idlePriority.js';

// Each command imports what it runs when it runs (`await import` in its action): a start-up
// then loads one command's code, not every command's (the QEMU and NBD stacks included).

/** Worker threads: each holds blocks in flight (2 MiB each), so memory grows with this; 64 is plenty. */
function parseCount(text: string): number {
  const n = Number(text);
  if (!Number.isInteger(n) || n < 1 || n > 64) throw new InvalidArgumentError(`"${text}" is not a whole number from 1 to 64`);
  return n;
}

/** A --keep-* count: 0 would silently keep nothing of that period, so like PBS we want at least 1. */
export function parseKeep(text: string): number {
  if (!/^[1-9]\d{0,8}$/.test(text.trim())) throw new InvalidArgumentError(`"${text}" is not a whole number of at least 1`);
  return Number(text);
}

/** --max-merges: at least 1 (a prune that may not merge would keep what the policy removes without saying so). */
function parseMaxMerges(text: string): number {
  if (!/^[1-9]\d{0,8}$/.test(text.trim())) throw new InvalidArgumentError(`"${text}" is not a whole number of at least 1`);
  return Number(text);
}

/** The policy the --keep-* options give (commander's camel-cased names), at least one required. */
export function retentionPolicy(opts: Record<string, unknown>): RetentionPolicy {
  const policy: RetentionPolicy = {};
  for (const option of KEEP_OPTIONS) {
    const n = opts[`keep${option[0]!.toUpperCase()}${option.slice(1)}`];
    if (typeof n === 'number') policy[option] = n;
  }
  if (Object.keys(policy).length === 0) throw new UsageError('at least one --keep-* option is required');
  return policy;
}

/** list's table for a person: a header, then one backup a line. */
function listTable(rows: Array<Pick<BackupMetadata, 'disk' | 'id' | 'kind' | 'createdAt' | 'size' | 'bytesStored'>>): string[] {
  return columns([['disk', 'backup', 'kind', 'created', 'size', 'stored'], ...rows.map((r) => [r.disk, r.id, r.kind, r.createdAt, formatBytes(r.size), formatBytes(r.bytesStored)])]);
}

/** prune's report for a person: what is (or would be) kept, removed, merged and deferred, each line naming its disk. */
function printPrune(report: PruneReport, perDisk: Array<{ disk: string; report: PruneReport }>, dryRun: boolean): void {
  const verb = dryRun ? 'would ' : '';
  for (const v of report.vms) {
    for (const id of v.kept) console.log(`${verb}keep    VM backup ${v.vm} ${id}`);
    for (const id of v.removed) console.log(`${verb}remove  VM backup ${v.vm} ${id}`);
  }
  const width = Math.max(0, ...perDisk.map((d) => d.disk.length));
  for (const { disk, report: r } of perDisk) {
    const name = disk.padEnd(width);
    for (const id of r.kept) console.log(`${verb}keep    ${name}  ${id}`);
    for (const id of r.removed) console.log(`${verb}remove  ${name}  ${id}`);
    for (const m of r.merges) console.log(`${verb}merge   ${name}  ${m.removed} into ${m.into}`);
    for (const id of r.deferred) console.log(`deferred ${name}  ${id} (--max-merges reached; next run)`);
  }
  console.log(`${dryRun ? 'would merge' : 'merged'}: ${report.merged}`);
  if (report.collected.objects > 0) console.log(`freed: ${report.collected.objects} block objects no backup names`);
}

interface BackupCliOptions {
  source?: string;
  from?: 'raw';
  full?: boolean;
  changed?: string;
  bitmap?: string;
  qemu?: string;
  node?: string;
  device?: string;
  fleecing?: string;
  fleecingMax?: number;
  cbwTimeout?: number;
  qemuNbd?: string;
  qga?: string;
  requireQuiesce?: boolean;
  /** false with --no-discard. */
  discard: boolean;
  idlePriority?: boolean;
  concurrency?: number;
  maxRead?: number;
  maxWrite?: number;
  json?: boolean;
}

/** Options that only mean something for a running QEMU disk. */
const QEMU_ONLY = ['node', 'device', 'fleecing', 'fleecingMax', 'cbwTimeout', 'qemuNbd', 'qga', 'requireQuiesce'] as const;

function parseSeconds(text: string): number {
  if (!/^[1-9]\d{0,6}$/.test(text.trim())) throw new InvalidArgumentError(`"${text}" is not a whole number of seconds of at least 1`);
  return Number(text);
}

/** A live backup's options from the command line; every usage error before any work. */
function liveOptions(opts: BackupCliOptions): LiveBackupOptions {
  if (opts.source !== undefined) throw new UsageError('--qemu and --source both say what to back up: give one');
  for (const [given, name] of [[opts.from, '--from'], [opts.changed, '--changed'], [opts.bitmap, '--bitmap']] as const) {
    if (given !== undefined) throw new UsageError(`${name} does not apply to --qemu (the checkpoint bitmaps say what changed)`);
  }
  if (opts.node === undefined) throw new UsageError('--qemu needs --node <node-name> (the guest\'s raw passthrough node, or with --device the disk node the device uses)');
  // QEMU's id syntax; the id becomes part of a QOM path, so nothing else may pass.
  if (opts.device !== undefined && !/^[A-Za-z][A-Za-z0-9._-]{0,127}$/.test(opts.device)) throw new UsageError(`invalid --device "${opts.device}": a QEMU device id is a letter, then letters, digits, '.', '_' or '-'`);
  if (opts.fleecingMax !== undefined && opts.fleecing === undefined) throw new UsageError('--fleecing-max needs --fleecing <dir> (direct mode keeps no fleecing image)');
  if (opts.requireQuiesce && opts.qga === undefined) throw new UsageError('--require-quiesce needs --qga <socket> (the guest agent that freezes the guest)');
  const qemuNbd = opts.qemuNbd === undefined ? undefined : parseNbdUri(opts.qemuNbd).endpoint;
  const { qemu, node, device, fleecing, fleecingMax, cbwTimeout, full, concurrency, maxRead, maxWrite, qga, discard } = opts;
  // Direct mode's NBD connection from QEMU, and quiescing: what goes wrong there is worth a line.
  const log = (message: string) => console.error(`vhdvault: ${message}`);
  const quiesce = opts.requireQuiesce ? ('require' as const) : ('try' as const);
  return { qemu: qemu!, node, device, fleecing, fleecingMax, cbwTimeout, qemuNbd, full, concurrency, maxRead, maxWrite, log, qga, quiesce, warn: log, discard };
}

/** A live backup's own figures, for a person. */
function describeLive(r: LiveBackupReport): string {
  const from = r.previousCheckpoint ? `delta from checkpoint ${r.previousCheckpoint}` : 'no checkpoint used';
  const peak = r.fleecingPeakBytes === null ? '' : `, fleecing peak ${formatBytes(r.fleecingPeakBytes)}`;
  const frozen = r.quiesced ? `; guest frozen ${r.frozenMs} ms` : '';
  return `${r.mode} mode, ${from}: read ${formatBytes(r.bytesRead)}, discarded ${formatBytes(r.discardedBytes)} from the view once backed up; copied ${formatBytes(r.copiedBytes)} before guest writes${peak}${frozen}; new checkpoint ${r.checkpoint}`;
}

export function storeCommands(): Command[] {
  const init = new Command('init')
    .description('create a backup repository')
    .argument('<repo>', 'a folder, or s3://bucket/prefix')
    .addOption(
      new Option('--layout <layout>', 'how backups are stored: dir (exploded, one file per block), vhd, or objects (block objects named by digest; the only one on s3://) (default: dir; objects on s3://)').choices(['dir', 'vhd', 'objects']),
    )
    .addOption(new Option('--compression <codec>', 'codec of stored blocks (dir and objects layouts)').choices([...COMPRESSIONS]).default('none'))
    .addOption(
      new Option('--encryption <cipher>', 'encrypt every block and all metadata (dir and objects layouts); the password comes from VHDVAULT_PASSWORD, --password-file, VHDVAULT_PASSWORD_COMMAND, or is typed twice').choices([
        ...CIPHERS,
      ]),
    )
    .action(async (root: string, opts: { layout?: Layout; compression: Compression; encryption?: Cipher }) => {
      const repo = await Repository.init(root, opts);
      const sealed = repo.config.encryption ? `, encryption ${repo.config.encryption.cipher}, key ${repo.keyInUse}` : '';
      console.log(`initialized ${repo.root} (layout ${repo.config.layout}, compression ${opts.compression}${sealed})`);
    });

  const backupCmd = new Command('backup')
    .description('back up a disk image, or a running QEMU disk, as the next backup of <disk>: full the first time, then deltas')
    .argument('<repo>', 'the repository: a folder, or s3://bucket/prefix')
    .argument('<disk>', 'disk name in the repository')
    .option('--source <path|nbd-uri>', 'raw image, VHD (file, directory or chain), or NBD export (nbd://host[:port]/export, nbd+unix:///export?socket=/path)')
    .addOption(new Option('--from <format>', 'treat the source as this format (a raw image named .vhd)').choices(['raw']))
    .option('--full', 'take a full backup even if an earlier one exists')
    .option('--changed <bitmap>', 'read only the blocks set in this bitmap (one bit per 2 MiB block, MSB first)')
    .option('--bitmap <name>', 'NBD source: build the delta from this qemu dirty bitmap (qemu:dirty-bitmap:<name>; also ?bitmap=<name>)')
    .option('--qemu <qmp-socket>', 'back up a running QEMU disk through this QMP socket (instead of --source)')
    .option('--node <node-name>', 'with --qemu: the raw passthrough node in the guest\'s path (its file child is the disk); with --device, the disk node the device uses')
    .option('--device <qdev-id>', 'with --qemu: the VM disk device (its id) whose drive the copy-before-write filter is put under')
    .option('--fleecing <dir>', 'with --qemu: folder on fast local storage for the fleecing image (removed after the backup); without it, direct mode: old data goes straight to the repository, and guest writes wait for it')
    .option('--fleecing-max <size>', 'with --fleecing: abort the backup when the fleecing image holds more than this (default: unlimited)', parseSize)
    .option('--cbw-timeout <s>', `with --qemu: seconds a copy-before-write may take before the backup fails (default ${DEFAULT_CBW_TIMEOUT})`, parseSeconds)
    .option('--qemu-nbd <uri>', "with --qemu: the address of QEMU's own NBD server when it already runs one (nbd+unix:///?socket=/path or nbd://host:port)")
    .option('--qga <socket>', "with --qemu: the guest agent's socket: the guest's filesystems are frozen while the point in time is set (without an answer: crash-consistent, with a warning)")
    .option('--require-quiesce', 'with --qga: fail the backup, rather than go on crash-consistent, when the guest cannot be frozen')
    .option('--no-discard', 'with --qemu: keep what was read in the frozen view (by default each block is discarded from it once backed up: QEMU stops copying old data there before guest writes, and the fleecing image frees it)')
    .option('--idle-priority', IDLE_PRIORITY_HELP)
    .option('--concurrency <n>', 'worker threads (default: number of cores)', parseCount)
    .option('--max-read <rate>', 'read bandwidth limit, e.g. 50M (per second)', parseRate)
    .option('--max-write <rate>', 'write bandwidth limit, e.g. 20M (per second)', parseRate)
    .option('--json', 'print one JSON object')
    .action(async (root: string, disk: string, opts: BackupCliOptions) => {
      const { backup, planSource } = await import('../store/backup.js');
      const live = opts.qemu !== undefined ? liveOptions(opts) : null;
      if (!live) {
        if (opts.source === undefined) throw new UsageError('give --source <path|nbd-uri>, or --qemu <qmp-socket> for a running QEMU disk');
        for (const o of QEMU_ONLY) if (opts[o] !== undefined) throw new UsageError(`--${o.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)} needs --qemu`);
        if (!opts.discard) throw new UsageError('--no-discard needs --qemu');
        planSource({ ...opts, source: opts.source, fromRaw: opts.from === 'raw' }); // usage errors about the source (NBD URI, --bitmap) come first
      }
      await applyIdlePriority(opts.idlePriority, live !== null && opts.fleecing === undefined);
      const repo = await Repository.open(root);
      repo.diskDir(disk); // validate the name before any work
      const bar = progressBar(`backup ${disk}`, opts.json ?? false);
      let report;
      try {
        const onProgress = (d: number, t: number, b: number) => bar.update(d, t, b);
        const { signal } = bar;
        report = live ? await (await import('../live/liveBackup.js')).liveBackup(repo, disk, { ...live, onProgress, signal }) : await backup(repo, disk, { ...opts, source: opts.source!, fromRaw: opts.from === 'raw', onProgress, signal });
      } finally {
        bar.stop();
      }
      if (opts.json) printJson(JSON_FORMATS.backup, report);
      else {
        console.log(report.id);
        // For people only: on stderr, so a script reading stdout still gets the id alone.
        if (process.stdout.isTTY) {
          const { kind, id, blocksRead, blocksWritten, bytesWritten, durationMs } = report;
          console.error(`${kind} backup ${id}: ${blocksRead} blocks read, ${blocksWritten} written (${formatBytes(bytesWritten)}) in ${(durationMs / 1000).toFixed(1)} s`);
          if (live) console.error(describeLive(report as LiveBackupReport));
        }
        if (report.note) console.error(`note: ${report.note}`);
      }
    });

  const list = new Command('list')
    .description('list backups, oldest first')
    .argument('<repo>', 'the repository: a folder, or s3://bucket/prefix')
    .argument('[disk]', 'only this disk (default: every disk)')
    .option('--json', 'print one JSON object (docs/json.md)')
    .action(async (root: string, disk: string | undefined, opts: { json?: boolean }) => {
      const repo = await Repository.open(root);
      const { describeFinding, listBackups } = await import('../store/list.js');
      const listing = await listBackups(repo, disk);
      for (const f of listing.findings) console.error(`vhdvault: warning: ${describeFinding(f)}`);
      for (const u of listing.unreadable) console.error(`vhdvault: ${u.problem}`);
      const rows = listing.backups.map((m) => ({ disk: m.disk, id: m.id, kind: m.kind, parent: m.parent, createdAt: m.createdAt, size: m.size, bytesStored: m.bytesStored, blocksWritten: m.blocksWritten }));
      if (opts.json) printJson(JSON_FORMATS.list, { backups: rows, unreadable: listing.unreadable.map((u) => u.problem) });
      else if (rows.length > 0) for (const line of listTable(rows)) console.log(line);
      if (listing.unreadable.length > 0) throw new ExitStatus(EXIT_FAILURE);
    });

  const restoreCmd = new Command('restore')
    .description('restore a backup (default the latest) as a full VHD, raw image, fixed VHD or VHD directory')
    .argument('<repo>', 'the repository: a folder, or s3://bucket/prefix')
    .argument('<disk>', 'the disk to restore')
    .argument('<out>', 'file (replaced atomically), block or character device (raw, in place), or - for standard output')
    .option('--backup <id>', 'backup id (default: the latest)')
    .addOption(new Option('--format <format>', 'output format (default: raw for a device or -, else from the extension: .vhd → VHD, .vhd-dir → directory, else raw)').choices(['vhd', 'raw', 'fixed', 'dir']))
    .option('--from-overlay <dir>', 'restore the backup with the writes a `serve --writable` kept in this overlay folder')
    .action(async (root: string, disk: string, out: string, opts: { backup?: string; format?: RestoreFormat; fromOverlay?: string }) => {
      const repo = await Repository.open(root);
      repo.diskDir(disk);
      if (opts.backup) checkBackupId(opts.backup);
      const bar = progressBar(`restore ${disk}`, false, 'written');
      let r;
      try {
        const { restore } = await import('../store/restore.js');
        const layer = opts.fromOverlay ? (await import('../exports/overlay.js')).overlayLayer(opts.fromOverlay) : undefined;
        r = await restore(repo, disk, out, { backup: opts.backup, format: opts.format, layer, onProgress: (d, t, b) => bar.update(d, t, b) });
      } finally {
        bar.stop();
      }
      // With `-`, standard output carries the disk and nothing else.
      (out === '-' ? console.error : console.log)(`restored ${disk} backup ${r.id}${opts.fromOverlay ? ` with overlay ${opts.fromOverlay}` : ''} to ${out} (${r.format}, ${formatBytes(r.bytesWritten)})`);
    });

  const verifyCmd = new Command('verify')
    .description('re-read every stored block and check digests and structure')
    .argument('<repo>', 'the repository: a folder, or s3://bucket/prefix')
    .argument('[disk]', 'only this disk (default: every disk)')
    .option('--json', 'print one JSON object')
    .action(async (root: string, disk: string | undefined, opts: { json?: boolean }) => {
      const repo = await Repository.open(root);
      if (disk) await repo.requireDisk(disk);
      const bar = progressBar('verify', opts.json ?? false);
      let report;
      try {
        const { verify } = await import('../store/verify.js');
        report = await verify(repo, disk, { onProgress: (d, t, b) => bar.update(d, t, b) });
      } finally {
        bar.stop();
      }
      if (opts.json) printJson(JSON_FORMATS.verify, { ok: report.problems.length === 0, ...report });
      else if (report.problems.length === 0) console.log(`ok: ${plural(report.backups, 'backup')}, ${plural(report.blocks, 'block')} verified`);
      for (const p of report.problems) {
        if (!opts.json) {
          console.error(`vhdvault: ${p.disk}${p.id ? ` backup ${p.id}` : ''}${p.block !== null ? ` block ${p.block}` : ''}: ${p.problem}`);
        }
      }
      if (report.problems.length > 0) throw new ExitStatus(EXIT_FAILURE);
    });

  const pruneCmd = new Command('prune')
    .description('remove backups a retention policy does not keep; merge forward those later backups depend on')
    .argument('<repo>', 'the repository: a folder, or s3://bucket/prefix')
    .argument('[disk]', 'only this disk (default: every disk)');
  for (const option of KEEP_OPTIONS) pruneCmd.option(`--keep-${option} <n>`, `keep the newest backup of this many ${option === 'last' ? 'backups' : `${option} periods`}`, parseKeep);
  pruneCmd
    .option('--max-merges <n>', 'merge at most this many backups in this run', parseMaxMerges)
    .option('--dry-run', 'print what would be kept and removed; change nothing')
    .option('--json', 'print one JSON object (docs/json.md)')
    .action(async (root: string, disk: string | undefined, opts: Record<string, unknown>) => {
      const policy = retentionPolicy(opts);
      const repo = await Repository.open(root);
      if (disk) await repo.requireDisk(disk);
      const [{ prune }, { describeFinding }] = await Promise.all([import('../store/prune.js'), import('../store/list.js')]);
      const perDisk: Array<{ disk: string; report: PruneReport }> = [];
      const report = await prune(repo, disk, {
        policy,
        onDisk: (d, r) => perDisk.push({ disk: d, report: r }),
        maxMerges: opts.maxMerges as number | undefined,
        dryRun: opts.dryRun === true,
        onWait: (message) => console.error(`vhdvault: ${message}`),
        onFinding: (f) => console.error(`vhdvault: warning: ${describeFinding(f)}`),
      });
      for (const r of report.refused) console.error(`vhdvault: ${r.problem}`);
      if (opts.json) printJson(JSON_FORMATS.prune, report);
      else printPrune(report, perDisk, opts.dryRun === true);
      if (report.refused.length > 0) throw new ExitStatus(EXIT_FAILURE);
    });

  const unlock = new Command('unlock')
    .description("remove a disk's lock, and reader or writer registrations, left by a process that is gone (one on another host or in another container is never taken over automatically)")
    .argument('<repo>', 'the repository: a folder, or s3://bucket/prefix')
    .argument('<disk>', 'the disk whose lock to remove')
    .action(async (root: string, disk: string) => {
      const repo = await Repository.open(root);
      repo.diskDir(disk);
      const { unlockDisk } = await import('../store/unlock.js');
      const { describeOwner } = await import('../util/owner.js');
      const done = await unlockDisk(repo, disk);
      if (done.lock !== undefined) console.log(`unlocked ${disk}: removed the lock of ${done.lock ? describeOwner(done.lock) : 'an unreadable owner'}`);
      for (const owner of done.access) console.log(`unlocked ${disk}: removed the registration of ${describeOwner(owner)}`);
    });

  const bench = new Command('bench').description('measure this machine');
  bench
    .command('stages')
    .description('measure read, digest, compression, decompression and write speed')
    .option('--repo <repo>', 'write the test data inside this repository (its storage is what is measured)')
    .option('--drop-caches', "read from storage after dropping the whole machine's page cache (root; slows everything else running); default: O_DIRECT reads")
    .option('--json', 'print one JSON object (docs/json.md)')
    .action(async (opts: { repo?: string; dropCaches?: boolean; json?: boolean }) => {
      const dir = opts.repo ? (await Repository.open(opts.repo)).root : undefined;
      const { benchStages, formatStages } = await import('../../bench/measure/stages.js');
      const results = await benchStages(dir, { dropCaches: opts.dropCaches === true });
      if (opts.json) printJson(JSON_FORMATS.benchStages, { stages: results });
      else console.log(formatStages(results));
    });

  bench
    .command('merge')
    .description('time a retention merge in both layouts (same chain), to compare them on your storage')
    .option('--dir <path>', 'where to build the chains (default: the current folder, i.e. the disk you are on)')
    .option('--size <size>', 'virtual disk size (default: 1G)', parseSize)
    .option('--changed <percent|blocks>', 'blocks the delta changes: "10%" or a count', '10%')
    .option('--json', 'print one JSON object (docs/json.md)')
    .action(async (given: { dir?: string; size?: number; changed: string; json?: boolean }) => {
      const opts = { ...given, dir: given.dir ?? '.', size: given.size ?? 1024 ** 3 };
      const { benchMerge, formatMergeRows } = await import('../../bench/measure/merge.js');
      const bar = progressBar('bench merge', opts.json ?? false, 'written');
      let rows;
      try {
        rows = await benchMerge({ ...opts, onProgress: (d, t, b) => bar.update(d, t, b) });
      } finally {
        bar.stop();
      }
      if (opts.json) printJson(JSON_FORMATS.benchMerge, { rows });
      else console.log(formatMergeRows(rows));
    });

  return [init, backupCmd, list, restoreCmd, verifyCmd, pruneCmd, unlock, bench];
}
