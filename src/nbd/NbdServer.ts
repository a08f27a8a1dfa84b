/**
 * Listening, connections and a graceful stop. Each connection runs the
 * handshake (serverHandshake.ts), then a session (serverSession.ts); a
 * protocol error ends that connection only. stop() stops accepting, lets the
 * requests in flight finish, then flushes and closes the exports.
 */
import { rm } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { NbdProtocolError } from './errors.js';
import type { ExportCatalog } from './export.js';
import { FrameReader } from './FrameReader.js';
import { negotiate } from './serverHandshake.js';
import { ServerSession } from './serverSession.js';
import { socketState } from '../util/unixSocket.js';

/** Where to listen: TCP (loopback unless told otherwise) or a Unix socket. */
export type Listen = { host: string; port: number } | { path: string };

export interface ServerOptions {
  /** Connections served at once; more are closed at once. */
  maxConnections?: number;
  /** Failures told in full (protocol errors, export errors): the client only sees an errno. */
  log?: (message: string) => void;
  /** A handshake that takes longer than this is dropped (ms). */
  handshakeTimeout?: number;
}

export class NbdServer {
  private readonly server: Server;
  private readonly connections = new Set<{ socket: Socket; session: ServerSession | null }>();
  private readonly log: (message: string) => void;
  private listening: Listen | null = null;

  constructor(
    private readonly catalog: ExportCatalog,
    private readonly options: ServerOptions = {},
  ) {
    this.log = options.log ?? (() => {});
    this.server = createServer({ noDelay: true }, (socket) => void this.serve(socket));
    this.server.maxConnections = options.maxConnections ?? 64;
  }

  async listen(where: Listen): Promise<string> {
    try {
      await this.listenOnce(where);
    } catch (err) {
      // A socket file nobody listens on is what a killed server leaves: replace it (never anything else).
      if ((err as NodeJS.ErrnoException).code !== 'EADDRINUSE' || !('path' in where) || (await socketState(where.path)) !== 'stale') throw err;
      await rm(where.path, { force: true });
      await this.listenOnce(where);
    }
    this.listening = where;
    return this.address();
  }

  private async listenOnce(where: Listen): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      const done = () => {
        this.server.off('error', reject);
        resolve();
      };
      if ('path' in where) this.server.listen(where.path, done);
      else this.server.listen(where.port, where.host, done);
    });
  }

  /** The listening address as a URI base (`nbd://host:port` or `nbd+unix:///?socket=path`). */
  address(): string {
    const where = this.listening;
    if (!where) throw new Error('not listening');
    if ('path' in where) return `nbd+unix:///?socket=${where.path}`;
    const addr = this.server.address();
    const port = typeof addr === 'object' && addr ? addr.port : where.port;
    const host = where.host.includes(':') ? `[${where.host}]` : where.host;
    return `nbd://${host}:${port}`;
  }

  private async serve(socket: Socket): Promise<void> {
    const peer = socket.remoteAddress ? `client ${socket.remoteAddress}:${socket.remotePort}` : 'client on the Unix socket';
    const connection = { socket, session: null as ServerSession | null };
    this.connections.add(connection);
    socket.on('error', () => {}); // reported through the reader
    const reader = new FrameReader(socket, peer);
    const timer = setTimeout(() => {
      this.log(`${peer}: handshake took too long; closing`);
      socket.destroy();
    }, this.options.handshakeTimeout ?? 30_000);
    try {
      const negotiated = await negotiate(socket, reader, this.catalog, peer);
      clearTimeout(timer);
      if (negotiated) {
        connection.session = new ServerSession(socket, reader, negotiated, peer, this.log);
        await connection.session.run();
      }
      socket.end();
    } catch (err) {
      if (err instanceof NbdProtocolError) this.log(err.message);
      else this.log(`${peer}: ${(err as Error)?.message ?? String(err)}`);
      socket.destroy();
    } finally {
      clearTimeout(timer);
      this.connections.delete(connection);
    }
  }

  /** Stop accepting, answer what is in flight, close every connection, then flush and close the exports. */
  async stop(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    await Promise.all(
      [...this.connections].map(async ({ socket, session }) => {
        if (!session) return void socket.destroy();
        session.stop();
        await new Promise<void>((resolve) => {
          if (socket.destroyed) return resolve();
          socket.once('close', () => resolve());
          setTimeout(() => {
            socket.destroy();
            resolve();
          }, 5000).unref();
        });
      }),
    );
    await closed;
    // (Node removes a Unix socket's file when the server closes.)
    await this.catalog.close();
  }
}

