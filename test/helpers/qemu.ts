import { execFileSync, spawnSync } from 'node:child_process';

/**
 * qemu-img is required for the interop tests. Without it they fail under CI
 * (CI must install qemu-utils) and are skipped only on a developer machine.
 */
export const hasQemuImg = spawnSync('qemu-img', ['--version']).status === 0;
if (!hasQemuImg && process.env.CI) throw new Error('qemu-img is missing: CI must install qemu-utils');

export function qemuImg(...args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8' });
}

export function qemuInfo(path: string): { 'virtual-size': number; format: string } {
  return JSON.parse(qemuImg('info', '--output=json', '-f', 'vpc', path));
}
