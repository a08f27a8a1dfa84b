// The block worker's entry points, which Piscina reaches through blockWorkerEntry.cts:
// digest, compress and write one block (logic in src/store/blockTask.ts).
import { move, transferableSymbol, valueSymbol } from 'piscina';
import { type BlockResult, type BlockTask, processBlock, type WriteTask, writePreparedBlock } from '../src/store/blockTask.js';

export default async function blockWorker(task: BlockTask): Promise<unknown> {
  const result: BlockResult = await processBlock(task);
  // Transfer the block's buffer back instead of copying it, so the main thread can recycle it.
  return move({
    get [transferableSymbol]() {
      return [result.data.buffer];
    },
    get [valueSymbol]() {
      return result;
    },
  });
}

/** Second step of a rate-limited block: write what blockWorker prepared. */
export function writeBlock(task: WriteTask): Promise<number> {
  return writePreparedBlock(task);
}
