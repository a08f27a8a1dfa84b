import { createHash } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import pLimit, { type LimitFunction } from 'p-limit';
import type { ListObjectsV2CommandOutput, S3Client } from '@aws-sdk/client-s3';
import { UsageError } from '../util/errors.js';
import { CLAIMS, type ConditionalWrites, ExclusiveCreator } from './s3ExclusiveCreate.js';
import { type BatchOp, joined, type ListedObject, NotFoundError, type ObjectInfo, type PutData, type S3Descriptor, type Storage, type StorageCapabilities, StorageError } from './Storage.js';

// The SDK warns on Node 20 that its support ends in 2027: nothing a user of the CLI can act on.
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';

type Sdk = typeof import('@aws-sdk/client-s3');


export interface S3Options {
  /** Per attempt: connecting, sending and the first byte of the reply (VHDVAULT_S3_TIMEOUT_MS, 30 s). */
  timeoutMs?: number;
  /** Attempts per request, the first included (VHDVAULT_S3_ATTEMPTS, 5). */
  maxAttempts?: number;
  /** Whether the store honours `If-None-Match: *` (VHDVAULT_S3_CONDITIONAL_WRITES, auto: asked of the store once). */
  conditionalWrites?: ConditionalWrites;
}

/** Open a repository in an S3-compatible bucket; the SDK is loaded here, not when the CLI starts. */
export async function openS3Storage(d: S3Descriptor, options: S3Options = {}): Promise<S3Storage> {
  const sdk = await import('@aws-sdk/client-s3');
  const endpoint = d.endpoint ?? env('AWS_ENDPOINT_URL_S3') ?? env('AWS_ENDPOINT_URL');
  // Other S3-compatible stores ignore the region, but the SDK signs with one.
  const region = d.region ?? env('AWS_REGION') ?? env('AWS_DEFAULT_REGION') ?? (await sharedConfigRegion(sdk)) ?? (endpoint !== undefined ? 'us-east-1' : undefined);
  const timeoutMs = options.timeoutMs ?? envNumber('VHDVAULT_S3_TIMEOUT_MS') ?? 30_000;
  const maxAttempts = options.maxAttempts ?? envNumber('VHDVAULT_S3_ATTEMPTS') ?? 5;
  const requests = envNumber('VHDVAULT_S3_REQUESTS') ?? 16;
  const conditionalWrites = options.conditionalWrites ?? envChoice('VHDVAULT_S3_CONDITIONAL_WRITES', ['auto', 'on', 'off'] as const) ?? 'auto';
  const agent = { keepAlive: true, maxSockets: requests };
  const client = new sdk.S3Client({
    endpoint,
    region,
    forcePathStyle: endpoint !== undefined,
    // Checksums only where S3 demands them (DeleteObjects): some S3-compatible stores reject the newer checksum headers.
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
    maxAttempts,
    // Without throwOnRequestTimeout the SDK only logs a request that exceeds its timeout; socketTimeout catches a reply that stalls midway.
    requestHandler: { connectionTimeout: timeoutMs, requestTimeout: timeoutMs, throwOnRequestTimeout: true, socketTimeout: timeoutMs, httpAgent: agent, httpsAgent: agent },
  });
  // Older MinIO and other S3-compatible stores still demand Content-MD5 on DeleteObjects, which the SDK no longer sends.
  client.middlewareStack.add(
    (next, context) => async (args) => {
      const request = args.request as { headers?: Record<string, string>; body?: unknown };
      if (context.commandName === 'DeleteObjectsCommand' && request.headers && typeof request.body === 'string') request.headers['content-md5'] = createHash('md5').update(request.body).digest('base64');
      return next(args);
    },
    { step: 'build', name: 'vhdvaultDeleteObjectsMd5' },
  );
  return new S3Storage(d, sdk, client, { endpoint: endpoint ?? `the AWS S3 endpoint of ${region ?? 'no region'}`, requests, maxAttempts, conditionalWrites });
}

/**
 * A repository under a prefix of a bucket: key k is object `prefix/k`. No rename
 * and no local files (capabilities); every request goes through one bounded queue,
 * and the SDK retries 5xx, throttling, timeouts and lost connections with backoff.
 */
export class S3Storage implements Storage {
  readonly capabilities: StorageCapabilities = { rename: false, localFiles: false, rangedReads: true };
  private readonly limit: LimitFunction;
  private readonly bucket: string;
  private readonly prefix: string;
  private readonly exclusive: ExclusiveCreator;

  constructor(
    readonly descriptor: S3Descriptor,
    private readonly sdk: Sdk,
    private readonly client: S3Client,
    private readonly settings: { endpoint: string; requests: number; maxAttempts: number; conditionalWrites: ConditionalWrites },
  ) {
    this.limit = pLimit(settings.requests);
    this.exclusive = new ExclusiveCreator(
      {
        describe: (k) => this.describe(k),
        exists: (k) => this.exists(k),
        putIfNoneMatch: (k, data) => this.putIfNoneMatch(k, data),
        put: (k, data) => this.put(k, data),
        get: (k) => this.get(k),
        listWithTimes: async (k) => ((await this.listPage(k, { Prefix: this.folder(k) })).Contents ?? []).map((c) => ({ key: this.relative(c.Key!), time: c.LastModified?.getTime() ?? 0 })),
        deleteMany: (keys) => this.deleteMany(keys),
      },
      settings.conditionalWrites,
    );
    this.bucket = descriptor.bucket;
    this.prefix = descriptor.prefix;
  }

  /** Whether exclusive creates are conditional PUTs (the store honours If-None-Match) or go through claims. */
  conditionalWrites(): Promise<boolean> {
    return this.exclusive.conditionalWrites();
  }

  /** Close the connections kept alive; the storage is not used after. */
  close(): void {
    this.client.destroy();
  }

  describe(k: string): string {
    const o = this.objectKey(k);
    return o === '' ? `s3://${this.bucket}` : `s3://${this.bucket}/${o}`;
  }

  async get(k: string, range?: { offset: number; length: number }): Promise<Buffer> {
    if (range && range.length <= 0) {
      if (!(await this.head(k))) throw new NotFoundError(this.describe(k), 'no such object', 'NoSuchKey');
      return Buffer.alloc(0);
    }
    const Range = range && `bytes=${range.offset}-${range.offset + range.length - 1}`;
    for (let attempt = 1; ; attempt++) {
      const state = { reading: false };
      try {
        return await this.limit(async () => {
          const out = await this.client.send(new this.sdk.GetObjectCommand({ Bucket: this.bucket, Key: this.objectKey(k), Range }));
          state.reading = true;
          const bytes = (await out.Body?.transformToByteArray()) ?? new Uint8Array();
          return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
        });
      } catch (err) {
        // A range that starts at or past the end: S3 says 416, the contract says "what exists".
        if (errorName(err) === 'InvalidRange') return Buffer.alloc(0);
        // The SDK retries requests, not the reading of a reply's body: a connection lost there is retried here.
        if (state.reading && attempt < this.settings.maxAttempts) {
          await sleep(Math.random() * 50 * 2 ** attempt);
          continue;
        }
        throw this.failure(k, err);
      }
    }
  }

  async head(k: string): Promise<ObjectInfo | null> {
    if (k !== '') {
      try {
        const out = await this.limit(() => this.client.send(new this.sdk.HeadObjectCommand({ Bucket: this.bucket, Key: this.objectKey(k) })));
        return { size: out.ContentLength ?? 0, mtimeMs: out.LastModified?.getTime() ?? 0, prefix: false };
      } catch (err) {
        if (!isMissing(err)) throw this.failure(k, err);
      }
    }
    // No object: a prefix if anything is below it (a HEAD's 404 cannot say the bucket is missing; the list can).
    const out = await this.listPage(k, { Prefix: this.folder(k), MaxKeys: 1 });
    return (out.Contents?.length ?? 0) + (out.CommonPrefixes?.length ?? 0) > 0 ? { size: 0, mtimeMs: 0, prefix: true } : null;
  }

  async list(k: string): Promise<string[]> {
    const base = this.folder(k);
    const names = new Set<string>();
    for await (const page of this.pages(k, { Prefix: base, Delimiter: '/' })) {
      for (const c of page.Contents ?? []) names.add(c.Key!.slice(base.length));
      for (const p of page.CommonPrefixes ?? []) names.add(p.Prefix!.slice(base.length).replace(/\/$/, ''));
    }
    names.delete('');
    if (k === '') names.delete(CLAIMS);
    return [...names].sort();
  }

  async *listAll(k: string): AsyncIterable<ListedObject> {
    for await (const page of this.pages(k, { Prefix: this.folder(k) })) {
      for (const c of page.Contents ?? []) {
        const rel = this.relative(c.Key!);
        if (k === '' && rel.startsWith(`${CLAIMS}/`)) continue;
        yield { key: rel, size: c.Size ?? 0, mtimeMs: c.LastModified?.getTime() ?? 0 };
      }
    }
  }

  async put(k: string, pieces: PutData, options: { ifAbsent?: boolean } = {}): Promise<boolean> {
    const data = joined(pieces); // one request body
    if (options.ifAbsent) return this.exclusive.create(k, data);
    await this.send(k, (c, sdk) => c.send(new sdk.PutObjectCommand({ Bucket: this.bucket, Key: this.objectKey(k), ...body(data) })));
    return true;
  }

  async create(k: string, parts: Uint8Array[]): Promise<void> {
    // A PUT is durable when S3 answers it: there is nothing for sync() to do.
    await this.put(k, parts);
  }

  async sync(): Promise<void> {}

  async delete(k: string): Promise<void> {
    if (k !== '') await this.send(k, (c, sdk) => c.send(new sdk.DeleteObjectCommand({ Bucket: this.bucket, Key: this.objectKey(k) })));
    // Claims included: deleting a prefix leaves nothing below it.
    for await (const page of this.pages(k, { Prefix: this.folder(k) })) await this.deleteMany((page.Contents ?? []).map((c) => this.relative(c.Key!)));
  }

  async deleteMany(keys: string[]): Promise<void> {
    const unique = [...new Set(keys)];
    // Up to 1000 keys a request (S3's limit), but spread over several requests in flight when
    // there are many: a store that deletes the keys of one request one by one (s3rver, RGW) works on several at once.
    const size = Math.min(1000, Math.max(16, Math.ceil(unique.length / this.settings.requests)));
    const batches: string[][] = [];
    for (let i = 0; i < unique.length; i += size) batches.push(unique.slice(i, i + size));
    await Promise.all(batches.map((b) => this.deleteBatch(b)));
  }

  async batch(ops: BatchOp[]): Promise<void> {
    // Each operation is durable before the next starts, so a crash leaves a first part done.
    for (const op of ops) {
      if ('put' in op) await this.put(op.put, op.data);
      else if ('delete' in op) await this.delete(op.delete);
      else throw new Error(`${this.describe(op.rename)}: an object store cannot rename`);
    }
  }

  /** PUT with `If-None-Match: *`; false when the store says something is there. */
  private async putIfNoneMatch(k: string, data: Buffer | string): Promise<boolean> {
    try {
      await this.limit(() => this.client.send(new this.sdk.PutObjectCommand({ Bucket: this.bucket, Key: this.objectKey(k), ...body(data), IfNoneMatch: '*' })));
      return true;
    } catch (err) {
      const status = httpStatus(err);
      if (status !== 412 && status !== 409) throw this.failure(k, err);
      // Something is there. After a retry it may be our own first attempt, which landed before its reply was lost.
      if (attempts(err) > 1) return (await this.get(k).catch(() => null))?.equals(Buffer.from(data)) ?? false;
      return false;
    }
  }

  private async exists(k: string): Promise<boolean> {
    try {
      await this.limit(() => this.client.send(new this.sdk.HeadObjectCommand({ Bucket: this.bucket, Key: this.objectKey(k) })));
      return true;
    } catch (err) {
      if (isMissing(err)) return false;
      throw this.failure(k, err);
    }
  }

  private async deleteBatch(keys: string[]): Promise<void> {
    const Objects = keys.map((k) => ({ Key: this.objectKey(k) }));
    const out = await this.send(keys[0]!, (c, sdk) => c.send(new sdk.DeleteObjectsCommand({ Bucket: this.bucket, Delete: { Objects, Quiet: true } })));
    const failed = (out.Errors ?? []).filter((e) => e.Code !== 'NoSuchKey');
    const first = failed[0];
    if (first) {
      const more = failed.length > 1 ? ` (and ${failed.length - 1} more)` : '';
      throw new StorageError(this.describe(this.relative(first.Key ?? '')), `could not be deleted: ${first.Code ?? 'error'} ${oneLine(first.Message ?? '')}${more}`, first.Code);
    }
  }

  private async *pages(k: string, input: { Prefix: string; Delimiter?: string }): AsyncGenerator<ListObjectsV2CommandOutput> {
    let token: string | undefined;
    do {
      const out = await this.listPage(k, { ...input, ContinuationToken: token });
      yield out;
      token = out.IsTruncated ? out.NextContinuationToken : undefined;
    } while (token);
  }

  private listPage(k: string, input: { Prefix: string; Delimiter?: string; MaxKeys?: number; ContinuationToken?: string }): Promise<ListObjectsV2CommandOutput> {
    return this.send(k, (c, sdk) => c.send(new sdk.ListObjectsV2Command({ Bucket: this.bucket, ...input })));
  }

  /** One request in the bounded queue, its failure named after `k`. */
  private async send<T>(k: string, call: (client: S3Client, sdk: Sdk) => Promise<T>): Promise<T> {
    try {
      return await this.limit(() => call(this.client, this.sdk));
    } catch (err) {
      throw this.failure(k, err);
    }
  }

  private objectKey(k: string): string {
    return this.prefix === '' ? k : k === '' ? this.prefix : `${this.prefix}/${k}`;
  }

  /** The object-key prefix of everything below `k`. */
  private folder(k: string): string {
    const o = this.objectKey(k);
    return o === '' ? '' : `${o}/`;
  }

  private relative(objectKey: string): string {
    return this.prefix === '' ? objectKey : objectKey.slice(this.prefix.length + 1);
  }

  private failure(k: string, err: unknown): StorageError {
    if (err instanceof StorageError) return err;
    const where = this.describe(k);
    const name = errorName(err);
    const code = (err as { code?: string }).code;
    const status = httpStatus(err);
    const n = attempts(err);
    if (isMissing(err)) return new NotFoundError(where, 'no such object', 'NoSuchKey');
    if (name === 'NoSuchBucket') return new StorageError(where, `bucket "${this.bucket}" does not exist`, name);
    if (name === 'CredentialsProviderError') return new StorageError(where, 'no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE and the shared credentials file', name);
    if (status === 403 || ['AccessDenied', 'InvalidAccessKeyId', 'SignatureDoesNotMatch'].includes(name ?? '')) {
      const why = name && name !== 'Unknown' ? ` (${name})` : '';
      return new StorageError(where, `access denied${why}: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the shared credentials`, name ?? 'S3_403');
    }
    if (code && ['ECONNREFUSED', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH', 'ENETUNREACH'].includes(code)) return new StorageError(where, `cannot reach ${this.settings.endpoint}: ${code}`, code);
    if (name === 'TimeoutError' || code === 'ETIMEDOUT') return new StorageError(where, `timed out after ${n} attempts`, 'ETIMEDOUT');
    if (status !== undefined && status >= 500) return new StorageError(where, `server error ${status} after ${n} attempts`, `S3_${status}`);
    if (code === 'ECONNRESET' || code === 'EPIPE') return new StorageError(where, `connection lost after ${n} attempts`, code);
    const message = oneLine((err as Error).message ?? String(err));
    if (/region is missing/i.test(message)) return new StorageError(where, 'no region: set AWS_REGION, or the region of the repository', 'NoRegion');
    return new StorageError(where, name && name !== 'Error' ? `${name}: ${message}` : message, name ?? (status ? `S3_${status}` : undefined));
  }
}

function errorName(err: unknown): string | undefined {
  return (err as { name?: string }).name;
}

function httpStatus(err: unknown): number | undefined {
  return (err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode;
}

function attempts(err: unknown): number {
  return (err as { $metadata?: { attempts?: number } }).$metadata?.attempts ?? 1;
}

/** No such key. A HEAD's 404 has no body, so no name but NotFound; NoSuchBucket is a 404 too, and is not this. */
function isMissing(err: unknown): boolean {
  const name = errorName(err);
  return name === 'NoSuchKey' || name === 'NotFound' || (httpStatus(err) === 404 && name !== 'NoSuchBucket');
}

/** A put's body with its length: without one, the SDK warns of a stream of unknown length (an empty one, say). */
function body(data: Buffer | string): { Body: Buffer | string; ContentLength: number } {
  return { Body: data, ContentLength: Buffer.byteLength(data) };
}

function oneLine(s: string): string {
  return s.split('\n')[0]!.trim();
}

function env(name: string): string | undefined {
  const v = process.env[name];
  return v === undefined || v === '' ? undefined : v;
}

function envChoice<T extends string>(name: string, choices: readonly T[]): T | undefined {
  const v = env(name);
  if (v === undefined) return undefined;
  if (!(choices as readonly string[]).includes(v)) throw new UsageError(`${name} must be one of ${choices.join(', ')}, not "${v}"`);
  return v as T;
}

function envNumber(name: string): number | undefined {
  const v = env(name);
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n <= 0) throw new UsageError(`${name} must be a positive whole number, not "${v}"`);
  return n;
}

/** The region of the shared config's profile (~/.aws/config), as the SDK finds it; undefined when it has none. */
async function sharedConfigRegion(sdk: Sdk): Promise<string | undefined> {
  const probe = new sdk.S3Client({});
  try {
    return await probe.config.region();
  } catch {
    return undefined;
  } finally {
    probe.destroy();
  }
}
