/**
 * `vm restore`: every disk of a VM backup written into one folder, with the
 * VM's definition pointing at them: libvirt's domain XML (`<vm>.xml`, each
 * backed-up disk's source and driver rewritten), or for a QEMU VM a JSON
 * definition (`<vm>.json`) and a script with the command line that boots it
 * (`<vm>.sh`). With `define`, the XML is registered in libvirt as a new
 * domain beside the original: a new name, and no UUID or MAC addresses, so
 * that libvirt makes new ones.
 *
 * Nothing is ever overwritten: every name is checked before the first byte is
 * read, each file is written under a temporary name in the folder and linked
 * to its own name only when whole (a link fails where a file appeared since).
 * On a failure, what this restore wrote is removed again.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { link, mkdir, rm, rmdir, stat, unlink, writeFile } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { promisify } from 'node:util';
import type { Repository } from '../store/repository.js';
import { restore } from '../store/restore.js';
import { findVmRecord, vmDiskName, type VmRecord } from '../store/vmRecord.js';
import { describeFsError, UsageError, VaultError } from '../util/errors.js';
import { DEFAULT_LIBVIRT_URI } from './defaults.js';
import { bootPlan, type PlacedDisk, qemuScript, rewriteDomainXml } from './vmDefinition.js';

const run = promisify(execFile);

export type VmRestoreFormat = 'qcow2' | 'raw' | 'vhd';

export interface VmRestoreOptions {
  backup?: string;
  format?: VmRestoreFormat;
  /** Define the restored VM in libvirt under this new name (libvirt-kind backups only). */
  define?: string;
  /** libvirt's URI for `define` (default: qemu:///system). */
  connect?: string;
  onProgress?: (done: number, total: number, bytes: number) => void;
  signal?: AbortSignal;
}

export interface VmRestoreReport {
  vm: string;
  id: string;
  dir: string;
  disks: Record<string, { path: string; format: VmRestoreFormat; bytes: number }>;
  /** The definition written: `<vm>.xml` (libvirt) or `<vm>.json` (QEMU). */
  definition: string;
  /** The domain defined in libvirt, or null. */
  defined: string | null;
}

const EXTENSION: Record<VmRestoreFormat, string> = { qcow2: 'qcow2', raw: 'raw', vhd: 'vhd' };
const DRIVER: Record<VmRestoreFormat, PlacedDisk['driver']> = { qcow2: 'qcow2', raw: 'raw', vhd: 'vpc' };

/** libvirt's domain names: what virsh accepts without quoting surprises. */
function checkDomainName(name: string): string {
  if (!/^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$/.test(name)) throw new UsageError(`--define ${name}: a domain name is letters, digits, '_', '.', '+' or '-' (at most 64)`);
  return name;
}

async function virsh(uri: string, ...args: string[]): Promise<string> {
  try {
    return (await run('virsh', ['-q', '-c', uri, ...args], { maxBuffer: 16 * 1024 * 1024 })).stdout;
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: string };
    if (e.code === 'ENOENT') throw new VaultError('virsh', 'not found: --define needs libvirt\'s client (Debian: libvirt-clients)');
    throw new VaultError(`virsh -c ${uri} ${args[0]}`, (e.stderr ?? e.message).trim().split('\n')[0]!.replace(/^error:\s*/, ''));
  }
}

/** The folder: used as it is, or made when its parent exists (a mistyped parent is an error, not a tree of new folders). */
async function prepareDir(dir: string): Promise<boolean> {
  const s = await stat(dir).catch(() => null);
  if (s) {
    if (!s.isDirectory()) throw new VaultError(dir, 'is not a folder');
    return false;
  }
  try {
    await mkdir(dir);
    return true;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new VaultError(dir, code === 'ENOENT' ? `its parent folder ${dirname(dir)} does not exist` : describeFsError(err));
  }
}

/** `temp` under `final`'s name, unless something has that name by now. */
async function publish(temp: string, final: string): Promise<void> {
  try {
    await link(temp, final);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') throw new VaultError(final, 'exists: vm restore never overwrites a file (pick another folder, or move it away)');
    throw new VaultError(final, describeFsError(err));
  } finally {
    await unlink(temp).catch(() => undefined);
  }
}

/** Restore every disk of VM backup `options.backup` (else the newest) of `vm` into `dir`, with its definition. */
export async function vmRestore(repo: Repository, vm: string, dirGiven: string, options: VmRestoreOptions = {}): Promise<VmRestoreReport> {
  const format = options.format ?? 'qcow2';
  const record = await findVmRecord(repo, vm, options.backup);
  const libvirt = record.definition.kind === 'libvirt';
  if (options.define !== undefined) {
    if (!libvirt) throw new UsageError(`--define registers a libvirt domain, and VM backup ${record.id} of "${vm}" is of a QEMU VM without libvirt (restore it without --define: ${vm}.sh boots it)`);
    checkDomainName(options.define);
  } else if (options.connect !== undefined) throw new UsageError('--connect goes with --define');
  const dir = resolve(dirGiven);
  const targets = Object.keys(record.disks);
  const disks: Record<string, PlacedDisk> = Object.fromEntries(targets.map((t) => [t, { path: join(dir, `${vm}.${t}.${EXTENSION[format]}`), driver: DRIVER[format] }]));
  const definitionPath = join(dir, `${vm}.${libvirt ? 'xml' : 'json'}`);
  const scriptPath = libvirt ? null : join(dir, `${vm}.sh`);
  const finals = [...Object.values(disks).map((d) => d.path), definitionPath, ...(scriptPath ? [scriptPath] : [])];
  // Every refusal before anything is written.
  for (const path of finals) {
    if (await stat(path).catch(() => null)) throw new VaultError(path, 'exists: vm restore never overwrites a file (pick another folder, or move it away)');
  }
  const uri = options.connect ?? DEFAULT_LIBVIRT_URI;
  if (options.define !== undefined && (await domainExists(uri, options.define))) {
    throw new VaultError(options.define, `a domain of this name exists in libvirt (${uri}): pick another name for the restored copy`);
  }
  const madeDir = await prepareDir(dir);
  const written: string[] = [];
  const tag = `.vhdvault-${randomBytes(4).toString('hex')}`;
  const temps: string[] = [];
  const temp = (final: string, suffix = '') => {
    const path = join(dir, `${tag}-${basename(final)}${suffix}`);
    temps.push(path);
    return path;
  };
  try {
    const report: VmRestoreReport['disks'] = {};
    const total = await totalBytes(repo, record);
    let before = 0;
    for (const target of targets) {
      options.signal?.throwIfAborted();
      const final = disks[target]!.path;
      const name = vmDiskName(vm, target);
      const out = temp(final);
      const onProgress = options.onProgress ? (_d: number, _t: number, bytes: number) => options.onProgress!(before + bytes, total, before + bytes) : undefined;
      if (format === 'qcow2') {
        const raw = temp(final, '.raw');
        const r = await restore(repo, name, raw, { backup: record.disks[target], format: 'raw', onProgress });
        before += r.size;
        await run('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, out]).catch((err: NodeJS.ErrnoException & { stderr?: string }) => {
          throw new VaultError(final, err.code === 'ENOENT' ? 'qemu-img not found: the qcow2 format needs it (Debian: qemu-utils), or give --format raw or vhd' : `qemu-img convert failed: ${(err.stderr ?? err.message).trim()}`);
        });
        await rm(raw, { force: true });
      } else {
        const r = await restore(repo, name, out, { backup: record.disks[target], format, onProgress });
        before += r.size;
      }
      await publish(out, final);
      written.push(final);
      report[target] = { path: final, format, bytes: (await stat(final)).size };
    }
    let defined: string | null = null;
    if (record.definition.kind === 'libvirt') {
      const xml = rewriteDomainXml(record.definition.xml, disks, options.define);
      const t = temp(definitionPath);
      await writeFile(t, xml, { flag: 'wx' });
      await publish(t, definitionPath);
      written.push(definitionPath);
      if (options.define !== undefined) {
        await virsh(uri, 'define', definitionPath);
        defined = options.define;
      }
    } else {
      const plan = bootPlan(record.definition, targets);
      const definition = { ...record.definition, disks: record.definition.disks.filter((d) => disks[d.target]).map((d) => ({ ...d, format: disks[d.target]!.driver, file: disks[d.target]!.path })) };
      const t = temp(definitionPath);
      await writeFile(t, `${JSON.stringify({ vm, id: record.id, definition }, null, 2)}\n`, { flag: 'wx' });
      await publish(t, definitionPath);
      written.push(definitionPath);
      const s = temp(scriptPath!);
      await writeFile(s, qemuScript(plan, disks, record.definition.agent ? join(dir, `${vm}.qga.sock`) : null), { flag: 'wx', mode: 0o755 });
      await publish(s, scriptPath!);
      written.push(scriptPath!);
    }
    return { vm, id: record.id, dir, disks: report, definition: definitionPath, defined };
  } catch (err) {
    for (const path of [...temps, ...written]) await rm(path, { force: true }).catch(() => undefined);
    if (madeDir) await rmdir(dir).catch(() => undefined);
    throw err;
  }
}

async function domainExists(uri: string, name: string): Promise<boolean> {
  const names = (await virsh(uri, 'list', '--all', '--name')).split('\n').map((n) => n.trim());
  return names.includes(name);
}

/** The disks' sizes together, for one progress over all of them. */
async function totalBytes(repo: Repository, record: VmRecord): Promise<number> {
  let total = 0;
  for (const [target, id] of Object.entries(record.disks)) total += (await repo.backup(vmDiskName(record.vm, target), id)).size;
  return total;
}
