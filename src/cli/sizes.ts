import { InvalidArgumentError } from 'commander';
import * as sizes from '../util/sizes.js';

/** Commander reports an option's bad value only when its parser throws InvalidArgumentError. */
const asOption =
  (parse: (text: string) => number) =>
  (text: string): number => {
    try {
      return parse(text);
    } catch (err) {
      throw new InvalidArgumentError((err as Error).message);
    }
  };

/** Option parsers for sizes ("2M") and rates ("20M/s"); the syntax is util/sizes.ts'. */
export const parseSize = asOption(sizes.parseSize);
export const parseRate = asOption(sizes.parseRate);
