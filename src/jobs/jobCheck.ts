/**
 * `job check` past the file itself: what a run would meet, looked at without
 * running anything. Each repository is an initialised one; each source, socket
 * and folder the job names is there and is the kind of thing it should be.
 * What only a run can reach (an object store, a TCP server, a libvirt domain)
 * is said to be not checked.
 */
import { constants, type Stats } from 'node:fs';
import { access, stat } from 'node:fs/promises';
import type { NbdEndpoint } from '../nbd/uri.js';
import { Repository } from '../store/repository.js';
import { describeFsError } from '../util/errors.js';
import type { Job, JobDisk, JobVm } from './jobFile.js';

export interface PlacesChecked {
  /** One line each, naming the disk, VM or key. */
  problems: string[];
  /** What only a run can reach, one line each. */
  unchecked: string[];
}

type Kind = 'source' | 'socket' | 'folder';

const KIND_TEST: Record<Kind, [(s: Stats) => boolean, string]> = {
  // A raw image, a VHD file or VHD folder, or a device.
  source: [(s) => s.isFile() || s.isDirectory() || s.isBlockDevice(), 'is not a file, folder or block device'],
  socket: [(s) => s.isSocket(), 'is not a socket'],
  folder: [(s) => s.isDirectory(), 'is not a folder'],
};

/** Why `path` cannot serve as a `kind`, or null. */
async function placeProblem(path: string, kind: Kind): Promise<string | null> {
  try {
    const s = await stat(path);
    const [fits, problem] = KIND_TEST[kind];
    if (!fits(s)) return problem;
    // Sockets are connected to, not read; a folder is written in, a source read.
    if (kind !== 'socket') await access(path, kind === 'folder' ? constants.W_OK : constants.R_OK);
    return null;
  } catch (err) {
    return describeFsError(err);
  }
}

/** What the checks of one job share: where they note problems, and what they cannot check. */
interface Checker {
  place(who: string, path: string, kind: Kind): Promise<void>;
  endpoint(who: string, e: NbdEndpoint): Promise<void>;
  unchecked(line: string): void;
}

/** Every place a job names, checked; problems and what was not checked, a line each. */
export async function checkJobPlaces(job: Job): Promise<PlacesChecked> {
  const out: PlacesChecked = { problems: [], unchecked: [] };
  const checker: Checker = {
    async place(who, path, kind) {
      const problem = await placeProblem(path, kind);
      if (problem !== null) out.problems.push(`${who}: ${path}: ${problem}`);
    },
    async endpoint(who, e) {
      if (e.transport === 'unix') await checker.place(who, e.socket, 'socket');
      else checker.unchecked(`${who}: ${e.host}:${e.port} (a TCP server is reached only by a run)`);
    },
    unchecked: (line) => out.unchecked.push(line),
  };
  await repository(out, 'repository', job.repository);
  if (job.replicate) await repository(out, 'replicate.repository', job.replicate.repository);
  if (job.healthCheck?.scratch) await checker.place('healthCheck.scratch', job.healthCheck.scratch, 'folder');
  for (const disk of job.disks) await checkDisk(disk, checker);
  for (const vm of job.vms) await checkVm(vm, checker);
  return out;
}

async function repository(out: PlacesChecked, key: string, where: string): Promise<void> {
  if (where.startsWith('s3://')) {
    out.unchecked.push(`${key}: ${where} (an object store is reached only by a run)`);
    return;
  }
  await Repository.open(where).catch((err: Error) => out.problems.push(`${key}: ${err.message}`));
}

async function checkDisk(disk: JobDisk, c: Checker): Promise<void> {
  const who = `disk ${disk.name}`;
  if (disk.kind === 'file') return c.place(`${who}: source`, disk.path, 'source');
  if (disk.kind === 'nbd') return c.endpoint(`${who}: source`, disk.address.endpoint);
  await c.place(`${who}: qmp`, disk.qmp, 'socket');
  if (disk.fleecing !== undefined) await c.place(`${who}: fleecing`, disk.fleecing, 'folder');
  if (disk.qemuNbd !== undefined) await c.endpoint(`${who}: qemuNbd`, disk.qemuNbd);
}

async function checkVm(vm: JobVm, c: Checker): Promise<void> {
  const who = `VM ${vm.name}`;
  if (vm.kind === 'libvirt') return c.unchecked(`${who}: libvirt domain ${vm.domain} on ${vm.connect} (asked of libvirt only by a run)`);
  await c.place(`${who}: qmp`, vm.qmp, 'socket');
  if (vm.qga !== undefined) await c.place(`${who}: qga`, vm.qga, 'socket');
  if (vm.fleecing !== undefined) await c.place(`${who}: fleecing`, vm.fleecing, 'folder');
}
