/**
 * S3 servers for tests and benchmarks, without vitest (a bench runs under
 * plain Node): s3rver and Ceph's RADOS Gateway started or shared, buckets,
 * and the environment that points a CLI at them. Test files use s3.ts.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { accessSync, constants } from 'node:fs';
import { delimiter, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

/** s3rver's fixed credentials (it checks signatures made with them). */
const CREDENTIALS = { accessKeyId: 'S3RVER', secretAccessKey: 'S3RVER' };

/** An S3 server a test file uses; close() stops it when the file started it (CI's shared one stays). */
export interface S3Server {
  endpoint: string;
  close(): Promise<void>;
}

/**
 * An S3 server for a test file: CI's (VHDVAULT_TEST_S3_ENDPOINT, one for the whole run), or
 * else test/s3server.mjs on a free port. A child process rather than in this one: s3rver needs
 * Node's legacy OpenSSL provider (see there), which only a process's command line turns on.
 */
export async function startS3(): Promise<S3Server> {
  const shared = process.env.VHDVAULT_TEST_S3_ENDPOINT;
  if (shared) return { endpoint: shared, close: async () => undefined };
  return serverChild('s3server.mjs', ['--openssl-legacy-provider']);
}

/**
 * A server of this test file's own (never CI's shared one) keeping its objects in `directory`,
 * which it does not remove: for tests that read the bytes the server stores (its object files,
 * whose paths hold the object keys). The caller removes the folder after close().
 */
export async function startS3In(directory: string): Promise<S3Server> {
  return serverChild('s3server.mjs', ['--openssl-legacy-provider'], ['0', directory]);
}

/** The programs of a one-node Ceph that test/ceph.mjs starts, and what installs them. */
const CEPH_PROGRAMS = ['radosgw', 'ceph-mon', 'ceph-osd'];
const CEPH_PACKAGES = 'ceph-mon ceph-osd radosgw ceph-common';

/**
 * Ceph's RADOS Gateway, a real distributed S3 engine, for a test file: CI's
 * (VHDVAULT_TEST_CEPH_ENDPOINT, one for the whole run), or else test/ceph.mjs
 * (a one-node cluster in memory, about 3 s to start). Its user has s3rver's keys.
 */
export async function startCeph(): Promise<S3Server> {
  const shared = process.env.VHDVAULT_TEST_CEPH_ENDPOINT;
  if (shared) return { endpoint: shared, close: async () => undefined };
  return serverChild('ceph.mjs', []);
}

/** Why this process cannot have a Ceph endpoint, or undefined when it can. */
export function cephMissing(): string | undefined {
  if (process.env.VHDVAULT_TEST_CEPH_ENDPOINT) return undefined;
  const missing = CEPH_PROGRAMS.filter((p) => !onPath(p));
  if (missing.length === 0) return undefined;
  return `${missing.join(', ')} not installed (apt-get install --no-install-recommends ${CEPH_PACKAGES}) and VHDVAULT_TEST_CEPH_ENDPOINT not set`;
}

function onPath(program: string): boolean {
  return (process.env.PATH ?? '').split(delimiter).some((dir) => {
    try {
      accessSync(join(dir, program), constants.X_OK);
      return true;
    } catch {
      return false;
    }
  });
}

/** test/<script> in a child (`node [flags] script`), once it has printed its endpoint; a failure to start carries what it said. */
async function serverChild(script: string, flags: string[], args: string[] = []): Promise<S3Server> {
  const path = fileURLToPath(new URL(`../${script}`, import.meta.url));
  const child = spawn(process.execPath, [...flags, path, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let endpoint: string | null = null;
  let said = '';
  child.stderr.setEncoding('utf8').on('data', (chunk: string) => {
    // Kept for the error until it serves; passed on after (it says nothing then, as a rule).
    if (endpoint === null) said = (said + chunk).slice(-2000);
    else process.stderr.write(chunk);
  });
  // 'close', not 'exit': by then all it said has been read.
  const exited = once(child, 'close');
  const lines = createInterface({ input: child.stdout });
  [endpoint] = (await Promise.race([once(lines, 'line'), exited.then(() => [null])])) as [string | null];
  if (!endpoint) throw new Error(`test/${script} exited before it served: ${said.trim() || `exit ${child.exitCode ?? child.signalCode}`}`);
  return {
    endpoint,
    async close() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      await exited;
    },
  };
}

/** A new, empty bucket with a unique name (tests sharing CI's server never meet). */
export async function newBucket(endpoint: string, name = `t-${randomBytes(6).toString('hex')}`): Promise<string> {
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';
  const { CreateBucketCommand, S3Client } = await import('@aws-sdk/client-s3');
  const client = new S3Client({ endpoint, region: 'us-east-1', forcePathStyle: true, credentials: CREDENTIALS });
  try {
    await client.send(new CreateBucketCommand({ Bucket: name }));
  } finally {
    client.destroy();
  }
  return name;
}

/** The environment that points a CLI child (or this process's S3Storage) at the test server. */
export function s3Env(endpoint: string): Record<string, string> {
  return {
    AWS_ACCESS_KEY_ID: CREDENTIALS.accessKeyId,
    AWS_SECRET_ACCESS_KEY: CREDENTIALS.secretAccessKey,
    AWS_REGION: 'us-east-1',
    AWS_ENDPOINT_URL: endpoint,
    // Never ask an EC2 metadata address for credentials or a region from a test.
    AWS_EC2_METADATA_DISABLED: 'true',
  };
}
