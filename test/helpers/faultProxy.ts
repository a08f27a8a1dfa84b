import { createServer, request, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';

export interface Faults {
  /** Share of requests answered `500 InternalError` instead of being forwarded. */
  errorRate?: number;
  /** Share of requests never answered: the socket is held until the client gives up. */
  stallRate?: number;
  /** The same seed draws the same faults for the same order of requests. */
  seed?: number;
  /** Requests it returns true for (method, path without the query) are answered `500 InternalError`, whatever the rates draw. */
  fail?: (method: string, path: string) => boolean;
  /**
   * At most this many drawn faults in a row for one method and path; the next attempt is forwarded.
   * Tests that must pass use it: with a bare rate, some request fails every attempt in a few runs of a hundred.
   */
  maxInARow?: number;
}

export interface FaultProxy {
  endpoint: string;
  stats: { requests: number; errors: number; stalls: number };
  setFaults(f: Faults): void;
  close(): Promise<void>;
}

const INTERNAL_ERROR =
  '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code><Message>We encountered an internal error. Please try again.</Message><RequestId>fault-proxy</RequestId></Error>';

/** An HTTP proxy on 127.0.0.1 in front of an S3 server that fails or stalls some requests, for the retry tests. */
export async function startFaultProxy(target: string, faults: Faults): Promise<FaultProxy> {
  const upstream = new URL(target);
  let rates = { errorRate: 0, stallRate: 0, ...faults };
  let random = mulberry32(faults.seed ?? 1);
  const stats = { requests: 0, errors: 0, stalls: 0 };
  const sockets = new Set<Socket>();
  const inARow = new Map<string, number>();

  const server = createServer((req, res) => {
    stats.requests++;
    const method = req.method ?? '';
    const path = (req.url ?? '').split('?')[0]!;
    const key = `${method} ${path}`;
    const exhausted = (inARow.get(key) ?? 0) >= (rates.maxInARow ?? Infinity);
    const roll = exhausted ? 1 : random();
    if (roll < rates.errorRate + rates.stallRate) inARow.set(key, (inARow.get(key) ?? 0) + 1);
    else inARow.delete(key);
    if (roll < rates.errorRate || rates.fail?.(method, path)) {
      stats.errors++;
      // Read the whole request first, as a server that fails after receiving it does.
      req.resume().on('end', () => answerInternalError(res));
    } else if (roll < rates.errorRate + rates.stallRate) {
      stats.stalls++;
      req.resume();
    } else {
      // Headers unchanged: the Host header is part of the request's signature.
      const forward = request({ host: upstream.hostname, port: upstream.port, method: req.method, path: req.url, headers: req.headers }, (reply) => {
        res.writeHead(reply.statusCode ?? 502, reply.headers);
        reply.pipe(res);
      });
      forward.on('error', () => res.destroy());
      req.pipe(forward);
    }
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));

  return {
    endpoint: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    stats,
    setFaults(f) {
      rates = { errorRate: 0, stallRate: 0, ...f };
      if (f.seed !== undefined) random = mulberry32(f.seed);
    },
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

function answerInternalError(res: ServerResponse): void {
  res.writeHead(500, { 'Content-Type': 'application/xml', 'Content-Length': Buffer.byteLength(INTERNAL_ERROR) });
  res.end(INTERNAL_ERROR);
}

/** A small seeded PRNG (mulberry32): uniform in [0, 1). */
function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
