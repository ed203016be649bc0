-- dicomgate cluster schema, version 3 (issue 15 item 5): what each node reported at its last
-- lease renewal, for every node's status page: records published, records waiting for
-- publication, and the age of the oldest of them (ms).
ALTER TABLE dicomgate_nodes
    ADD COLUMN IF NOT EXISTS published   bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS unpublished bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS lag_ms      bigint NOT NULL DEFAULT 0;
