/**
 * Job files: one YAML file per scheduled backup job (docs/jobs.md).
 *
 * The zod schema checks each value (type, range, cron, time zone, names); then
 * toJob checks what depends on several keys (a disk's kind, unique names) and
 * resolves paths against the job file's folder, so a runner gets ready values.
 * Every problem is one line, `<file>: <key.path>: <what was expected>`, as a
 * UsageError (the CLI exits 2). Unknown keys are errors: a typo such as
 * `keeplast` would otherwise silently keep every backup.
 */
import { constants } from 'node:fs';
import { type FileHandle, open } from 'node:fs/promises';
import { dirname, isAbsolute, resolve } from 'node:path';
import { isNode, isScalar, LineCounter, parseDocument, visit, type YAMLError } from 'yaml';
import { z } from 'zod';
import { parseRate } from '../util/sizes.js';
import { isNbdUri, type NbdAddress, type NbdEndpoint, parseNbdUri } from '../nbd/uri.js';
import { checkDiskName } from '../store/names.js';
import { KEEP_OPTIONS, type KeepOption, type RetentionPolicy } from '../store/retention.js';
import { describeFsError, UsageError } from '../util/errors.js';
import { nearest } from '../util/suggest.js';
import { checkSchedule, checkTimezone } from './schedule.js';
import { DEFAULT_LIBVIRT_URI } from '../live/defaults.js';

/** Job files are small; the cap bounds the memory a wrong path (an image, a log) can take. */
export const MAX_JOB_FILE_BYTES = 1024 * 1024;

export type Verify = 'none' | 'new' | 'all';

export type JobDisk =
  | { kind: 'file'; name: string; /** Absolute. */ path: string; /** `from: raw`: read as raw even if named .vhd. */ fromRaw: boolean }
  | { kind: 'nbd'; name: string; /** As written (what `backup --source` takes). */ uri: string; address: NbdAddress; /** The `bitmap` key or the URI's ?bitmap=, or null. */ bitmap: string | null }
  | {
      kind: 'qemu';
      name: string;
      /** QMP socket, absolute. */
      qmp: string;
      node: string;
      device?: string;
      /** Fleecing folder, absolute; without it, direct mode. */
      fleecing?: string;
      /** Bytes. */
      fleecingMax?: number;
      qemuNbd?: NbdEndpoint;
      /** Seconds. */
      cbwTimeout?: number;
    };

/** A whole VM (vm backup): every disk at one instant, kept and pruned as a unit. */
export type JobVm =
  | { kind: 'libvirt'; name: string; domain: string; connect: string }
  | {
      kind: 'qemu';
      name: string;
      /** QMP socket, absolute. */
      qmp: string;
      /** Guest agent socket, absolute. */
      qga?: string;
      /** Fleecing folder, absolute; without it, direct mode. */
      fleecing?: string;
    };

export interface Job {
  /** The job file, absolute. */
  file: string;
  name: string;
  schedule: string;
  /** IANA zone as written, or null: the local zone of the process running the job. */
  timezone: string | null;
  /** Absolute. */
  repository: string;
  /** Disks backed up at once. */
  concurrency: number;
  /** Every Nth backup of a disk is full: full when its chain since the last full has N-1 deltas. Null: only the first. */
  fullInterval: number | null;
  /** Bytes per second, or null for no limit. */
  maxRead: number | null;
  maxWrite: number | null;
  /** Every backup with --idle-priority: on spare CPU time only. */
  idlePriority: boolean;
  verify: Verify;
  /** Null: off. `scratch` null: a temporary folder of the runner's choosing. `boot`: each VM's newest backup is booted (vm boot-check). */
  healthCheck: { scratch: string | null; boot: boolean } | null;
  /** Null: backups are never pruned. */
  retention: RetentionPolicy | null;
  replicate: { repository: string; retention: RetentionPolicy | null } | null;
  disks: JobDisk[];
  vms: JobVm[];
}

/** A bad job file: one line naming the file and, where there is one, the key. */
export class JobFileError extends UsageError {
  constructor(
    readonly file: string,
    readonly keyPath: string | null,
    readonly problem: string,
  ) {
    // Values from the file may hold newlines or control characters: the line stays one line.
    super(`${file}: ${keyPath === null ? '' : `${keyPath}: `}${problem}`.replace(/[\u0000-\u001f\u007f]/g, (c) => JSON.stringify(c).slice(1, -1)));
    this.name = 'JobFileError';
  }
}

/** Every problem of a job file, each its own JobFileError and its own line. */
export class JobFileErrors extends UsageError {
  constructor(readonly problems: JobFileError[]) {
    super(problems.map((p) => p.message).join('\n'));
    this.name = 'JobFileErrors';
  }
}

/** One problem as itself; several as one error listing them all. */
const allOf = (problems: JobFileError[]): UsageError => (problems.length === 1 ? problems[0]! : new JobFileErrors(problems));

/** What a value is, for "expected X, got Y". */
function describe(value: unknown): string {
  if (value === undefined) return 'nothing';
  if (value === null) return 'an empty value';
  if (Array.isArray(value)) return 'a list';
  if (typeof value === 'string') return quote(value);
  if (typeof value === 'number' || typeof value === 'boolean') return String(value);
  if (value instanceof Uint8Array) return 'binary data';
  return 'a mapping';
}

/** A string from the file, quoted and cut short enough for one line. */
function quote(text: string, max = 60): string {
  return text.length > max ? `${JSON.stringify(text.slice(0, max - 1)).slice(0, -1)}…"` : JSON.stringify(text);
}

/** `['disks', 1, 'source']` → `disks[1].source`. */
function formatPath(path: readonly PropertyKey[]): string {
  let out = '';
  for (const key of path) {
    if (typeof key === 'number') out += `[${key}]`;
    else {
      const name = String(key);
      const shown = /^[A-Za-z_][\w-]*$/.test(name) ? name : quote(name, 40);
      out += out === '' ? shown : `.${shown}`;
    }
  }
  return out;
}

const expected = (what: string) => ({ error: (issue: { input?: unknown }) => (issue.input === undefined ? `missing: expected ${what}` : `expected ${what}, got ${describe(issue.input)}`) });

function unknownKey(key: string, known: readonly string[]): string {
  const near = nearest(key, known);
  return near ? `unknown key (did you mean ${near}?)` : `unknown key (known here: ${known.join(', ')})`;
}

/** A mapping that refuses unknown keys: the message has a line for each, reported at the key's own path (zodProblems). */
function mapping<T extends z.ZodRawShape>(what: string, shape: T) {
  const known = Object.keys(shape);
  return z.strictObject(shape, {
    error: (issue) => (issue.code === 'unrecognized_keys' ? issue.keys.map((key) => unknownKey(key, known)).join('\n') : expected(what).error(issue)),
  });
}

const whole = (what: string, max = Number.MAX_SAFE_INTEGER) => z.number(expected(what)).int(expected(what)).min(1, expected(what)).max(max, expected(what));
const text = (what: string) => z.string(expected(what)).min(1, expected(what));
// Relative paths are resolved in toJob, against the job file's folder.
const pathText = (what: string) => text(what).refine((s) => !s.includes('\0'), expected(`${what} (no NUL byte)`));

/** Bytes from a number or a size string ("4G", "20M/s"): parseSize's syntax, as the CLI's --max-read and --fleecing-max. */
function bytes(what: string) {
  return z.union([z.number(), z.string()], expected(what)).transform((value, ctx) => {
    let n = Number.NaN;
    if (typeof value === 'number') n = value;
    else {
      try {
        n = parseRate(value);
      } catch {
        // Not a size: reported below as what was expected.
      }
    }
    if (!Number.isSafeInteger(n) || n <= 0) {
      ctx.addIssue({ code: 'custom', message: `expected ${what}, got ${describe(value)}` });
      return z.NEVER;
    }
    return n;
  });
}
const RATE = 'a rate such as "20M" (bytes per second; K, M, G, T are binary units)';

const NAME_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit, no '..'";
function isSafeName(name: string): boolean {
  try {
    checkDiskName(name);
    return true;
  } catch {
    return false;
  }
}
const safeName = (what: string) => z.string(expected(`${what} (${NAME_RULE})`)).refine(isSafeName, expected(`${what} of ${NAME_RULE}`));

const KEEP_KEYS = KEEP_OPTIONS.map((o) => `keep${o[0]!.toUpperCase()}${o.slice(1)}`);
const retentionSchema = mapping(
  `a mapping of ${KEEP_KEYS.join(', ')}`,
  Object.fromEntries(KEEP_KEYS.map((key) => [key, whole('a whole number of at least 1').optional()])) as Record<string, z.ZodOptional<ReturnType<typeof whole>>>,
)
  .refine((r) => Object.values(r).some((n) => n !== undefined), { error: `expected at least one of ${KEEP_KEYS.join(', ')}` })
  .transform((r): RetentionPolicy => {
    const policy: RetentionPolicy = {};
    KEEP_OPTIONS.forEach((option: KeepOption, i) => {
      const n = r[KEEP_KEYS[i]!];
      if (n !== undefined) policy[option] = n;
    });
    return policy;
  });

const QEMU_KEYS = ['qmp', 'node', 'device', 'fleecing', 'fleecingMax', 'qemuNbd', 'cbwTimeout'] as const;

const diskSchema = mapping('a disk: name + source (a path or an nbd:// URI), or name + qmp + node', {
  name: safeName('a disk name'),
  source: pathText('a path, an nbd:// URI, or qmp + node').optional(),
  from: z.literal('raw', expected('raw (read the file as a raw image whatever its name)')).optional(),
  bitmap: text('a dirty bitmap name').optional(),
  qmp: pathText("the QMP socket of the disk's QEMU").optional(),
  node: text('a QEMU node name').optional(),
  // QEMU's id syntax, as backup --device: the id becomes part of a QOM path.
  device: z
    .string(expected('a QEMU device id'))
    .regex(/^[A-Za-z][A-Za-z0-9._-]{0,127}$/, expected("a QEMU device id (a letter, then letters, digits, '.', '_' or '-')"))
    .optional(),
  fleecing: pathText('a fleecing folder').optional(),
  fleecingMax: bytes('a size such as "4G"').optional(),
  qemuNbd: text("the address of QEMU's own NBD server (nbd+unix:///?socket=/path or nbd://host:port)").optional(),
  cbwTimeout: whole('a whole number of seconds from 1 to 9999999', 9_999_999).optional(),
});
type DiskEntry = z.infer<typeof diskSchema>;

const vmSchema = mapping('a VM: name + libvirt (a domain), or name + qmp (a QEMU VM\'s QMP socket)', {
  name: z.string(expected('a VM name')).refine((n) => isSafeName(n) && !n.includes('.'), expected("a VM name of 1-128 letters, digits, '_' or '-', starting with a letter or digit (no '.')")),
  libvirt: text('a libvirt domain name').optional(),
  connect: text("libvirt's URI, such as qemu:///system").optional(),
  qmp: pathText("the QMP socket of the VM's QEMU").optional(),
  qga: pathText("the guest agent's socket").optional(),
  fleecing: pathText('a fleecing folder').optional(),
});
type VmEntry = z.infer<typeof vmSchema>;

const TIMEZONE = 'an IANA time zone such as "Europe/Berlin"';

const jobSchema = mapping('a mapping of job keys (name, schedule, repository, disks, …)', {
  name: safeName('a job name'),
  schedule: z.string(expected('a cron schedule such as "0 3 * * *"')).superRefine((schedule, ctx) => {
    const problem = checkSchedule(schedule);
    if (problem !== null) ctx.addIssue({ code: 'custom', message: problem });
  }),
  timezone: z
    .string(expected(TIMEZONE))
    .refine((zone) => checkTimezone(zone) !== null, expected(TIMEZONE))
    .optional(),
  repository: pathText('the path of a repository folder, or s3://bucket/prefix'),
  // Each disk runs its own worker pool, so a bound like backup --concurrency's.
  concurrency: whole('a whole number from 1 to 64 (disks backed up at once)', 64).default(1),
  fullInterval: whole('a whole number of at least 1 (every Nth backup of a disk is full)').optional(),
  maxRead: bytes(RATE).optional(),
  maxWrite: bytes(RATE).optional(),
  idlePriority: z.boolean(expected('true or false')).default(false),
  verify: z.enum(['none', 'new', 'all'], expected('none, new or all')).default('none'),
  // true is {} (a temporary scratch folder), false is off, boot is { boot: true }.
  healthCheck: z
    .preprocess(
      (v) => (v === true ? {} : v === false ? undefined : v === 'boot' ? { boot: true } : v),
      mapping('true, false, boot, or a mapping with scratch: <folder> and boot: true|false', { scratch: pathText('a scratch folder').optional(), boot: z.boolean(expected('true or false')).optional() }).optional(),
    )
    .optional(),
  retention: retentionSchema.optional(),
  replicate: mapping('a mapping with repository (and retention)', {
    repository: pathText('the path of a second repository folder'),
    retention: retentionSchema.optional(),
  }).optional(),
  disks: z.array(diskSchema, expected('a list of disks')).optional(),
  vms: z.array(vmSchema, expected('a list of VMs')).optional(),
});
type JobEntry = z.infer<typeof jobSchema>;

/**
 * Every problem zod found, each a JobFileError. A mapping
 * with an unknown key says only that: a misspelt key also leaves its real one
 * missing, and the mapping's own checks fail for want of it.
 */
function zodProblems(file: string, error: z.ZodError, value: unknown): JobFileError[] {
  const unknownAt = new Set(error.issues.filter((i) => i.code === 'unrecognized_keys').map((i) => formatPath(i.path)));
  const explained = (issue: z.core.$ZodIssue) => issue.code !== 'unrecognized_keys' && (unknownAt.has(formatPath(issue.path)) || (issue.message.startsWith('missing:') && unknownAt.has(formatPath(issue.path.slice(0, -1)))));
  return error.issues.filter((issue) => !explained(issue)).flatMap((issue) => {
    if (issue.code === 'unrecognized_keys') {
      const messages = issue.message.split('\n');
      return issue.keys.map((key, i) => new JobFileError(file, formatPath([...issue.path, key]), messages[i] ?? 'unknown key'));
    }
    if (issue.path.length > 0) return [new JobFileError(file, formatPath(issue.path), issue.message)];
    const problem = value === null || value === undefined ? 'the file is empty: expected a mapping of job keys (name, schedule, repository, disks, …)' : issue.message;
    return [new JobFileError(file, null, problem)];
  });
}

/** Parse a job file's text; `file` names it in errors and anchors its relative paths. */
export function parseJob(text: string, file: string): Job {
  if (Buffer.byteLength(text, 'utf8') > MAX_JOB_FILE_BYTES) throw new JobFileError(file, null, `larger than ${MAX_JOB_FILE_BYTES / 1048576} MiB: not a job file`);
  const lineCounter = new LineCounter();
  const doc = parseDocument(text, { lineCounter, prettyErrors: false, uniqueKeys: true });
  const at = (offset: number) => {
    const { line, col } = lineCounter.linePos(offset);
    return `line ${line}, column ${col}`;
  };
  // Warnings too (an unknown !tag would otherwise be dropped silently).
  const yamlProblem: YAMLError | undefined = doc.errors[0] ?? doc.warnings[0];
  if (yamlProblem) throw new JobFileError(file, at(yamlProblem.pos[0]), `not valid YAML: ${yamlProblem.message}`);
  // A mapping or list as a key would be stringified by toJS, with a process warning on stderr.
  let complexKey: number | null = null;
  visit(doc, {
    Pair(_, pair) {
      if (isNode(pair.key) && !isScalar(pair.key)) {
        complexKey = pair.key.range?.[0] ?? 0;
        return visit.BREAK;
      }
      return undefined;
    },
  });
  if (complexKey !== null) throw new JobFileError(file, at(complexKey), 'expected a plain key, got a list or mapping as a key');
  let value: unknown;
  try {
    // The alias cap stops a "billion laughs" file from expanding without bound.
    value = doc.toJS({ maxAliasCount: 100 });
  } catch (err) {
    throw new JobFileError(file, null, `not usable YAML: ${(err as Error).message}`);
  }
  const parsed = jobSchema.safeParse(value);
  if (!parsed.success) throw allOf(zodProblems(file, parsed.error, value));
  return toJob(parsed.data, file);
}

/** Read and parse a job file. */
export async function loadJob(file: string): Promise<Job> {
  return parseJob(await readJobFile(file), file);
}

async function readJobFile(file: string): Promise<string> {
  const fail = (problem: string) => new JobFileError(file, null, problem);
  let handle: FileHandle;
  try {
    // O_NONBLOCK: opening a FIFO must not wait for a writer (the stat below refuses it).
    handle = await open(file, constants.O_RDONLY | constants.O_NONBLOCK);
  } catch (err) {
    throw fail(`cannot read: ${describeFsError(err)}`);
  }
  try {
    const stats = await handle.stat();
    if (stats.isDirectory()) throw fail('is a directory, not a job file');
    if (!stats.isFile()) throw fail('not a regular file');
    const tooBig = fail(`larger than ${MAX_JOB_FILE_BYTES / 1048576} MiB: not a job file`);
    if (stats.size > MAX_JOB_FILE_BYTES) throw tooBig;
    // At most one byte past the cap, whatever the size said: the file may be growing.
    const buffer = Buffer.alloc(MAX_JOB_FILE_BYTES + 1);
    let length = 0;
    for (;;) {
      const { bytesRead } = await handle.read(buffer, length, buffer.length - length, length);
      if (bytesRead === 0) break;
      length += bytesRead;
      if (length === buffer.length) throw tooBig;
    }
    try {
      return new TextDecoder('utf-8', { fatal: true }).decode(buffer.subarray(0, length));
    } catch {
      throw fail('not UTF-8 text');
    }
  } catch (err) {
    if (err instanceof JobFileError) throw err;
    throw fail(`cannot read: ${describeFsError(err)}`);
  } finally {
    await handle.close();
  }
}

/** The checks that span keys, and paths resolved against the job file's folder; every problem found, not the first. */
function toJob(entry: JobEntry, file: string): Job {
  const problems: JobFileError[] = [];
  const fail = (path: PropertyKey[], problem: string) => new JobFileError(file, formatPath(path), problem);
  // Each check on its own: a problem is noted, and the next check still runs.
  const check = <T>(fn: () => T): T | null => {
    try {
      return fn();
    } catch (err) {
      if (!(err instanceof JobFileError)) throw err;
      problems.push(err);
      return null;
    }
  };
  const dir = dirname(resolve(file));
  // A folder is relative to the job file; an object store's URI is taken as written.
  const place = (where: string) => (where.startsWith('s3://') ? where : resolve(dir, where));
  const repository = place(entry.repository);
  if ((entry.disks?.length ?? 0) + (entry.vms?.length ?? 0) === 0) problems.push(fail(['disks'], 'expected at least one disk (disks:) or VM (vms:)'));
  const disks = checkEach(entry.disks ?? [], 'disk', 'disks', fail, (disk, i) => check(() => toDisk(disk, dir, (key, problem) => fail(['disks', i, key], problem))), problems);
  const vms = checkEach(entry.vms ?? [], 'VM', 'vms', fail, (vm, i) =>
    check(() => {
      // A VM's disks are <vm>.<target>: a plain disk of such a name would be pruned as the VM's.
      const clash = disks.find((d) => d.name.startsWith(`${vm.name}.`));
      if (clash) throw fail(['vms', i, 'name'], `expected a VM name no disk name starts with, got ${quote(vm.name)} (disk ${quote(clash.name)} would be taken for one of its disks)`);
      return toVm(vm, dir, (key, problem) => fail(['vms', i, key], problem));
    }), problems);
  let replicate: Job['replicate'] = null;
  if (entry.replicate) {
    const other = place(entry.replicate.repository);
    // Replicating into the primary itself would prune it with the other policy.
    if (other === repository) problems.push(fail(['replicate', 'repository'], `expected a repository other than repository (${repository})`));
    replicate = { repository: other, retention: entry.replicate.retention ?? null };
  }
  const healthCheck = entry.healthCheck ? { scratch: entry.healthCheck.scratch === undefined ? null : resolve(dir, entry.healthCheck.scratch), boot: entry.healthCheck.boot === true } : null;
  if (healthCheck?.boot && (entry.vms?.length ?? 0) === 0) problems.push(fail(['healthCheck', 'boot'], 'boots VM backups, and the job has no vms:'));
  if (entry.idlePriority) {
    // Direct mode: the guest's writes wait for the backup's copies, which must not wait for spare CPU (as backup --idle-priority refuses).
    const direct = (list: 'disks' | 'vms', i: number) => problems.push(fail([list, i, 'fleecing'], 'missing: idlePriority needs a fleecing folder for a running QEMU disk (in direct mode the guest waits for the backup)'));
    // The entries as written: their indexes are the file's, whatever else was wrong with them.
    (entry.disks ?? []).forEach((d, i) => d.qmp !== undefined && d.fleecing === undefined && direct('disks', i));
    (entry.vms ?? []).forEach((v, i) => v.qmp !== undefined && v.fleecing === undefined && direct('vms', i));
  }
  if (problems.length > 0) throw allOf(problems);
  return {
    file: resolve(file),
    name: entry.name,
    schedule: entry.schedule,
    timezone: entry.timezone ?? null,
    repository,
    concurrency: entry.concurrency,
    fullInterval: entry.fullInterval ?? null,
    maxRead: entry.maxRead ?? null,
    maxWrite: entry.maxWrite ?? null,
    idlePriority: entry.idlePriority,
    verify: entry.verify,
    healthCheck,
    retention: entry.retention ?? null,
    replicate,
    disks,
    vms,
  };
}

/** Each entry of a list made (null: a problem, noted), its name unique in the list. */
function checkEach<E extends { name: string }, T>(entries: E[], what: string, key: string, fail: (path: PropertyKey[], problem: string) => JobFileError, make: (entry: E, i: number) => T | null, problems: JobFileError[]): T[] {
  const seen = new Map<string, number>();
  return entries.flatMap((entry, i) => {
    const first = seen.get(entry.name);
    if (first !== undefined) {
      problems.push(fail([key, i, 'name'], `expected a name no other ${what} has, got ${quote(entry.name)} again (as ${key}[${first}])`));
      return [];
    }
    seen.set(entry.name, i);
    const made = make(entry, i);
    return made === null ? [] : [made];
  });
}

function toVm(vm: VmEntry, dir: string, fail: (key: keyof VmEntry, problem: string) => JobFileError): JobVm {
  if ((vm.libvirt === undefined) === (vm.qmp === undefined)) throw fail('libvirt', 'expected either libvirt (a domain) or qmp (a QEMU VM\'s QMP socket)');
  if (vm.libvirt !== undefined) {
    for (const key of ['qga', 'fleecing'] as const) if (vm[key] !== undefined) throw fail(key, 'only for a QEMU VM (qmp), not with libvirt');
    return { kind: 'libvirt', name: vm.name, domain: vm.libvirt, connect: vm.connect ?? DEFAULT_LIBVIRT_URI };
  }
  if (vm.connect !== undefined) throw fail('connect', 'only with libvirt');
  const result: JobVm = { kind: 'qemu', name: vm.name, qmp: resolve(dir, vm.qmp!) };
  if (vm.qga !== undefined) result.qga = resolve(dir, vm.qga);
  if (vm.fleecing !== undefined) result.fleecing = resolve(dir, vm.fleecing);
  return result;
}

function parseUri(uri: string, bad: (problem: string) => JobFileError): NbdAddress {
  let address: NbdAddress;
  try {
    address = parseNbdUri(uri);
  } catch (err) {
    throw err instanceof UsageError ? bad(err.message) : err;
  }
  // Relative to what? The job may run from any folder: say it in full.
  if (address.endpoint.transport === 'unix' && !isAbsolute(address.endpoint.socket)) throw bad(`expected an absolute socket path in ${quote(uri)}, got ${quote(address.endpoint.socket)}`);
  return address;
}

function toDisk(disk: DiskEntry, dir: string, fail: (key: keyof DiskEntry, problem: string) => JobFileError): JobDisk {
  const { name, source, from, bitmap, qmp } = disk;
  if (source !== undefined && qmp !== undefined) throw fail('qmp', 'expected either source or qmp (a running QEMU disk), not both');
  if (source === undefined && qmp === undefined) throw fail('source', 'expected a path, an nbd:// URI, or qmp + node');
  if (source !== undefined) {
    const qemuKey = QEMU_KEYS.find((key) => disk[key] !== undefined);
    if (qemuKey) throw fail(qemuKey, 'only for a QEMU disk (qmp + node), not with source');
    if (!isNbdUri(source)) {
      if (bitmap !== undefined) throw fail('bitmap', 'a bitmap needs an NBD source (nbd://… or nbd+unix://…)');
      return { kind: 'file', name, path: resolve(dir, source), fromRaw: from === 'raw' };
    }
    if (from !== undefined) throw fail('from', 'only for a file source (an NBD export is read as raw)');
    const address = parseUri(source, (problem) => fail('source', problem));
    if (bitmap !== undefined && address.bitmap !== null && bitmap !== address.bitmap) throw fail('bitmap', `"${bitmap}" and the source's bitmap=${address.bitmap} differ: give one`);
    return { kind: 'nbd', name, uri: source, address, bitmap: bitmap ?? address.bitmap };
  }
  if (bitmap !== undefined) throw fail('bitmap', "not for a QEMU disk (vhdvault's own checkpoint bitmaps say what changed)");
  if (from !== undefined) throw fail('from', 'only for a file source');
  if (disk.node === undefined) throw fail('node', "expected a QEMU node name with qmp (the guest's raw passthrough node, or with device the disk node the device uses)");
  if (disk.fleecingMax !== undefined && disk.fleecing === undefined) throw fail('fleecingMax', 'needs fleecing: <folder> (direct mode keeps no fleecing image)');
  const result: JobDisk = { kind: 'qemu', name, qmp: resolve(dir, qmp!), node: disk.node };
  if (disk.device !== undefined) result.device = disk.device;
  if (disk.fleecing !== undefined) result.fleecing = resolve(dir, disk.fleecing);
  if (disk.fleecingMax !== undefined) result.fleecingMax = disk.fleecingMax;
  if (disk.qemuNbd !== undefined) result.qemuNbd = parseUri(disk.qemuNbd, (problem) => fail('qemuNbd', problem)).endpoint;
  if (disk.cbwTimeout !== undefined) result.cbwTimeout = disk.cbwTimeout;
  return result;
}
