-- 0002: work signals, the polled stand-in for LISTEN/NOTIFY (see notify.py).
--
-- Append-only: each write that makes a run claimable adds a row; listeners poll the
-- newest seq and trim old rows. No column but the sequence: a signal means only
-- "committed work may be waiting in this store".

CREATE TABLE IF NOT EXISTS `{p}work_signals` (
    seq BIGINT NOT NULL AUTO_INCREMENT,
    PRIMARY KEY (seq)
) ENGINE = InnoDB;
