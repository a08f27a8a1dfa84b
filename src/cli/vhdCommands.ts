import { Command, Option } from 'commander';
import { extname } from 'node:path';
import type { OutputFormat } from '../vhd/convert.js';
import { UsageError } from '../util/errors.js';
import { checkFormatFits, implicitFormat, type OutputTarget, outputTarget } from '../vhd/outputTarget.js';
import { type Compression, COMPRESSIONS } from '../vhd/compression.js';
import { progressBar } from './progress.js';
import { parseSize } from './sizes.js';
import { JSON_FORMATS, printJson } from './json.js';

// Each command imports what it runs when it runs (see storeCommands.ts).

const FORMAT_BY_EXTENSION: Record<string, OutputFormat> = { '.vhd': 'vhd', '.raw': 'raw', '.img': 'raw', '.vhd-dir': 'dir' };

/** --format, else raw for a device or `-`, else the name's extension (as typed: a symlink's own name). */
export function outputFormatFor(target: OutputTarget, requested?: OutputFormat): OutputFormat {
  if (requested) return requested;
  const byTarget = implicitFormat(target);
  if (byTarget) return byTarget;
  const byExtension = FORMAT_BY_EXTENSION[extname(target.name).toLowerCase()];
  if (!byExtension) throw new UsageError(`cannot tell the output format from "${target.name}": use --format vhd|fixed|raw|dir`);
  return byExtension;
}

/** An object store holds no VHD file: only its backups are read (named as below). */
function refuseObjectStore(path: string): void {
  if (path.startsWith('s3://')) throw new UsageError(`${path}: names no backup; the vhd tools read a backup of an object store as s3://bucket/prefix/disks/<disk>/<id>`);
}

/** The backup `path` names, `<repo>/disks/<disk>/<id>` (or its .json or .digests), in any layout, in a folder or on s3://; else null. */
async function backupNamedBy(path: string) {
  const { namedBackup } = await import('../store/namedBackup.js');
  return namedBackup(path);
}

/** What `vhd check` prints of a sound disk. */
const checkedLine = (path: string, type: string, size: number, depth: number) => `${path}: ok (${type}, ${size} bytes${depth > 1 ? `, chain of ${depth} disks` : ''})`;

export function vhdCommand(): Command {
  const vhd = new Command('vhd').description('create, inspect, check and convert VHD files and directories');

  vhd
    .command('create')
    .description('create an empty dynamic VHD, or a differencing VHD over --parent (a name ending .vhd-dir makes a directory)')
    .argument('<out.vhd>', 'file (or .vhd-dir directory) to create')
    .option('--size <size>', 'virtual size (bytes or K/M/G/T); with --parent, optional and equal to the parent\'s', parseSize)
    .option('--block-size <size>', 'block size, a power of two (default 2M)', parseSize)
    .option('--parent <parent.vhd>', 'make a differencing disk over this VHD')
    .addOption(new Option('--compression <codec>', 'codec of a directory\'s files').choices([...COMPRESSIONS]))
    .action(async (out: string, opts: { size?: number; blockSize?: number; parent?: string; compression?: Compression }) => {
      const layout = extname(out).toLowerCase() === '.vhd-dir' ? 'dir' : 'file';
      if (opts.compression && layout !== 'dir') throw new UsageError('--compression applies only to a directory (a name ending .vhd-dir)');
      const storage = { layout, compression: opts.compression } as const;
      const { createDifferencingVhd, createDynamicVhd } = await import('../vhd/create.js');
      if (opts.parent) {
        await createDifferencingVhd(out, opts.parent, { size: opts.size, blockSize: opts.blockSize, ...storage });
      } else {
        if (opts.size === undefined) throw new UsageError('--size is required (or --parent)');
        await createDynamicVhd(out, { size: opts.size, blockSize: opts.blockSize, ...storage });
      }
    });

  vhd
    .command('info')
    .description('describe a VHD')
    .argument('<path>')
    .option('--json', 'print one JSON object')
    .action(async (path: string, opts: { json?: boolean }) => {
      const [named, { readingPath }, { readingBackup, describeBackup }, { describeVhd, formatDescription }] = await Promise.all([
        backupNamedBy(path),
        import('../store/insideRepository.js'),
        import('../store/namedBackup.js'),
        import('../vhd/describe.js'),
      ]);
      if (!named) refuseObjectStore(path);
      const description = named ? await readingBackup(named, (repo, meta) => describeBackup(path, repo, meta)) : await readingPath(path, () => describeVhd(path));
      if (opts.json) printJson(JSON_FORMATS.vhdInfo, description);
      else console.log(formatDescription(description));
    });

  vhd
    .command('check')
    .description('validate a VHD and its parents; exit 1 with the first problem')
    .argument('<path>')
    .action(async (path: string) => {
      const named = await backupNamedBy(path);
      if (named) {
        // A backup is checked as a restore reads it: every block against its digests.
        const { readingBackup, checkBackup } = await import('../store/namedBackup.js');
        const { type, size, depth } = await readingBackup(named, checkBackup);
        return void console.log(checkedLine(path, type, size, depth));
      }
      // A backup's data inside a repository is read as a reader of its disk, never beside a merge.
      refuseObjectStore(path);
      const [{ readingPath }, { VhdChain }, { VhdDirectory }] = await Promise.all([import('../store/insideRepository.js'), import('../vhd/VhdChain.js'), import('../vhd/VhdDirectory.js')]);
      await readingPath(path, async () => {
        const chain = await VhdChain.open(path);
        try {
          // Directories are validated block by block only when asked: here.
          for (const member of chain.members) if (member instanceof VhdDirectory) await member.verifyBlocks();
          console.log(checkedLine(path, chain.top.footer.diskType, chain.size, chain.members.length));
        } finally {
          await chain.close();
        }
      });
    });

  vhd
    .command('convert')
    .description('convert a VHD (read through its chain) or raw image to a full disk')
    .argument('<input>', 'VHD file or directory, Xen Orchestra *.alias.vhd, raw image, or a backup (<repo>/disks/<disk>/<id>, in a folder or on s3://)')
    .argument('<output>', 'file (replaced atomically), block or character device (raw, in place), or - for standard output')
    .addOption(new Option('--format <format>', 'output format (default: raw for a device or -, else from the extension)').choices(['vhd', 'fixed', 'raw', 'dir']))
    .addOption(new Option('--from <format>', 'treat the input as this format').choices(['raw']))
    .addOption(new Option('--compression <codec>', 'codec of a directory output\'s files').choices([...COMPRESSIONS]))
    .action(async (input: string, output: string, opts: { format?: OutputFormat; from?: 'raw'; compression?: Compression }) => {
      const target = await outputTarget(output);
      const format = outputFormatFor(target, opts.format);
      if (opts.compression && format !== 'dir') throw new UsageError('--compression applies only to directory output (--format dir)');
      checkFormatFits(target, format);
      const bar = progressBar('convert', false);
      const onProgress = (d: number, t: number, b: number) => bar.update(d, t, b);
      // A backup (of any layout) is read as restore reads it, digests checked.
      const backup = await backupNamedBy(input);
      try {
        if (backup) {
          if (opts.compression) throw new UsageError('--compression applies to converting a VHD; a backup is exported uncompressed');
          const [{ Repository }, { checkDiskName }, { restore }] = await Promise.all([import('../store/repository.js'), import('../store/names.js'), import('../store/restore.js')]);
          const repo = await Repository.open(backup.root);
          await restore(repo, checkDiskName(backup.disk), output, { backup: backup.id, format: format === 'fixed' || format === 'dir' || format === 'vhd' ? format : 'raw', onProgress });
          return;
        }
        refuseObjectStore(input);
        const [{ readingPath }, { convert }] = await Promise.all([import('../store/insideRepository.js'), import('../vhd/convert.js')]);
        await readingPath(input, () => convert(input, target, { format, fromRaw: opts.from === 'raw', compression: opts.compression, onProgress }));
      } finally {
        bar.stop();
      }
    });

  return vhd;
}
