/**
 * Blocks read ahead of the consumer when streaming a disk. Measured on 2 MiB
 * blocks with a cold page cache: 16 keeps the disk busy where 4 left it idle
 * (bench/synthesize.bench.ts), at a cost of at most 16 blocks of memory.
 */
export const BLOCK_READ_AHEAD = 16;

/**
 * Yield `produce(i)` for each i of `indices`, in order, with up to `readAhead`
 * of them in flight: memory is bounded by `readAhead` produced values. When
 * the iteration ends early, the items still in flight are waited for first.
 */
export async function* orderedReadAhead<T>(
  indices: Iterable<number>,
  readAhead: number,
  produce: (index: number) => Promise<T>,
): AsyncGenerator<[number, T]> {
  const iterator = indices[Symbol.iterator]();
  const inFlight: Array<[number, Promise<T>]> = [];
  const launch = (): boolean => {
    const next = iterator.next();
    if (next.done) return false;
    const p = produce(next.value);
    p.catch(() => undefined); // surfaced when awaited in order
    inFlight.push([next.value, p]);
    return true;
  };
  while (inFlight.length < readAhead && launch());
  try {
    while (inFlight.length > 0) {
      const [index, p] = inFlight.shift()!;
      const value = await p;
      launch();
      yield [index, value];
    }
  } finally {
    // Cut short (an item failed, or the consumer stopped): nothing launched here runs on once we are done.
    await Promise.allSettled(inFlight.map(([, p]) => p));
  }
}

/** Consume `produce(i)` for i in [0, count) strictly in order, reading ahead `readAhead` items. */
export async function forEachOrdered<T>(
  count: number,
  readAhead: number,
  produce: (index: number) => Promise<T>,
  consume: (index: number, value: T) => Promise<void>,
): Promise<void> {
  for await (const [index, value] of orderedReadAhead(range(count), readAhead, produce)) await consume(index, value);
}

export function* range(count: number): Generator<number> {
  for (let i = 0; i < count; i++) yield i;
}
