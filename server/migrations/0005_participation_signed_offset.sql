-- The signed sum of timed notes' offsets from the beat (microseconds, negative: early), so a
-- chart can say whether a child tends to rush or drag, not only how far off they are. Rows
-- written before this column existed hold 0.
ALTER TABLE participation ADD COLUMN offset_sum_micros BIGINT NOT NULL DEFAULT 0;
