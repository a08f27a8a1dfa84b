import { Command, InvalidArgumentError } from 'commander';
import { MAX_CONNECTIONS } from '../nbd/limits.js';
import type { Listen } from '../nbd/NbdServer.js';
import { checkBackupId } from '../store/names.js';
import { Repository } from '../store/repository.js';
import { UsageError } from '../util/errors.js';
import { JSON_FORMATS, printJsonLine } from './json.js';

const DEFAULT_PORT = 10809;

/** `host:port`, `[v6]:port`, `host` (port 10809) or `port` (on 127.0.0.1). */
export function parseListen(text: string): { host: string; port: number } {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]*))(?::(\d+))?$/.exec(text.trim());
  if (!m) throw new InvalidArgumentError(`"${text}" is not host:port`);
  let host = m[1] ?? m[2] ?? '';
  let port = m[3] !== undefined ? Number(m[3]) : DEFAULT_PORT;
  if (m[3] === undefined && /^\d+$/.test(host)) {
    port = Number(host);
    host = '127.0.0.1';
  }
  if (host === '') host = '127.0.0.1';
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new InvalidArgumentError(`"${text}": port must be 0 to 65535`);
  return { host, port };
}

/** --max-connections: a whole number of at least 1 (0 would serve nobody). */
function parseMaxConnections(text: string): number {
  if (!/^[1-9]\d{0,5}$/.test(text.trim())) throw new InvalidArgumentError(`"${text}" is not a whole number from 1 to 999999`);
  return Number(text);
}

export function serveCommand(): Command {
  return new Command('serve')
    .description('serve a backup as an NBD export (read through the chain, nothing materialized) until SIGINT/SIGTERM')
    .argument('<repo>', 'the repository: a folder, or s3://bucket/prefix')
    .argument('<disk>', 'the disk whose backups to serve')
    .option('--backup <id>', 'backup to serve as the default export (default: the latest)')
    .option('--listen <host:port>', 'TCP address (default: 127.0.0.1:10809; port 0 picks a free one)', parseListen)
    .option('--socket <path>', 'listen on this Unix socket instead of TCP')
    .option('--name <export>', 'name of the default export (default: the disk name)')
    .option('--writable', 'accept writes into an overlay outside the repository (instant restore); the backup never changes')
    .option('--overlay <dir>', 'overlay folder for --writable (default: ./<disk>-<id>.overlay); reused when it holds an overlay of the same backup')
    .option('--max-connections <n>', `clients served at once; more are refused, with a line on stderr (default: ${MAX_CONNECTIONS})`, parseMaxConnections)
    .option('--json', 'print the ready line as JSON')
    .action(async (root: string, disk: string, opts: { backup?: string; listen?: { host: string; port: number }; socket?: string; name?: string; writable?: boolean; overlay?: string; maxConnections?: number; json?: boolean }) => {
      if (opts.listen && opts.socket) throw new UsageError('--listen and --socket exclude each other');
      if (opts.overlay && !opts.writable) throw new UsageError('--overlay needs --writable');
      if (opts.name !== undefined && (opts.name.length === 0 || Buffer.byteLength(opts.name) > 4096 || opts.name.includes('\0'))) throw new UsageError('--name must be 1 to 4096 bytes');
      // `<disk>@<id>` names the backups' own exports: a default export under one would serve the wrong backup.
      if (opts.name?.startsWith(`${disk}@`)) throw new UsageError(`--name ${opts.name}: names of the form ${disk}@<id> are the backups' own exports`);
      const repo = await Repository.open(root);
      repo.diskDir(disk);
      if (opts.backup) checkBackupId(opts.backup);
      const listen: Listen = opts.socket ? { path: opts.socket } : (opts.listen ?? { host: '127.0.0.1', port: DEFAULT_PORT });
      let stopped = false;
      const until = new Promise<void>((resolve) => {
        const stop = () => {
          stopped = true;
          resolve();
        };
        process.once('SIGINT', stop);
        process.once('SIGTERM', stop);
      });
      const { serve } = await import('../exports/serve.js');
      await serve(repo, disk, {
        ...opts,
        listen,
        until,
        log: (message) => console.error(`vhdvault: ${message}`),
        onWait: (message) => console.error(`vhdvault: ${message}`),
        onReady: (ready) => {
          if (opts.json) printJsonLine(JSON_FORMATS.serveReady, ready);
          else {
            console.log(`serving ${disk} backup ${ready.backup} (${ready.writable ? `writable, overlay ${ready.overlay}` : 'read-only'}) at ${ready.uri}`);
            console.log(`exports: ${ready.exports.join(' ')}`);
          }
        },
      });
      if (stopped) console.error('vhdvault: stopped');
    });
}
