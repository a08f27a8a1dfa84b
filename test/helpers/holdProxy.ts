import { createServer, request, type IncomingMessage } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';

/** One request as the proxy saw it: its number (1 for the first), method and path. */
export interface Seen {
  n: number;
  method: string;
  path: string;
}

/**
 * How to hold a request: `request` keeps it from the server until `until`
 * settles, then forwards it if its client is still there (one that gave up and
 * retried lost it, as a request lost in transit is); `reply` forwards it at
 * once and keeps the server's reply until then (the change is made, the client
 * hears of it late, or never if it gave up).
 */
export interface Hold {
  where: 'request' | 'reply';
  until: Promise<unknown>;
}

export interface HoldProxy {
  endpoint: string;
  seen: Seen[];
  /** Decides, for each request, whether to hold it; null (the default) forwards it at once. */
  rule: (r: Seen) => Hold | null;
  /** Called when a hold begins. */
  onHold: (r: Seen) => void;
  close(): Promise<void>;
}

/** An HTTP proxy on 127.0.0.1 in front of an S3 server that holds chosen requests or replies for as long as a test says. */
export async function startHoldProxy(target: string): Promise<HoldProxy> {
  const upstream = new URL(target);
  const sockets = new Set<Socket>();
  const proxy: HoldProxy = { endpoint: '', seen: [], rule: () => null, onHold: () => undefined, close: async () => undefined };

  const server = createServer((req, res) => {
    const r: Seen = { n: proxy.seen.length + 1, method: req.method ?? '', path: req.url ?? '' };
    proxy.seen.push(r);
    const hold = proxy.rule(r);
    if (hold) proxy.onHold(r);
    // Headers unchanged: the Host header is part of the request's signature.
    const forward = (body: Buffer) => {
      const out = request({ host: upstream.hostname, port: upstream.port, method: req.method, path: req.url, headers: req.headers }, async (reply) => {
        const data = await readAll(reply);
        if (hold?.where === 'reply') await hold.until.catch(() => undefined);
        if (res.destroyed) return;
        res.writeHead(reply.statusCode ?? 502, reply.headers);
        res.end(data);
      });
      out.on('error', () => res.destroy());
      out.end(body);
    };
    void readAll(req).then(async (body) => {
      if (hold?.where === 'request') {
        await hold.until.catch(() => undefined);
        if (req.socket.destroyed) return;
      }
      forward(body);
    });
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  proxy.endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  proxy.close = async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  };
  return proxy;
}

async function readAll(stream: IncomingMessage): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of stream) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}
