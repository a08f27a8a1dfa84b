import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

/** s3rver's fixed credentials (it checks signatures made with them). */
const CREDENTIALS = { accessKeyId: 'S3RVER', secretAccessKey: 'S3RVER' };

/**
 * An S3 server for a test file: CI's (VHDVAULT_TEST_S3_ENDPOINT, one for the whole run), or
 * else test/s3server.mjs on a free port. A child process rather than in this one: s3rver needs
 * Node's legacy OpenSSL provider (see there), which only a process's command line turns on.
 */
export async function startS3(): Promise<{ endpoint: string; close(): Promise<void> }> {
  const shared = process.env.VHDVAULT_TEST_S3_ENDPOINT;
  if (shared) return { endpoint: shared, close: async () => undefined };
  const script = fileURLToPath(new URL('../s3server.mjs', import.meta.url));
  const child = spawn(process.execPath, ['--openssl-legacy-provider', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  const exited = once(child, 'exit');
  const lines = createInterface({ input: child.stdout });
  const [endpoint] = (await Promise.race([once(lines, 'line'), exited.then(() => [null])])) as [string | null];
  if (!endpoint) throw new Error('test/s3server.mjs exited before it listened');
  return {
    endpoint,
    async close() {
      if (child.exitCode === null) child.kill('SIGTERM');
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
