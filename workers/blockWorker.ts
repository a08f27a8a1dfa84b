// Piscina entry points: digest, compress and write one block (logic in src/store/blockTask.ts).
import { move, transferableSymbol, valueSymbol } from 'piscina';
import { type BlockResult, type BlockTask, processBlock, type WriteTask, writePreparedBlock } from '../src/store/blockTask.js';

// Piscina loads a worker with require() first, and Node 20.19+ can require() an ES module,
// but that path sometimes aborts the whole process (a failed assertion in
// CreateRequiredModuleFacade, seen in CI). A top-level await makes require() refuse this
// module at once (ERR_REQUIRE_ASYNC_MODULE), so Piscina imports it, as before Node 20.19.
await Promise.resolve();

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
