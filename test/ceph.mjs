// A real distributed S3 engine for the tests: Ceph's RADOS Gateway on a one-node cluster on 127.0.0.1.
//   node test/ceph.mjs
// One monitor, one OSD whose objects live in RAM (memstore), and radosgw (beast) on free ports,
// every file of theirs under one scratch folder (in VHDVAULT_TEST_SHM when set, else /dev/shm or
// the temporary folder). It makes an S3 user whose access key and secret are both S3RVER (the
// credentials of test/helpers/s3.ts), prints its endpoint (http://127.0.0.1:<port>) on one line
// once a PUT works, and on SIGTERM or SIGINT, or when its parent is gone, stops every daemon
// (TERM, KILL after 10 s) and removes the folder. A failure is one line on stderr, exit 1.
// About 3 s to start and 0.5 s to stop on 2 cores; VHDVAULT_CEPH_TIMING=1 says when each step ended.
// Needs the Debian packages ceph-mon, ceph-osd, radosgw and ceph-common (docs/testing.md).
import { execFile, spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { accessSync, constants, existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { request } from 'node:http';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

/** The programs this needs, each with the Debian package that installs it. */
const PROGRAMS = { 'ceph-mon': 'ceph-mon', monmaptool: 'ceph-mon (ceph-base)', 'ceph-osd': 'ceph-osd', radosgw: 'radosgw', ceph: 'ceph-common', 'radosgw-admin': 'ceph-common' };
const KEY = 'S3RVER';
/** Memstore keeps every object in the OSD's memory: this caps it (a test run puts well under 100 MB there). */
const MEMSTORE_BYTES = 1536 * 1024 * 1024;
/**
 * From nothing to a working PUT takes 2–5 s; this bounds a start that hangs (radosgw waits 300 s
 * for a monitor it cannot reach). Under .ci/run's 60 s, so that this says which step hung.
 */
const START_MS = 50_000;
/** A daemon that ignores TERM this long is killed. */
const STOP_MS = 10_000;

const started = Date.now();
const children = []; // the daemons: { name, child, exited: Promise<void> }
const tools = new Set(); // the tools running now (monmaptool, ceph, radosgw-admin...)
let scratch;
let stopping = false;
let failed = false;

function fail(message) {
  if (failed || stopping) return;
  failed = true;
  console.error(`ceph.mjs: ${message}`);
  void stop(1);
}

/** Stops every daemon (TERM; KILL for what still runs STOP_MS later), removes the scratch folder, and exits. */
async function stop(code = 0) {
  if (stopping) return;
  stopping = true;
  const t0 = Date.now();
  // A tool still talking to the cluster (a start cut short) only waits for it: no use letting it finish.
  for (const t of tools) t.kill('SIGKILL');
  const running = (c) => c.child.exitCode === null && c.child.signalCode === null;
  const killer = setTimeout(() => children.filter(running).forEach((c) => c.child.kill('SIGKILL')), STOP_MS);
  // Clients before servers: radosgw, then the OSD (it waits up to 5 s for a monitor to mark it down), then the monitor.
  for (const name of ['radosgw', 'ceph-osd', 'ceph-mon']) {
    for (const c of children.filter((c) => c.name === name)) {
      if (running(c)) c.child.kill('SIGTERM');
      await c.exited;
      timing(`${name} stopped after ${Date.now() - t0} ms`);
    }
  }
  clearTimeout(killer);
  if (scratch) await rm(scratch, { recursive: true, force: true }).catch(() => undefined);
  timing(`stopped and removed in ${Date.now() - t0} ms`);
  process.exit(code);
}

/** With VHDVAULT_CEPH_TIMING set, how long the steps took (on stderr). */
function timing(message) {
  if (process.env.VHDVAULT_CEPH_TIMING) console.error(`ceph.mjs: ${message}`);
}

process.once('SIGTERM', () => void stop(0));
process.once('SIGINT', () => void stop(0));
// Orphaned (its test run was killed): stop rather than linger.
const parent = process.ppid;
setInterval(() => process.ppid !== parent && void stop(0), 1000).unref();

/** Whether `program` is an executable file in a folder of PATH. */
function onPath(program) {
  return (process.env.PATH ?? '').split(delimiter).some((dir) => {
    try {
      accessSync(join(dir, program), constants.X_OK);
      return true;
    } catch {
      return false;
    }
  });
}

for (const [program, pkg] of Object.entries(PROGRAMS)) {
  if (!onPath(program)) {
    console.error(`ceph.mjs: ${program} is not installed (Debian package ${pkg}; all of them: apt-get install --no-install-recommends ceph-mon ceph-osd radosgw ceph-common)`);
    process.exit(1);
  }
}
// Daemons must not outlive this process, even killed with SIGKILL: setpriv (util-linux) has the kernel kill them then
// (KILL: their data is in memory and goes anyway, and radosgw ignores a TERM for long once the monitor is gone).
const pdeathsig = onPath('setpriv');

/** Free TCP ports on 127.0.0.1, all different: held open together, then released for the daemons. */
async function freePorts(n) {
  const servers = await Promise.all(
    Array.from({ length: n }, () => new Promise((resolve, reject) => {
      const s = createServer();
      s.once('error', reject);
      s.listen(0, '127.0.0.1', () => resolve(s));
    })),
  );
  const ports = servers.map((s) => s.address().port);
  await Promise.all(servers.map((s) => new Promise((resolve) => s.close(resolve))));
  return ports;
}

/** The last lines of a daemon's log, for a one-line error. */
async function logTail(name) {
  const text = await readFile(join(scratch, 'log', `${name}.log`), 'utf8').catch(() => '');
  const lines = text.trim().split('\n').filter((l) => l.trim() !== '');
  return lines.slice(-1)[0]?.replace(/\s+/g, ' ').slice(0, 300) ?? 'no log';
}

/** A daemon in the foreground, a child of this process. */
function daemon(name, program, args, logName) {
  const argv = pdeathsig ? ['setpriv', '--pdeathsig', 'SIGKILL', '--', program, ...args] : [program, ...args];
  const child = spawn(argv[0], argv.slice(1), { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (chunk) => (stderr = (stderr + chunk).slice(-4000)));
  const exited = new Promise((resolve) => child.once('exit', () => resolve()));
  children.push({ name, child, exited });
  child.once('exit', async (code, signal) => {
    if (stopping) return;
    const said = stderr.trim().split('\n').slice(-1)[0] || (await logTail(logName));
    fail(`${program} exited (${signal ?? `code ${code}`}) while the cluster ran: ${said}`);
  });
  return child;
}

/** A Ceph tool run to its end; rejects with one line naming it. */
function tool(program, args, timeoutMs = 30_000) {
  return new Promise((resolve, reject) => {
    const child = execFile(program, args, { timeout: timeoutMs, encoding: 'utf8' }, (err, stdout, stderr) => {
      tools.delete(child);
      if (!err) return resolve(stdout);
      const said = (stderr || err.message).trim().split('\n').filter((l) => !/unable to find a keyring|did not load config file|no keyring found/.test(l)).slice(-1)[0] ?? '';
      reject(new Error(`${program} ${args.filter((a) => !a.includes('/')).slice(0, 3).join(' ')} failed${err.killed ? ` (no answer in ${timeoutMs / 1000} s)` : ''}: ${said.trim()}`));
    });
    tools.add(child);
  });
}

/** The HTTP status of GET url, or null when nothing answers yet. */
function httpStatus(url) {
  return new Promise((resolve) => {
    const req = request(url, { timeout: 1000, agent: false }, (res) => {
      res.resume();
      resolve(res.statusCode ?? null);
    });
    req.once('error', () => resolve(null));
    req.once('timeout', () => req.destroy());
    req.end();
  });
}

/** What the start does now (for an error when it hangs); with VHDVAULT_CEPH_TIMING set, when each step began. */
let step = 'making its folder';
function doing(what) {
  timing(`${step}: done at ${Date.now() - started} ms`);
  step = what;
}

/** Whether process `pid` runs (here, or as another user's). */
function alive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return err.code === 'EPERM';
  }
}

async function start() {
  const memory = process.env.VHDVAULT_TEST_SHM ?? (existsSync('/dev/shm') ? '/dev/shm' : tmpdir());
  // The folders of instances killed with SIGKILL (the kernel killed their daemons, see pdeathsig): removed by the next.
  for (const name of await readdir(memory)) {
    const pid = Number(/^vhdvault-ceph-(\d+)-/.exec(name)?.[1] ?? NaN);
    if (Number.isSafeInteger(pid) && pid !== process.pid && !alive(pid)) await rm(join(memory, name), { recursive: true, force: true });
  }
  scratch = await mkdtemp(join(memory, `vhdvault-ceph-${process.pid}-`));
  const [monV2, monV1, rgwPort] = await freePorts(3);
  const fsid = randomUUID();
  const osdUuid = randomUUID();
  for (const d of ['run', 'log', 'crash', 'mon/ceph-a', 'osd/ceph-0', 'rgw']) await mkdir(join(scratch, d), { recursive: true });
  const conf = join(scratch, 'ceph.conf');
  await writeFile(
    conf,
    `[global]
fsid = ${fsid}
mon host = [v2:127.0.0.1:${monV2},v1:127.0.0.1:${monV1}]
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
# No cephx: with it off, a client must still be told to speak crc to the monitor (else radosgw waits 300 s).
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
# Every file under the scratch folder: nothing in /var/run/ceph, /var/log/ceph or /var/lib/ceph.
run dir = ${scratch}/run
log file = ${scratch}/log/$name.log
mon cluster log file = ${scratch}/log/cluster.log
crash dir = ${scratch}/crash
keyring = ${scratch}/keyring
# Seconds per pool otherwise (radosgw makes seven).
paxos propose interval = 0.01
paxos min wait = 0.001
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false

[mon]
mon data = ${scratch}/mon/$cluster-$id

[osd]
osd data = ${scratch}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = ${MEMSTORE_BYTES}

[client.rgw.a]
rgw data = ${scratch}/rgw
rgw frontends = beast endpoint=127.0.0.1:${rgwPort}
`,
  );
  const c = ['-c', conf];
  const monmap = join(scratch, 'monmap');
  doing('making the monitor');
  await tool('monmaptool', ['--create', '--fsid', fsid, '--addv', 'a', `[v2:127.0.0.1:${monV2},v1:127.0.0.1:${monV1}]`, monmap]);
  await tool('ceph-mon', [...c, '--mkfs', '-i', 'a', '--monmap', monmap]);
  doing('adding the OSD (the monitor starting)');
  daemon('ceph-mon', 'ceph-mon', [...c, '-f', '-i', 'a'], 'mon.a');
  const id = (await tool('ceph', [...c, '--connect-timeout', '20', 'osd', 'new', osdUuid])).trim();
  if (id !== '0') throw new Error(`ceph osd new gave osd id ${JSON.stringify(id)}, not 0`);
  doing('making the OSD');
  await tool('ceph-osd', [...c, '-i', '0', '--mkfs', '--osd-uuid', osdUuid]);
  doing('waiting for radosgw to answer HTTP (it makes its pools once the OSD is up)');
  daemon('ceph-osd', 'ceph-osd', [...c, '-f', '-i', '0'], 'osd.0');
  // At once: radosgw's requests wait for the OSD to be up; then it makes its pools, then it listens.
  daemon('radosgw', 'radosgw', [...c, '-f', '-n', 'client.rgw.a'], 'client.rgw.a');
  const endpoint = `http://127.0.0.1:${rgwPort}`;
  while ((await httpStatus(endpoint)) !== 200) await sleep(50);
  doing('making the S3 user');
  await tool('radosgw-admin', [...c, '-n', 'client.admin', 'user', 'create', '--uid=vhdvault-tests', '--display-name=vhdvault tests', `--access-key=${KEY}`, `--secret-key=${KEY}`]);
  doing('putting a first object');
  await probe(endpoint);
  return endpoint;
}

// Loaded while the daemons start (it takes about half a second), for the first PUT.
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';
const sdkLoading = import('@aws-sdk/client-s3');
sdkLoading.catch(() => undefined);

/** A bucket made, an object put and read back, both removed: what a test will do first. */
async function probe(endpoint) {
  const sdk = await sdkLoading;
  const client = new sdk.S3Client({ endpoint, region: 'us-east-1', forcePathStyle: true, credentials: { accessKeyId: KEY, secretAccessKey: KEY }, maxAttempts: 1 });
  const Bucket = `probe-${randomUUID()}`;
  try {
    await client.send(new sdk.CreateBucketCommand({ Bucket }));
    await client.send(new sdk.PutObjectCommand({ Bucket, Key: 'probe', Body: 'probe' }));
    const got = await (await client.send(new sdk.GetObjectCommand({ Bucket, Key: 'probe' }))).Body.transformToString();
    if (got !== 'probe') throw new Error(`radosgw returned ${JSON.stringify(got)} for the object just put`);
    await client.send(new sdk.DeleteObjectCommand({ Bucket, Key: 'probe' }));
    await client.send(new sdk.DeleteBucketCommand({ Bucket }));
  } catch (err) {
    throw new Error(`a first PUT to radosgw failed: ${err.name}: ${err.message}`);
  } finally {
    client.destroy();
  }
}

const timer = setTimeout(() => fail(`the cluster was not serving S3 within ${START_MS / 1000} s: it was still ${step}`), START_MS);
try {
  const endpoint = await start();
  clearTimeout(timer);
  if (!stopping) {
    doing('serving');
    console.log(endpoint);
  }
} catch (err) {
  clearTimeout(timer);
  fail(err instanceof Error ? err.message : String(err));
}
