/**
 * NBD URIs (NetworkBlockDevice/nbd doc/uri.md, as qemu and libnbd read them):
 *
 *   nbd://host[:port][/export][?bitmap=<name>]           TCP, port 10809 by default
 *   nbd://[::1]:10810/export                              IPv6 in brackets
 *   nbd+unix:///[export]?socket=/path[&bitmap=<name>]    a Unix socket
 *
 * The export name is the path after its first "/", percent-decoded ("//x" is
 * the export "/x"). `bitmap` is ours: the dirty bitmap a delta is built from.
 * Parsed by hand rather than with URL: URL normalises "/a/../b" to "/b" and
 * reads "+" in a query as a space, and either would change a name.
 */
import { UsageError } from '../util/errors.js';
import { MAX_STRING } from './limits.js';

export const DEFAULT_PORT = 10809;

export type NbdEndpoint = { transport: 'tcp'; host: string; port: number } | { transport: 'unix'; socket: string };

export interface NbdAddress {
  /** The URI as given: how errors name the server. */
  uri: string;
  endpoint: NbdEndpoint;
  exportName: string;
  /** `?bitmap=<name>`, or null. */
  bitmap: string | null;
}

/** True for anything written as an NBD URI, supported or not: such a source is never taken for a file name. */
export function isNbdUri(text: string): boolean {
  return /^nbds?(\+[a-z0-9]+)?:/i.test(text);
}

const SHAPE = /^([a-z0-9+]+):\/\/([^/?#]*)([^?#]*)(?:\?([^#]*))?(#.*)?$/i;
const QUERY_KEYS = { tcp: ['bitmap'], unix: ['socket', 'bitmap'] } as const;

/** Parse an NBD URI; anything wrong is a UsageError naming the URI, with a hint where one helps. */
export function parseNbdUri(uri: string): NbdAddress {
  const bad = (problem: string) => new UsageError(`${uri}: ${problem}`);
  const m = SHAPE.exec(uri);
  if (!m) throw bad('not an NBD URI (nbd://host[:port]/export or nbd+unix:///export?socket=/path)');
  const [, rawScheme, authority, path, query, fragment] = m as unknown as [string, string, string, string, string | undefined, string | undefined];
  const scheme = rawScheme.toLowerCase();
  if (scheme.startsWith('nbds')) throw bad('TLS (nbds://) is not supported: use nbd:// or nbd+unix://');
  const transport = scheme === 'nbd' || scheme === 'nbd+tcp' ? 'tcp' : scheme === 'nbd+unix' ? 'unix' : null;
  if (!transport) throw bad(`the transport "${rawScheme}" is not supported (nbd://, nbd+tcp:// or nbd+unix://)`);
  if (fragment !== undefined) throw bad('an NBD URI has no #fragment');

  const params = parseQuery(query ?? '', bad);
  for (const key of params.keys()) {
    if (!(QUERY_KEYS[transport] as readonly string[]).includes(key)) {
      const hint = key === 'socket' ? ' (a socket needs nbd+unix:///export?socket=/path)' : key.startsWith('tls') ? ' (TLS is not supported)' : '';
      throw bad(`unknown query parameter "${key}"${hint}`);
    }
  }
  const exportName = decode(path.slice(1), 'export name', bad);
  checkName(exportName, 'export name', bad);
  const bitmap = params.get('bitmap') ?? null;
  if (bitmap !== null) {
    if (bitmap === '') throw bad('bitmap= names no bitmap');
    checkName(bitmap, 'bitmap name', bad);
  }

  let endpoint: NbdEndpoint;
  if (transport === 'unix') {
    if (authority !== '') throw bad(`a Unix socket URI has no host ("${authority}"): nbd+unix:///export?socket=/path`);
    const socket = params.get('socket');
    if (!socket) throw bad('a Unix socket URI needs ?socket=<path>, e.g. nbd+unix:///export?socket=/run/nbd.sock');
    endpoint = { transport, socket };
  } else {
    endpoint = { transport, ...parseAuthority(authority, bad) };
  }
  return { uri, endpoint, exportName, bitmap };
}

function parseAuthority(authority: string, bad: (p: string) => UsageError): { host: string; port: number } {
  if (authority.includes('@')) throw bad('user names are not supported in an NBD URI');
  const m = /^(\[[0-9a-f:.]+\]|[^:[\]]*)(?::(\d*))?$/i.exec(authority);
  if (!m) {
    const hint = (authority.match(/:/g) ?? []).length > 1 ? ': an IPv6 address goes in brackets, e.g. nbd://[::1]:10809/export' : '';
    throw bad(`cannot read the host and port "${authority}"${hint}`);
  }
  const host = decode(m[1]!.replace(/^\[|\]$/g, ''), 'host', bad);
  if (host === '') throw bad('no host: nbd://host[:port]/export (or nbd+unix:///export?socket=/path for a Unix socket)');
  const portText = m[2];
  if (portText === undefined || portText === '') return { host, port: DEFAULT_PORT };
  const port = Number(portText);
  if (port < 1 || port > 65535) throw bad(`port ${portText} is not from 1 to 65535`);
  return { host, port };
}

function parseQuery(query: string, bad: (p: string) => UsageError): Map<string, string> {
  const params = new Map<string, string>();
  for (const part of query.split('&')) {
    if (part === '') continue;
    const eq = part.indexOf('=');
    const key = decode(eq < 0 ? part : part.slice(0, eq), 'query parameter', bad);
    if (params.has(key)) throw bad(`query parameter "${key}" is given twice`);
    params.set(key, decode(eq < 0 ? '' : part.slice(eq + 1), `value of ${key}`, bad));
  }
  return params;
}

function decode(text: string, what: string, bad: (p: string) => UsageError): string {
  try {
    return decodeURIComponent(text);
  } catch {
    throw bad(`the ${what} has a bad percent-encoding ("${text}")`);
  }
}

/** Names travel as NBD strings: no NUL, at most 4096 bytes. */
function checkName(name: string, what: string, bad: (p: string) => UsageError): void {
  if (name.includes('\0')) throw bad(`the ${what} contains a NUL byte`);
  if (Buffer.byteLength(name, 'utf8') > MAX_STRING) throw bad(`the ${what} is longer than ${MAX_STRING} bytes`);
}

/** The address of `exportName` at `endpoint`, with its URI as QEMU writes it. */
export function nbdAddress(endpoint: NbdEndpoint, exportName: string, bitmap: string | null = null): NbdAddress {
  const name = encodeURIComponent(exportName);
  const uri =
    endpoint.transport === 'unix'
      ? `nbd+unix:///${name}?socket=${endpoint.socket}`
      : `nbd://${endpoint.host.includes(':') ? `[${endpoint.host}]` : endpoint.host}:${endpoint.port}/${name}`;
  return { uri, endpoint, exportName, bitmap };
}
