/** Reports work done so far: units done (blocks, or bytes where blocks are not the unit), their total, bytes moved. */
export type OnProgress = (done: number, total: number, bytes: number) => void;
