-- Decision counters for `/metrics` (issue 17), kept by the audit appends in the same
-- transaction as the decision they count, so every coordinator on the database reports the
-- same totals. `labels` is the series' label text (`verdict="valid"`), '' for none.
CREATE TABLE metric_counters (
    name TEXT NOT NULL,
    labels TEXT NOT NULL,
    value BIGINT NOT NULL,
    PRIMARY KEY (name, labels)
);
