/**
 * The whole-VM demo: a real Linux guest (demo/guest.ts: Debian's cloud
 * kernel, busybox and qemu-ga, booted by QEMU in seconds) on two ext4 disks,
 * its writer putting the same counter on both many times a second. A VM
 * backup (every disk at one instant, the guest frozen through its agent), a
 * delta, the VM backups listed, the newest restored as qcow2 images with its
 * definition and a boot script, and booted from the repository without a
 * restore (vm boot-check). Everything in a temporary folder.
 */
import { rmSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { bootCheckVm } from '../live/bootCheck.js';
import { type VmBackupReport, vmBackupQemu } from '../live/vmBackup.js';
import { vmRestore } from '../live/vmRestore.js';
import { Repository } from '../store/repository.js';
import { vmRecords } from '../store/vmRecord.js';
import { verify } from '../store/verify.js';
import { bootGuest, type Guest, makeExt4Disk, stopGuests } from './guest.js';
import { mib } from './offline.js';

const VM = 'web';
const DISK_MIB = 64;

function printBackup(label: string, r: VmBackupReport): void {
  console.log(`${label}: VM backup ${r.id}, ${Object.keys(r.disks).length} disks at one instant, ${r.quiesced ? `guest frozen ${r.frozenMs} ms` : `VM paused ${r.pausedMs} ms`}, ${(r.durationMs / 1000).toFixed(1)} s`);
  for (const [target, d] of Object.entries(r.disks)) console.log(`  ${VM}.${target}: ${d.kind} ${d.id}, read ${mib(d.bytesRead)}${d.bitmap ? ' (the checkpoint\'s dirty blocks)' : ''}`);
}

export async function vmDemo(keep: boolean): Promise<void> {
  const started = performance.now();
  // Short: QEMU's sockets live here, and a socket path must fit in 108 bytes.
  const work = await mkdtemp(join(tmpdir(), 'vhdvault-demo-vm-'));
  const interrupted = () => {
    void stopGuests();
    if (!keep) rmSync(work, { recursive: true, force: true });
    console.error('\ninterrupted: the guest killed');
    process.exit(130);
  };
  process.once('SIGINT', interrupted);
  let guest: Guest | null = null;
  try {
    const images = [join(work, 'vda.qcow2'), join(work, 'vdb.qcow2')];
    for (const image of images) await makeExt4Disk(image, DISK_MIB);
    guest = await bootGuest({ disks: images, writer: true });
    console.log(`vhdvault whole-VM demo — a real Linux guest (${guest.accel}, booted in ${(guest.bootMs / 1000).toFixed(1)} s) on two ${DISK_MIB} MiB ext4 disks; its writer puts the same counter on both, many times a second\n`);
    const repo = await Repository.init(join(work, 'repo'), { layout: 'dir', compression: 'none' });
    const options = { qemu: guest.qmpSocket, qga: guest.qgaSocket, fleecing: work, quiesce: 'try' as const, warn: (m: string) => console.log(`  warning: ${m}`) };
    console.log(`$ vhdvault vm backup repo ${VM} --qemu <qmp> --qga <agent> --fleecing <dir>`);
    const full = await vmBackupQemu(repo, VM, options);
    printBackup('backup 1', full);
    await new Promise((r) => setTimeout(r, 500)); // the guest writes on meanwhile
    const delta = await vmBackupQemu(repo, VM, options);
    printBackup('backup 2', delta);

    console.log(`\n$ vhdvault vm list repo ${VM}`);
    for (const r of await vmRecords(repo, VM)) console.log(`  ${r.id}  ${r.quiesced ? 'quiesced' : 'crash-consistent'}  ${Object.entries(r.disks).map(([t, id]) => `${t}=${id}`).join(' ')}`);

    await guest.kill();
    guest = null;
    console.log(`\n$ vhdvault vm restore repo ${VM} restored`);
    const restored = await vmRestore(repo, VM, join(work, 'restored'));
    for (const [target, d] of Object.entries(restored.disks)) console.log(`  ${target}: ${d.path} (${d.format})`);
    console.log(`  definition: ${restored.definition}, and a script that boots the restored VM: ${join(restored.dir, `${VM}.sh`)}`);

    console.log(`\n$ vhdvault vm boot-check repo ${VM}`);
    const boot = await bootCheckVm(repo, VM, { timeoutS: 120 });
    console.log(boot.ok ? `  VM backup ${boot.id} boots: its guest agent answered ${(boot.ms / 1000).toFixed(1)} s after QEMU started (served from the repository, nothing restored)` : `  VM backup ${boot.id} did NOT boot: ${boot.problem}`);

    const check = await verify(repo);
    console.log(`\nverify: ${check.problems.length === 0 ? `ok, ${check.backups} backups` : `${check.problems.length} problems`}`);
    console.log(`total ${((performance.now() - started) / 1000).toFixed(1)} s${keep ? `; files kept in ${work}` : ''}`);
    const ok = full.quiesced && Object.values(delta.disks).every((d) => d.kind === 'delta') && boot.ok && check.problems.length === 0;
    if (!ok) process.exitCode = 1;
  } finally {
    await guest?.kill();
    await stopGuests();
    process.removeListener('SIGINT', interrupted);
    if (!keep) await rm(work, { recursive: true, force: true });
  }
}
