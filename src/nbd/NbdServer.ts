/**
 * Listening, connections and a graceful stop. Each connection runs the
 * handshake (serverHandshake.ts), then a session (serverSession.ts); a
 * protocol error ends that connection only. stop() stops accepting, lets the
 * requests in flight finish, then flushes and closes the exports.
 *
 * Connections are counted in two pools, so that neither can lock the other
 * out: those still negotiating (few, and each with a short deadline to choose
 * an export) and those established (up to maxConnections, for as long as they
 * like). A client beyond either limit is refused with a line in the log; one
 * refused at GO is told why (NBD_REP_ERR_POLICY with the reason).
 */
import { rm } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { NbdProtocolError } from './errors.js';
import type { ExportCatalog } from './export.js';
import { ByteBudget } from './ByteBudget.js';
import { FrameReader } from './FrameReader.js';
import { CONNECTION_BUDGET, HANDSHAKE_TIMEOUT, MAX_CONNECTIONS, MAX_NEGOTIATING, REPLY_STALL_MS, SERVER_BUDGET, SERVER_INPUT_HIGH_WATER } from './limits.js';
import { negotiate } from './serverHandshake.js';
import { ServerSession } from './serverSession.js';
import { socketState } from '../util/unixSocket.js';

/** Where to listen: TCP (loopback unless told otherwise) or a Unix socket. */
export type Listen = { host: string; port: number } | { path: string };

export interface ServerOptions {
  /** Connections with an export chosen, at once (default MAX_CONNECTIONS); a client choosing one beyond that is refused. */
  maxConnections?: number;
  /** Connections still negotiating, at once (default MAX_NEGOTIATING); more are closed as they connect. */
  maxNegotiating?: number;
  /** Failures told in full (protocol errors, export errors, refusals): the client only sees an errno. */
  log?: (message: string) => void;
  /** A connection that has not chosen an export within this is closed (ms; default HANDSHAKE_TIMEOUT). */
  handshakeTimeout?: number;
  /** Bytes of READ replies and WRITE payloads in progress on one connection (default CONNECTION_BUDGET). */
  connectionBudget?: number;
  /** The same over all connections (default SERVER_BUDGET). */
  serverBudget?: number;
  /** A client that reads none of its waiting replies for this long is disconnected (ms; default REPLY_STALL_MS). */
  replyStall?: number;
}

interface Connection {
  socket: Socket;
  session: ServerSession | null;
  /** Counted as established (an export chosen), else as negotiating. */
  established: boolean;
}

export class NbdServer {
  private readonly server: Server;
  private readonly connections = new Set<Connection>();
  private readonly log: (message: string) => void;
  private listening: Listen | null = null;
  private readonly budget: ByteBudget;
  private negotiating = 0;
  private established = 0;

  constructor(
    private readonly catalog: ExportCatalog,
    private readonly options: ServerOptions = {},
  ) {
    this.log = options.log ?? (() => {});
    // Not net.Server's maxConnections: it closes the connections beyond it without a word to anyone.
    this.server = createServer({ noDelay: true }, (socket) => void this.serve(socket));
    this.budget = new ByteBudget(options.serverBudget ?? SERVER_BUDGET);
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
    socket.on('error', () => {}); // reported through the reader
    const maxNegotiating = this.options.maxNegotiating ?? MAX_NEGOTIATING;
    const timeout = this.options.handshakeTimeout ?? HANDSHAKE_TIMEOUT;
    if (this.negotiating >= maxNegotiating) {
      this.log(`refused ${peer}: ${this.negotiating} connections already negotiating (at most ${maxNegotiating}, each closed if it has not chosen an export within ${seconds(timeout)})`);
      return void socket.destroy();
    }
    const connection: Connection = { socket, session: null, established: false };
    this.connections.add(connection);
    this.negotiating++;
    const reader = new FrameReader(socket, peer, SERVER_INPUT_HIGH_WATER);
    const timer = setTimeout(() => {
      this.log(`${peer}: no export chosen within ${seconds(timeout)}; closing`);
      socket.destroy();
    }, timeout);
    try {
      const negotiated = await negotiate(socket, reader, this.catalog, peer, () => this.admit(connection, peer));
      clearTimeout(timer);
      if (negotiated) {
        const budget = this.budget.child(this.options.connectionBudget ?? CONNECTION_BUDGET);
        connection.session = new ServerSession(socket, reader, negotiated, peer, this.log, budget, this.options.replyStall ?? REPLY_STALL_MS);
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
      if (connection.established) this.established--;
      else this.negotiating--;
    }
  }

  /** At GO: count the connection as established, or say (and log) why it may not be. */
  private admit(connection: Connection, peer: string): string | null {
    const max = this.options.maxConnections ?? MAX_CONNECTIONS;
    if (this.established >= max) {
      const why = `${this.established} connections already established (at most ${max}: --max-connections)`;
      this.log(`refused ${peer}: ${why}`);
      return `too many clients: ${why}; try again later`;
    }
    connection.established = true;
    this.negotiating--;
    this.established++;
    return null;
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


/** A duration for the log: `10 s`, `0.2 s`. */
function seconds(ms: number): string {
  return `${ms / 1000} s`;
}
