/**
 * Bytes that requests in progress may hold: READ replies being read from the
 * export or waiting to be sent, WRITE payloads until the export took them.
 * A connection's budget draws on the server's too, so one client is held to
 * its share and all of them together to the server's. A request is admitted
 * once its bytes fit both; one larger than a budget is admitted when nothing
 * else holds that budget, so the largest request the limits allow is still
 * served, alone.
 */
export class ByteBudget {
  private held = 0;
  /** Woken on every release here; a child's waiters sit in its parent's set too. */
  private readonly waiters = new Set<() => void>();

  constructor(
    readonly limit: number,
    private readonly parent: ByteBudget | null = null,
  ) {}

  /** A budget of `limit` bytes that also draws on this one (a connection's on the server's). */
  child(limit: number): ByteBudget {
    return new ByteBudget(limit, this);
  }

  /** Bytes held now. */
  get used(): number {
    return this.held;
  }

  /**
   * Hold `bytes` once they fit; resolves to the function that gives them back
   * (later calls do nothing), or to null when `abort` fires first.
   */
  async take(bytes: number, abort: AbortSignal): Promise<(() => void) | null> {
    while (!this.fits(bytes) && !abort.aborted) await this.released(abort);
    if (abort.aborted) return null;
    this.add(bytes);
    let given = false;
    return () => {
      if (given) return;
      given = true;
      this.add(-bytes);
      this.wake();
    };
  }

  private fits(bytes: number): boolean {
    return (this.held === 0 || this.held + bytes <= this.limit) && (this.parent?.fits(bytes) ?? true);
  }

  private add(bytes: number): void {
    this.held += bytes;
    this.parent?.add(bytes);
  }

  private wake(): void {
    for (const waiter of [...this.waiters]) waiter();
    this.parent?.wake();
  }

  /** Resolves at the next release here or in a parent, or when `abort` fires. */
  private released(abort: AbortSignal): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        for (let b: ByteBudget | null = this; b; b = b.parent) b.waiters.delete(done);
        abort.removeEventListener('abort', done);
        resolve();
      };
      for (let b: ByteBudget | null = this; b; b = b.parent) b.waiters.add(done);
      abort.addEventListener('abort', done, { once: true });
    });
  }
}
