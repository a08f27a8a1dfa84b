import { Command, InvalidArgumentError, Option } from 'commander';
import { DEFAULT_BOOT_TIMEOUT_S, DEFAULT_LIBVIRT_URI } from '../live/defaults.js';
import { checkBackupId } from '../store/names.js';
import { parseNbdUri } from '../nbd/uri.js';
import { Repository } from '../store/repository.js';
import type { VmBackupOptions, VmBackupReport } from '../live/vmBackup.js';
import { isVmTarget, type VmRecord } from '../store/vmRecord.js';
import { UsageError } from '../util/errors.js';
import { progressBar } from './progress.js';
import { ExitStatus } from './run.js';
import { JSON_FORMATS, printJson } from './json.js';
import { applyIdlePriority, IDLE_PRIORITY_HELP } from './idlePriority.js';

// Each command imports what it runs when it runs (see storeCommands.ts).

interface VmBackupCliOptions {
  libvirt?: string;
  connect?: string;
  scratch?: string;
  qemu?: string;
  qga?: string;
  fleecing?: string;
  qemuNbd?: string;
  disks?: string[];
  quiesce: boolean;
  requireQuiesce?: boolean;
  /** false with --no-discard. */
  discard: boolean;
  idlePriority?: boolean;
  full?: boolean;
  json?: boolean;
}

/** `--disks vda,vdb`: targets, each once. */
function parseTargets(text: string): string[] {
  const targets = text.split(',').map((t) => t.trim());
  for (const t of targets) if (!isVmTarget(t)) throw new UsageError(`--disks ${text}: "${t}" is not a disk target (like vda, or a QEMU device id)`);
  if (new Set(targets).size !== targets.length) throw new UsageError(`--disks ${text}: a target is named twice`);
  return targets;
}

const fmtMs = (ms: number | null) => (ms === null ? '' : `${ms} ms`);

/** A VM backup as `vm list --json` shows it: the record without the definition's bulk. */
export function vmListRow(r: VmRecord) {
  const d = r.definition;
  const definition = d.kind === 'libvirt' ? { kind: d.kind, domain: d.domain, uuid: d.uuid } : { kind: d.kind, machine: d.machine, disks: d.disks.length };
  return { vm: r.vm, id: r.id, time: r.createdAt, disks: r.disks, quiesced: r.quiesced, frozenMs: r.frozenMs, pausedMs: r.pausedMs, checkpoint: r.checkpoint, definition };
}

/** What both kinds of VM backup take. */
type Common = Pick<VmBackupOptions, 'quiesce' | 'full' | 'disks' | 'warn' | 'onProgress' | 'signal'>;

async function runVmBackup(repo: Repository, name: string, opts: VmBackupCliOptions, common: Common): Promise<VmBackupReport> {
  if (opts.libvirt !== undefined) {
    const { vmBackupLibvirt } = await import('../live/vmBackupLibvirt.js');
    return vmBackupLibvirt(repo, name, { ...common, domain: opts.libvirt, connect: opts.connect!, scratch: opts.scratch, discard: opts.discard });
  }
  const { vmBackupQemu } = await import('../live/vmBackup.js');
  const qemuNbd = opts.qemuNbd === undefined ? undefined : parseNbdUri(opts.qemuNbd).endpoint;
  return vmBackupQemu(repo, name, { ...common, qemu: opts.qemu!, qga: opts.qga, fleecing: opts.fleecing, qemuNbd, log: common.warn, discard: opts.discard });
}

export function vmCommand(): Command {
  const vm = new Command('vm').description('whole virtual machines: every disk at one point in time, with its definition');

  vm.command('backup')
    .description("back up every disk of a running VM at one instant (frozen through its guest agent, else paused for that instant), and the VM's definition")
    .argument('<repo>', 'the repository: a folder, or s3://bucket/prefix')
    .argument('<vm>', 'the VM\'s name in the repository; its disks are stored as <vm>.<target>')
    .option('--libvirt <domain>', 'a libvirt domain (running: through libvirt\'s backup API; shut off: its images read as they are)')
    .option('--connect <uri>', 'with --libvirt: libvirt\'s URI', DEFAULT_LIBVIRT_URI)
    .option('--scratch <dir>', "with --libvirt: folder for libvirt's scratch images, which hold what the guest overwrites during the backup (default: a new vhdvault-scratch-<pid>-… folder in the system's temporary folder, removed after)")
    .option('--qemu <qmp-socket>', "the VM's QMP socket (a QEMU started without libvirt)")
    .option('--qga <socket>', "with --qemu: the guest agent's socket")
    .option('--fleecing <dir>', 'with --qemu: folder on fast local storage for the fleecing images (default: direct mode)')
    .option('--qemu-nbd <uri>', "with --qemu: the address of QEMU's own NBD server when it already runs one")
    .option('--disks <targets>', 'only these disks, comma-separated (default: every writable disk)', parseTargets)
    .option('--no-quiesce', 'do not freeze the guest: pause the VM for the instant instead')
    .option('--no-discard', 'keep what was read in the frozen views (by default each block is discarded once backed up, where the view takes it, and QEMU stops copying old data there)')
    .option('--require-quiesce', 'fail, committing nothing, when the guest cannot be frozen')
    .option('--idle-priority', IDLE_PRIORITY_HELP)
    .option('--full', 'read every disk whole, even where a checkpoint could give a delta')
    .option('--json', 'print one JSON object')
    .action(async (root: string, name: string, opts: VmBackupCliOptions) => {
      if (!opts.quiesce && opts.requireQuiesce) throw new UsageError('--no-quiesce and --require-quiesce contradict each other: give one');
      if ((opts.qemu === undefined) === (opts.libvirt === undefined)) throw new UsageError('give --libvirt <domain> or --qemu <qmp-socket>: one of them');
      if (opts.libvirt !== undefined) {
        for (const [given, flag] of [[opts.qga, '--qga'], [opts.fleecing, '--fleecing'], [opts.qemuNbd, '--qemu-nbd']] as const) if (given !== undefined) throw new UsageError(`${flag} goes with --qemu (libvirt has its own agent channel, scratch images and NBD server)`);
      } else if (opts.scratch !== undefined) throw new UsageError('--scratch goes with --libvirt (with --qemu, --fleecing names the folder of the copies)');
      const { checkVmName } = await import('../store/vmRecord.js');
      checkVmName(name);
      await applyIdlePriority(opts.idlePriority, opts.qemu !== undefined && opts.fleecing === undefined);
      const repo = await Repository.open(root);
      const log = (message: string) => console.error(`vhdvault: ${message}`);
      const quiesce = !opts.quiesce ? ('off' as const) : opts.requireQuiesce ? ('require' as const) : ('try' as const);
      const bar = progressBar(`vm backup ${name}`, opts.json ?? false);
      let report;
      try {
        report = await runVmBackup(repo, name, opts, { quiesce, full: opts.full, disks: opts.disks, warn: log, onProgress: (d, t, b) => bar.update(d, t, b), signal: bar.signal });
      } finally {
        bar.stop();
      }
      if (opts.json) {
        printJson(JSON_FORMATS.vmBackup, report);
        return;
      }
      console.log(report.id);
      for (const [target, r] of Object.entries(report.disks)) console.error(`${target}: ${r.kind} backup ${r.id} of ${name}.${target}, ${r.blocksRead} blocks read${r.note ? ` (${r.note})` : ''}`);
      const how = report.quiesced ? `guest frozen ${fmtMs(report.frozenMs)}` : report.pausedMs !== null ? `VM paused ${fmtMs(report.pausedMs)} (crash-consistent)` : 'crash-consistent';
      console.error(`VM backup ${report.id}: ${Object.keys(report.disks).length} disks at one instant, ${how}, in ${(report.durationMs / 1000).toFixed(1)} s`);
    });

  vm.command('list')
    .description('list VM backups, oldest first')
    .argument('<repo>', 'the repository: a folder, or s3://bucket/prefix')
    .argument('[vm]', 'only this VM (default: every VM)')
    .option('--json', 'print one JSON object (docs/json.md)')
    .action(async (root: string, name: string | undefined, opts: { json?: boolean }) => {
      const { checkVmName, noSuchVm, vmNames, vmRecords } = await import('../store/vmRecord.js');
      if (name !== undefined) checkVmName(name);
      const repo = await Repository.open(root);
      const rows = [];
      for (const v of name !== undefined ? [name] : await vmNames(repo)) rows.push(...(await vmRecords(repo, v)).map(vmListRow));
      // A VM named and never backed up is an error, as a disk is for list: not an empty all-clear.
      if (name !== undefined && rows.length === 0) throw await noSuchVm(repo, name);
      if (opts.json) {
        printJson(JSON_FORMATS.vmList, { backups: rows });
        return;
      }
      for (const r of rows) {
        const disks = Object.entries(r.disks).map(([t, id]) => `${t}=${id}`).join(' ');
        console.log(`${r.vm}\t${r.id}\t${r.time}\t${r.quiesced ? 'quiesced' : 'crash-consistent'}\t${r.definition.kind}\t${disks}`);
      }
    });

  vm.command('restore')
    .description("write every disk of a VM backup into a folder, with the VM's definition pointing at them (libvirt: <vm>.xml; QEMU: <vm>.json and <vm>.sh)")
    .argument('<repo>', 'the repository: a folder, or s3://bucket/prefix')
    .argument('<vm>')
    .argument('<dir>', 'the folder to write into (made when its parent exists); no file in it is ever overwritten')
    .option('--backup <id>', 'the VM backup to restore (default: the newest)')
    .addOption(new Option('--format <format>', 'the disks\' format').choices(['qcow2', 'raw', 'vhd']).default('qcow2'))
    .option('--define <new-name>', 'libvirt: define the restored VM under this new name, with a new UUID and new MAC addresses (the original is never touched)')
    .option('--connect <uri>', `with --define: libvirt's URI (default: ${DEFAULT_LIBVIRT_URI})`)
    .option('--json', 'print one JSON object')
    .action(async (root: string, name: string, dir: string, opts: { backup?: string; format: 'qcow2' | 'raw' | 'vhd'; define?: string; connect?: string; json?: boolean }) => {
      if (opts.connect !== undefined && opts.define === undefined) throw new UsageError('--connect goes with --define');
      const { checkVmName } = await import('../store/vmRecord.js');
      checkVmName(name);
      if (opts.backup !== undefined) checkBackupId(opts.backup);
      const repo = await Repository.open(root);
      const { vmRestore } = await import('../live/vmRestore.js');
      const bar = progressBar(`vm restore ${name}`, opts.json ?? false, 'written');
      let report;
      try {
        report = await vmRestore(repo, name, dir, { backup: opts.backup, format: opts.format, define: opts.define, connect: opts.connect, onProgress: (d, t, b) => bar.update(d, t, b), signal: bar.signal });
      } finally {
        bar.stop();
      }
      if (opts.json) {
        printJson(JSON_FORMATS.vmRestore, report);
        return;
      }
      for (const [target, d] of Object.entries(report.disks)) console.log(`${target}\t${d.path}`);
      console.log(`definition\t${report.definition}`);
      console.error(`VM backup ${report.id} of ${name}: ${Object.keys(report.disks).length} disks restored as ${opts.format} into ${report.dir}${report.defined ? `, defined in libvirt as "${report.defined}"` : ''}`);
    });

  vm.command('boot-check')
    .description('boot a VM backup without restoring it (its disks served writable into throwaway overlays, a throwaway QEMU with no network) and wait for its guest agent to answer')
    .argument('<repo>', 'the repository: a local folder')
    .argument('<vm>')
    .option('--backup <id>', 'the VM backup to boot (default: the newest)')
    .option('--timeout <s>', `seconds the guest has to answer (default: ${DEFAULT_BOOT_TIMEOUT_S})`, parseSeconds)
    .option('--expect <regex>', 'pass when the serial console matches this, instead of when the guest agent answers')
    .option('--json', 'print one JSON object')
    .action(async (root: string, name: string, opts: { backup?: string; timeout?: number; expect?: string; json?: boolean }) => {
      let expect: RegExp | undefined;
      if (opts.expect !== undefined) {
        try {
          expect = new RegExp(opts.expect);
        } catch (err) {
          throw new UsageError(`--expect ${opts.expect}: not a regular expression (${(err as Error).message})`);
        }
      }
      const { checkVmName } = await import('../store/vmRecord.js');
      checkVmName(name);
      if (opts.backup !== undefined) checkBackupId(opts.backup);
      const repo = await Repository.open(root);
      const { bootCheckVm } = await import('../live/bootCheck.js');
      // No bar: only its handling of SIGINT/SIGTERM (the VM killed, the overlays removed, then exit).
      const interrupt = progressBar(`vm boot-check ${name}`, true);
      let result;
      try {
        result = await bootCheckVm(repo, name, { backup: opts.backup, timeoutS: opts.timeout, expect, signal: interrupt.signal });
      } finally {
        interrupt.stop();
      }
      if (opts.json) printJson(JSON_FORMATS.vmBootCheck, result);
      else if (result.ok) console.log(`VM backup ${result.id} of ${name} booted: ${result.by === 'agent' ? 'its guest agent answered' : 'its console matched'} after ${(result.ms / 1000).toFixed(1)} s`);
      else console.error(`vhdvault: VM backup ${result.id} of ${name} failed its boot check: ${result.problem}`);
      if (!result.ok) throw new ExitStatus(1);
    });

  return vm;
}

/** `--timeout 90`: whole seconds, at least one. */
function parseSeconds(text: string): number {
  const n = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(n) || n < 1) throw new InvalidArgumentError(`"${text}" is not a number of seconds (a whole number, at least 1)`);
  return n;
}
