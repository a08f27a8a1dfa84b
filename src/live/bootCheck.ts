/**
 * `vm boot-check`: does a VM backup boot? Without restoring anything: each
 * disk of the backup is served writable (exports/serve.ts) on a Unix socket,
 * its writes kept in a throwaway overlay, and a throwaway QEMU boots the VM
 * from those exports as the definition says (memory, CPUs, a direct kernel
 * boot, else firmware from the first disk), with no network, a guest agent
 * port and the serial console on a pipe. The check passes when the guest's
 * agent answers `guest-ping` (or, with `expect`, when the console shows it),
 * within the time allowed.
 *
 * A read error of a disk's export (a damaged block: serve names what failed)
 * fails the check at once, naming the disk. Whatever happens, the VM is
 * killed, the servers stopped, and the temporary folder with the overlays is
 * removed (with the overlays' registrations in the repository): the check
 * leaves nothing behind.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { realpath, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { serve, type ServeReady } from '../exports/serve.js';
import { GuestAgent } from '../qmp/GuestAgent.js';
import { unpinBackup } from '../store/overlayPins.js';
import type { Repository } from '../store/repository.js';
import { findVmRecord, vmDiskName } from '../store/vmRecord.js';
import { kvmUsable } from '../util/device.js';
import { VaultError } from '../util/errors.js';
import { processTempDir } from '../util/files.js';
import { withDeathSignal } from '../util/processes.js';
import { DEFAULT_BOOT_TIMEOUT_S } from './defaults.js';
import { bootPlan, type BootPlan } from './vmDefinition.js';

/** The name QEMU and libvirt give the guest agent's port. */
const AGENT_PORT = 'org.qemu.guest_agent.0';
/** How much console output is kept for matching and for messages. */
const CONSOLE_KEEP = 1024 * 1024;

export interface BootCheckOptions {
  /** The VM backup (default: the newest). */
  backup?: string;
  /** Seconds the guest has to answer (default 300). */
  timeoutS?: number;
  /** Pass when the serial console matches this, instead of when the agent answers. */
  expect?: RegExp;
  /** Where the temporary folder (overlays, sockets) goes; default: the system's temporary folder. */
  scratch?: string;
  /** Aborted: stop now (everything is still cleaned up), rejecting with the signal's reason. */
  signal?: AbortSignal;
  /** Progress lines for a person (what is served, QEMU started). */
  log?: (message: string) => void;
}

export interface BootCheckResult {
  vm: string;
  id: string;
  ok: boolean;
  /** From QEMU's start to the answer (or to the failure). */
  ms: number;
  by: 'agent' | 'console';
  problem?: string;
}


/** A value for a QEMU option list (commas doubled). */
const opt = (value: string) => value.replace(/,/g, ',,');

function qemuArgs(plan: BootPlan, sockets: Map<string, string>, agentSocket: string): string[] {
  const kvm = kvmUsable();
  const args = [
    ...['-machine', plan.machine ?? 'q35', '-accel', kvm ? 'kvm' : 'tcg', ...(kvm ? ['-cpu', 'host'] : [])],
    ...['-m', String(plan.memoryMiB), '-smp', String(plan.cpus)],
    ...['-nodefaults', '-display', 'none', '-no-reboot', '-serial', 'stdio', '-nic', 'none'],
  ];
  if (plan.kernel) {
    args.push('-kernel', plan.kernel.kernel);
    if (plan.kernel.initrd) args.push('-initrd', plan.kernel.initrd);
    if (plan.kernel.append) args.push('-append', plan.kernel.append);
  }
  plan.targets.forEach((target, i) => {
    args.push('-blockdev', `driver=nbd,node-name=nbd-${target},server.type=unix,server.path=${opt(sockets.get(target)!)},export=${target}`);
    args.push('-device', `virtio-blk-pci,drive=nbd-${target},id=${target},serial=${target}${plan.kernel === null && i === 0 ? ',bootindex=1' : ''}`);
  });
  args.push('-chardev', `socket,path=${opt(agentSocket)},server=on,wait=off,id=qga0`);
  args.push('-device', 'virtio-serial-pci,id=vser0', '-device', `virtserialport,bus=vser0.0,chardev=qga0,name=${AGENT_PORT}`);
  return args;
}

/** The check's outcome: the first of a pass or a failure decides it; later ones are dropped. */
class Verdict {
  /** null: undecided; '': passed; else why it failed. */
  problem: string | null = null;
  private settle!: () => void;
  readonly settled = new Promise<void>((resolve) => (this.settle = resolve));

  get decided(): boolean {
    return this.problem !== null;
  }

  pass(): void {
    this.fail('');
  }

  fail(problem: string): void {
    if (this.problem !== null) return;
    this.problem = problem;
    this.settle();
  }
}

/** Until the agent answers guest-ping (each try: connect, guest-sync, ping), or `stop` says to give up. */
async function agentAnswers(socket: string, stop: () => boolean): Promise<boolean> {
  while (!stop()) {
    try {
      const agent = await GuestAgent.connect(socket, { timeoutMs: 5000 });
      try {
        await agent.execute('guest-ping');
        return true;
      } finally {
        agent.close();
      }
    } catch {
      // Not up yet (no socket, or no agent behind the port): try again.
      await sleep(250);
    }
  }
  return false;
}

/** Boot VM backup `options.backup` (else the newest) of `vm` from its disks served writable, and wait for it to answer. */
export async function bootCheckVm(repo: Repository, vm: string, options: BootCheckOptions = {}): Promise<BootCheckResult> {
  const record = await findVmRecord(repo, vm, options.backup);
  const timeoutS = options.timeoutS ?? DEFAULT_BOOT_TIMEOUT_S;
  const by = options.expect ? ('console' as const) : ('agent' as const);
  const plan = bootPlan(record.definition, Object.keys(record.disks));
  if (plan.kernel) {
    for (const file of [plan.kernel.kernel, plan.kernel.initrd]) {
      if (file !== null && !(await stat(file).catch(() => null))?.isFile()) throw new VaultError(file, `the VM's definition boots this ${file === plan.kernel.kernel ? 'kernel' : 'initrd'}, and it is not a file on this host`);
    }
  }
  const log = options.log ?? (() => undefined);
  // A killed check's folder (its overlays) goes at the next check.
  const temp = await processTempDir('vhdvault-bootcheck-', options.scratch);
  const verdict = new Verdict();
  let stopServers!: () => void;
  const until = new Promise<void>((resolve) => (stopServers = resolve));
  const servers: Promise<void>[] = [];
  let qemu: ChildProcess | null = null;
  let exited: Promise<void> = Promise.resolve();
  let started = performance.now();
  let answeredAt: number | null = null;
  const onAbort = () => verdict.fail('interrupted');
  options.signal?.addEventListener('abort', onAbort);
  try {
    options.signal?.throwIfAborted();
    // Each disk served on its own socket, writable into an overlay in the temporary folder.
    const sockets = new Map<string, string>();
    await Promise.all(
      plan.targets.map(async (target) => {
        const disk = vmDiskName(vm, target);
        const socket = join(temp, `${target}.sock`);
        sockets.set(target, socket);
        const ready = new Promise<ServeReady>((resolve, reject) => {
          const serving = serve(repo, disk, {
            backup: record.disks[target],
            listen: { path: socket },
            name: target,
            writable: true,
            overlay: join(temp, `${target}.overlay`),
            until,
            onReady: resolve,
            // serve tells each failed request: a read error of this disk fails the check.
            log: (message) => {
              // `<peer>: READ at <offset> (+<length>): <why>`
              const m = /: ([A-Z_]+) at (\d+) \(\+\d+\): (.*)$/s.exec(message);
              if (m) verdict.fail(`disk ${target} (${disk}): ${m[1] === 'READ' ? 'read error' : `${m[1]!.toLowerCase()} failed`} at byte ${m[2]}: ${m[3]}`);
            },
          });
          servers.push(serving.catch(() => undefined));
          serving.then(
            () => reject(new Error('stopped')),
            (err: unknown) => reject(err),
          );
        });
        try {
          await ready;
        } catch (err) {
          verdict.fail(`disk ${target} (${disk}): ${(err as Error).message}`);
        }
      }),
    );
    if (!verdict.decided) {
      log(`serving ${plan.targets.map((t) => vmDiskName(vm, t)).join(', ')} of VM backup ${record.id}; booting it`);
      const agentSocket = join(temp, 'qga.sock');
      started = performance.now();
      // Dies with us (setpriv --pdeathsig, where it exists): a killed check leaves no VM running.
      const [command, ...args] = withDeathSignal(['qemu-system-x86_64', ...qemuArgs(plan, sockets, agentSocket)]);
      const child = spawn(command!, args, { stdio: ['ignore', 'pipe', 'pipe'] });
      qemu = child;
      exited = new Promise<void>((resolve) => {
        child.once('exit', () => resolve());
        child.once('error', () => resolve());
      });
      let consoleText = '';
      let stderr = '';
      child.stdout!.setEncoding('utf8').on('data', (d: string) => {
        consoleText = (consoleText + d).slice(-CONSOLE_KEEP);
        // Whole lines only: the console's output arrives in pieces, and a pattern ending in $ must not match half a line.
        if (options.expect && !verdict.decided && options.expect.test(consoleText.slice(0, consoleText.lastIndexOf('\n') + 1))) {
          answeredAt = performance.now();
          verdict.pass();
        }
      });
      child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr = (stderr + d).slice(-8192)));
      child.once('error', (err) => verdict.fail(`qemu-system-x86_64: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'not found (Debian: qemu-system-x86)' : err.message}`));
      child.once('exit', (code, signal) => verdict.fail(`qemu-system-x86_64 exited (${code ?? signal}) before the guest answered${stderr.trim() ? `: ${stderr.trim().split('\n').at(-1)}` : ''}`));
      const timer = setTimeout(() => verdict.fail(`did not answer within ${timeoutS} s${options.expect ? ` (the console never matched ${options.expect})` : ' (the guest agent never answered guest-ping)'}`), timeoutS * 1000);
      if (!options.expect) {
        void agentAnswers(agentSocket, () => verdict.decided).then((answered) => {
          if (!answered || verdict.decided) return;
          answeredAt = performance.now();
          verdict.pass();
        });
      }
      await verdict.settled;
      clearTimeout(timer);
    }
    options.signal?.throwIfAborted();
    const ms = Math.round((answeredAt ?? performance.now()) - started);
    const ok = verdict.problem === '';
    return { vm, id: record.id, ok, ms, by, ...(ok ? {} : { problem: verdict.problem! }) };
  } finally {
    options.signal?.removeEventListener('abort', onAbort);
    verdict.fail('stopped');
    if (qemu && qemu.exitCode === null && qemu.signalCode === null) qemu.kill('SIGKILL');
    await exited;
    stopServers();
    await Promise.all(servers);
    // Each overlay's registration (made as it was opened, whether or not its server came up), by the real path it was made under.
    const realTemp = await realpath(temp).catch(() => temp);
    for (const target of plan.targets) await unpinBackup(repo, vmDiskName(vm, target), join(realTemp, `${target}.overlay`)).catch(() => undefined);
    await rm(temp, { recursive: true, force: true });
  }
}
