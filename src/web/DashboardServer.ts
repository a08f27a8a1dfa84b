/**
 * The dashboard's HTTP server (`daemon --http`, `ui`): pages, `/api`,
 * `/metrics` and assets, read-only but for "run now". Every route but the
 * login form requires the token when there is one; without one the server
 * listens on loopback only and answers only requests addressed to a loopback
 * name (a page elsewhere cannot rebind its own name to 127.0.0.1 and read it).
 * Requests are small and bounded in size and time, and the repositories are
 * read once a second at most whatever the number of clients, so no client
 * can take the daemon's time from its jobs.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { diskTrends, JOB_HISTORY_FORMAT } from '../jobs/history.js';
import type { Job } from '../jobs/jobFile.js';
import { type JobRunReport, loadRunReports } from '../jobs/runReport.js';
import type { Repository } from '../store/repository.js';
import { type ListenAddress, isLoopback, sameToken, TOKEN_COOKIE, tokenOf } from './access.js';
import { type Asset, loadAssets } from './assets.js';
import { type DashboardDocument, type LiveState, readDashboard } from './dashboard.js';
import { html } from './html.js';
import { MetricsExporter } from './metrics.js';
import { vmNames, vmRecords } from '../store/vmRecord.js';
import { diskPage, overviewPage, page, runPage, type TrendSeries, trendsPage, vmPage } from './pages.js';

export interface DashboardSources {
  /** The jobs as they are now (a daemon reloads them). */
  jobs(): readonly Job[];
  /** Repositories shown besides the jobs' (`ui <repo>`). */
  repositories: readonly string[];
  /** Opens a repository (the server keeps it: opening an encrypted one derives its key). */
  open(path: string): Promise<Repository>;
  live: LiveState;
  /** Starts a run of the job now; a string says why not. Absent: no scheduler (`ui`). */
  runNow?(job: string): string | null;
}

export interface DashboardServerOptions {
  listen: ListenAddress;
  /** Null: no token, loopback only. */
  token: string | null;
  /** One line per refusal worth knowing (a bad token, a run started). */
  log: (line: string) => void;
}

/** Bodies are read only for the login form; anything bigger is refused. */
const MAX_BODY = 4096;
/** A dashboard read serves every request for this long. */
const DOCUMENT_TTL_MS = 1000;
const TRENDS_RUNS = 30;

class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

export class DashboardServer {
  private readonly server: Server;
  private readonly assets = loadAssets();
  private readonly metrics = new MetricsExporter();
  /** Reads of the repositories by what they read: each serves every request for a second, and while it is still going. */
  private readonly reads = new Map<string, { at: number; value: Promise<unknown> }>();
  private wrongTokens = { logged: 0, since: 0 };

  constructor(
    private readonly sources: DashboardSources,
    private readonly options: DashboardServerOptions,
  ) {
    // Node looks for connections past these timeouts every connectionsCheckingInterval (30 s by default): every second here.
    this.server = createServer({ maxHeaderSize: 16 * 1024, headersTimeout: 10_000, requestTimeout: 30_000, connectionsCheckingInterval: 1_000 }, (req, res) => void this.handle(req, res));
    this.server.keepAliveTimeout = 5_000;
    this.server.maxConnections = 128;
  }

  /** Listens; resolves to the URL it answers on. */
  async start(): Promise<string> {
    const { host, port } = this.options.listen;
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(port, host, () => {
        this.server.off('error', reject);
        resolve();
      });
    });
    const a = this.server.address() as AddressInfo;
    return `http://${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}/`;
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  /** Closes idle keep-alive connections too: a stopping daemon should not wait for browsers. */
  async stop(): Promise<void> {
    const closed = this.close();
    this.server.closeAllConnections();
    await closed;
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    try {
      const url = new URL(req.url ?? '/', 'http://dashboard');
      const segments = url.pathname.split('/').slice(1).map(decodeSegment);
      if (!this.addressedHere(req)) throw new HttpError(421, `this server answers only to a loopback name, not ${JSON.stringify(req.headers.host ?? '')}`);
      if (segments[0] === 'login' && segments.length === 1 && req.method === 'POST') return await this.login(req, res);
      if (!this.authorized(req)) return this.askToken(req, res, null);
      if (req.method === 'POST') return await this.post(req, res, segments);
      if (req.method !== 'GET' && req.method !== 'HEAD') throw new HttpError(405, `${req.method ?? '?'}: only GET, HEAD and POST /api/jobs/<job>/run`, { Allow: 'GET, HEAD, POST' });
      await this.get(req, res, segments, url.searchParams);
    } catch (err) {
      const status = err instanceof HttpError ? err.status : 500;
      const message = err instanceof Error ? err.message.split('\n')[0]! : String(err);
      if (status === 500) this.options.log(`dashboard: ${req.method} ${req.url}: ${message}`);
      const headers = err instanceof HttpError ? err.headers : {};
      if (!res.headersSent) this.send(req, res, status, wantsHtml(req) ? 'text/html; charset=utf-8' : 'application/json', wantsHtml(req) ? page(`Error ${status}`, html`<h1>Error ${status}</h1><p class="error">${message}</p>`) : JSON.stringify({ error: message }), headers);
      else res.destroy();
    }
  }

  private async get(req: IncomingMessage, res: ServerResponse, s: string[], query: URLSearchParams): Promise<void> {
    const htmlType = 'text/html; charset=utf-8';
    const json = (body: unknown) => this.send(req, res, 200, 'application/json', JSON.stringify(body, null, 2));
    const route = s.join('/');
    if (route === '') return this.send(req, res, 200, htmlType, overviewPage((await this.document()).doc, this.sources.runNow !== undefined));
    if (route === 'trends') return this.send(req, res, 200, htmlType, trendsPage(await this.trends(), TRENDS_RUNS));
    if (route === 'metrics') {
      const { doc, ms } = await this.document();
      return this.send(req, res, 200, this.metrics.contentType, await this.metrics.render(doc, ms));
    }
    if (route === 'api/dashboard') return json((await this.document()).doc);
    if (s[0] === 'assets' && s.length === 2) return this.asset(req, res, this.assets.get(s[1]!));
    if (s[0] === 'jobs' && s[2] === 'runs' && s.length === 4) return this.send(req, res, 200, htmlType, runPage(await this.run(s[1]!, s[3]!)));
    if (s[0] === 'api' && s[1] === 'runs' && s.length === 4) return json(await this.run(s[2]!, s[3]!));
    if (s[0] === 'disks' && s.length === 3) return this.send(req, res, 200, htmlType, await this.disk(s[1]!, s[2]!));
    if (s[0] === 'vms' && s.length === 3) return this.send(req, res, 200, htmlType, await this.vm(s[1]!, s[2]!));
    if (route === 'api/history') {
      const runs = await this.reports((await this.repositoryEntry(query.get('repository') ?? '0')).repository);
      return json({ format: JOB_HISTORY_FORMAT, runs, trends: diskTrends(runs) });
    }
    throw new HttpError(404, `no page at /${route}`);
  }

  private async post(req: IncomingMessage, res: ServerResponse, s: string[]): Promise<void> {
    if (!(s[0] === 'api' && s[1] === 'jobs' && s[3] === 'run' && s.length === 4)) throw new HttpError(405, 'the only thing to POST is /api/jobs/<job>/run', { Allow: 'GET, HEAD' });
    // A page of another site may make the browser post here; the browser says where it came from.
    const site = req.headers['sec-fetch-site'];
    if (site === 'cross-site' || (req.headers.origin !== undefined && originHost(req.headers.origin) !== req.headers.host)) throw new HttpError(403, 'a run is started from this dashboard only');
    if (!this.sources.runNow) throw new HttpError(409, 'this is `vhdvault ui`: it schedules nothing; run the job with `vhdvault job run` or from a daemon with --http');
    const job = s[2]!;
    if (!this.sources.jobs().some((j) => j.name === job)) throw new HttpError(404, `no job named ${JSON.stringify(job)}`);
    const refused = this.sources.runNow(job);
    if (refused !== null) throw new HttpError(409, refused);
    this.reads.clear();
    this.options.log(`dashboard: run of ${job} started from ${req.socket.remoteAddress ?? '?'}`);
    if (wantsHtml(req)) {
      res.writeHead(303, { Location: '/', 'Cache-Control': 'no-store' });
      return void res.end();
    }
    this.send(req, res, 202, 'application/json', JSON.stringify({ job, started: true }));
  }

  private async login(req: IncomingMessage, res: ServerResponse): Promise<void> {
    if (this.options.token === null) throw new HttpError(404, 'this dashboard takes no token: there is nothing to log in to');
    const body = await readBody(req);
    const given = new URLSearchParams(body).get('token') ?? '';
    if (this.options.token === null || !sameToken(given, this.options.token)) return this.askToken(req, res, 'That is not the token.');
    res.writeHead(303, { Location: '/', 'Set-Cookie': `${TOKEN_COOKIE}=${encodeURIComponent(given)}; HttpOnly; SameSite=Strict; Path=/`, 'Cache-Control': 'no-store' });
    res.end();
  }

  private authorized(req: IncomingMessage): boolean {
    if (this.options.token === null) return true;
    const given = tokenOf(req.headers);
    const ok = given !== null && sameToken(given, this.options.token);
    if (!ok && given !== null) this.logWrongToken(req);
    return ok;
  }

  /** One line a minute at most, with the count: wrong tokens must not flood the log. */
  private logWrongToken(req: IncomingMessage): void {
    const now = Date.now();
    this.wrongTokens.logged++;
    if (now - this.wrongTokens.since < 60_000) return;
    this.options.log(`dashboard: refused ${this.wrongTokens.logged} request(s) with a wrong token (the last from ${req.socket.remoteAddress ?? '?'})`);
    this.wrongTokens = { logged: 0, since: now };
  }

  /** Without a token, only requests naming a loopback host: a DNS-rebound name is refused. */
  private addressedHere(req: IncomingMessage): boolean {
    if (this.options.token !== null) return true;
    const host = (req.headers.host ?? '').toLowerCase();
    const name = host.startsWith('[') ? host.replace(/^\[(.*)\](:\d+)?$/, '$1') : host.includes(':') && host.indexOf(':') === host.lastIndexOf(':') ? host.replace(/:\d+$/, '') : host;
    return isLoopback(name);
  }

  private askToken(req: IncomingMessage, res: ServerResponse, problem: string | null): void {
    const headers = { 'WWW-Authenticate': 'Bearer realm="vhdvault"' };
    if (!wantsHtml(req)) return this.send(req, res, 401, 'application/json', JSON.stringify({ error: 'a bearer token is required (Authorization: Bearer <token>)' }), headers);
    const form = html`<div class="login"><h1>vhdvault</h1><p>This dashboard needs its token (the first line of the file given to <code>--token-file</code>).</p>${problem ? html`<p class="error">${problem}</p>` : ''}
<form method="post" action="/login"><input type="password" name="token" autocomplete="current-password" autofocus size="40"> <button type="submit">Open</button></form></div>`;
    // Inline: the style sheet is behind the token too.
    this.send(req, res, 401, 'text/html; charset=utf-8', `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>vhdvault: token</title><link rel="icon" href="data:,"></head><body>${form.text}</body></html>`, headers);
  }

  private send(req: IncomingMessage, res: ServerResponse, status: number, type: string, body: string | Buffer, extra: Record<string, string> = {}): void {
    const buf = typeof body === 'string' ? Buffer.from(body) : body;
    res.writeHead(status, {
      'Content-Type': type,
      'Content-Length': buf.length,
      'Cache-Control': 'no-store',
      'X-Content-Type-Options': 'nosniff',
      'X-Frame-Options': 'DENY',
      'Referrer-Policy': 'no-referrer',
      'Content-Security-Policy': "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'",
      ...extra,
    });
    res.end(req.method === 'HEAD' ? undefined : buf);
  }

  private asset(req: IncomingMessage, res: ServerResponse, a: Asset | undefined): void {
    if (!a) throw new HttpError(404, 'no such asset');
    this.send(req, res, 200, a.type, a.body);
  }

  /** What `read` gives, read at most once a second, and never twice at once, however many ask. */
  private once<T>(key: string, read: () => Promise<T>): Promise<T> {
    const now = Date.now();
    const last = this.reads.get(key);
    if (last && (now - last.at < DOCUMENT_TTL_MS || last.value === this.pending.get(key))) return last.value as Promise<T>;
    const value = read();
    this.reads.set(key, { at: now, value });
    this.pending.set(key, value);
    value.then(
      () => this.pending.delete(key),
      () => {
        this.pending.delete(key);
        if (this.reads.get(key)?.value === value) this.reads.delete(key);
      },
    );
    return value;
  }

  private readonly pending = new Map<string, Promise<unknown>>();

  /** The dashboard's document. */
  private document(): Promise<{ doc: DashboardDocument; ms: number }> {
    return this.once('document', async () => {
      const started = performance.now();
      const doc = await readDashboard(this.sources.jobs(), this.sources.repositories, this.sources.open, this.sources.live);
      return { doc, ms: performance.now() - started };
    });
  }

  /** The run reports a repository of the document keeps (every job's). */
  private reports(root: string) {
    return this.once(`reports\0${root}`, async () => loadRunReports(await this.sources.open(root)));
  }

  /** The repository at this index of the document's list (a URL never carries a path). */
  private async repositoryEntry(index: string): Promise<{ repository: string; problem: string | null }> {
    const { doc } = await this.document();
    const entry = /^\d{1,4}$/.test(index) ? doc.repositories[Number(index)] : undefined;
    if (!entry) throw new HttpError(404, `no repository number ${JSON.stringify(index)}`);
    if (entry.problem !== null) throw new HttpError(503, `${entry.repository}: ${entry.problem}`);
    return entry;
  }

  private async repository(index: string): Promise<Repository> {
    return this.sources.open((await this.repositoryEntry(index)).repository);
  }

  /** A run of a job, looked for in every repository the dashboard reads (a job given or not). */
  private async run(jobName: string, runId: string): Promise<JobRunReport> {
    const { doc } = await this.document();
    for (const r of doc.repositories.filter((x) => x.problem === null)) {
      const found = (await this.reports(r.repository)).find((x) => x.job === jobName && x.runId === runId);
      if (found) return found;
    }
    throw new HttpError(404, `no run ${JSON.stringify(runId)} of a job named ${JSON.stringify(jobName)}`);
  }

  private async disk(index: string, disk: string): Promise<string> {
    const { doc } = await this.document();
    const entry = await this.repositoryEntry(index);
    const status = doc.disks.find((d) => d.repository === entry.repository && d.disk === disk);
    if (!status) throw new HttpError(404, `no disk ${JSON.stringify(disk)} in repository number ${index}`);
    const repo = await this.sources.open(entry.repository);
    const backups = status.backups > 0 ? await repo.backups(disk) : [];
    const runs = (await this.reports(entry.repository)).flatMap((report) => report.disks.filter((d) => d.disk === disk).map((d) => ({ report, disk: d })));
    return diskPage(status, backups, runs);
  }

  private async vm(index: string, vm: string): Promise<string> {
    const repo = await this.repository(index);
    // Only a name the repository lists reaches its storage.
    if (!(await vmNames(repo)).includes(vm)) throw new HttpError(404, `no VM ${JSON.stringify(vm)} in repository number ${index}`);
    return vmPage(vm, repo.root, await vmRecords(repo, vm));
  }

  /** Every disk's successful runs in every readable repository, by job and disk. */
  private async trends(): Promise<TrendSeries[]> {
    const { doc } = await this.document();
    const byDisk = new Map<string, TrendSeries>();
    for (const r of doc.repositories.filter((x) => x.problem === null)) {
      for (const report of await this.reports(r.repository).catch(() => [])) {
        for (const d of report.disks) {
          if (!d.ok) continue;
          const k = `${r.repository}\0${report.job}\0${d.disk}`;
          const series = byDisk.get(k) ?? byDisk.set(k, { job: report.job, disk: d.disk, points: [] }).get(k)!;
          series.points.push({ at: report.startedAt, seconds: d.durationMs / 1000, bytesWritten: d.bytesWritten ?? 0, bounding: d.boundingStage ?? null });
        }
      }
    }
    return [...byDisk.values()].map((s) => ({ ...s, points: s.points.slice(-TRENDS_RUNS) }));
  }
}

/** The host of an Origin header; null for `null` or anything that is not a URL. */
function originHost(origin: string): string | null {
  try {
    return new URL(origin).host;
  } catch {
    return null;
  }
}

function decodeSegment(s: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    throw new HttpError(400, 'a malformed URL');
  }
}

function wantsHtml(req: IncomingMessage): boolean {
  return (req.headers.accept ?? '').includes('text/html');
}

/** The request's body, at most MAX_BODY bytes (else 413). */
async function readBody(req: IncomingMessage): Promise<string> {
  const declared = Number(req.headers['content-length'] ?? 0);
  if (declared > MAX_BODY) throw new HttpError(413, `a body of ${declared} bytes (at most ${MAX_BODY})`);
  const parts: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > MAX_BODY) throw new HttpError(413, `a body above ${MAX_BODY} bytes`);
    parts.push(chunk as Buffer);
  }
  return Buffer.concat(parts).toString('utf8');
}
