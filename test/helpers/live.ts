/** `vhdvault backup --qemu` as the live-backup tests run it, and what its `--json` report holds. */
import { expect } from 'vitest';
import { queryBlockExports, queryNamedBlockNodes } from '../../src/qmp/commands.js';
import type { QmpClient } from '../../src/qmp/QmpClient.js';
import type { CliResult } from './cli.js';
import type { Qsd } from './qsd.js';

export interface LiveReport {
  id: string;
  kind: 'full' | 'delta';
  mode: string;
  bytesRead: number;
  extents: number;
  fleecingPeakBytes: number | null;
  copiedBytes: number;
  discardedBytes: number;
  copies: number | null;
  checkpoint: string;
  previousCheckpoint: string | null;
  note?: string;
}

/** The CLI arguments of a live backup of the guest `qsd` runs, into `repo` as `disk`: fleecing mode into `fleecing`, or direct mode when it is null. */
export function liveArgs(qsd: Qsd, repo: string, disk: string, fleecing: string | null, ...extra: string[]): string[] {
  const mode = fleecing === null ? [] : ['--fleecing', fleecing];
  return ['backup', repo, disk, '--qemu', qsd.qmpSocket, '--node', 'g0', ...mode, '--qemu-nbd', `nbd+unix:///?socket=${qsd.nbdSocket}`, '--json', ...extra];
}

/** The report of a live backup that must have succeeded. */
export function liveReport(r: CliResult, context = ''): LiveReport {
  expect(r.code, `${context}\n${r.stderr}`).toBe(0);
  return JSON.parse(r.stdout) as LiveReport;
}

/** Every `vhdvault-` thing in QEMU: nodes, exports, and the named bitmaps on disk0. */
export async function vhdvaultLeftovers(qmp: QmpClient): Promise<{ nodes: string[]; exports: string[]; bitmaps: Array<{ name: string; recording: boolean; inconsistent: boolean }> }> {
  const nodes = await queryNamedBlockNodes(qmp);
  return {
    nodes: nodes.map((n) => n.nodeName).filter((n) => n.startsWith('vhdvault-')),
    exports: (await queryBlockExports(qmp)).map((e) => e.id).filter((id) => id.startsWith('vhdvault-')),
    bitmaps: nodes.find((n) => n.nodeName === 'disk0')!.dirtyBitmaps.filter((b) => b.name !== undefined).map(({ name, recording, inconsistent }) => ({ name, recording, inconsistent })),
  };
}
