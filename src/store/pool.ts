import { availableParallelism } from 'node:os';
import { dirname, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { Piscina } from 'piscina';
import type { BlockResult, BlockTask, WriteTask } from './blockTask.js';

/** The compiled worker: beside us in dist/, or in dist/ when running from sources (tests). */
function workerFile(): string {
  const here = fileURLToPath(import.meta.url);
  const root = here.endsWith('.ts') ? resolve(dirname(here), '../../dist') : resolve(dirname(here), '../..');
  return pathToFileURL(resolve(root, 'workers/blockWorkerEntry.cjs')).href;
}

export const defaultConcurrency = (): number => availableParallelism();

export class BlockPool {
  private constructor(
    readonly threads: number,
    private readonly pool: Piscina,
  ) {}

  /** Piscina is loaded here, not at start-up: only backups need it, and every CLI run would pay for it. */
  static async create(threads: number): Promise<BlockPool> {
    const { Piscina } = await import('piscina');
    return new BlockPool(threads, new Piscina({ filename: workerFile(), minThreads: threads, maxThreads: threads }));
  }

  run(task: BlockTask): Promise<BlockResult> {
    return this.pool.run(task, { transferList: [task.data] });
  }

  /** Write a block prepared with `deferWrite`; resolves to the milliseconds the write took. */
  write(task: WriteTask): Promise<number> {
    return this.pool.run(task, { name: 'writeBlock' });
  }

  async close(): Promise<void> {
    await this.pool.destroy();
  }
}
