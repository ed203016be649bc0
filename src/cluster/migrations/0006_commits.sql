-- dicomgate cluster schema, version 6 (issue 15): a count of the writes each node's outbox
-- committed (publication rounds, open-association counts), raised in the transaction of each,
-- so that a node can tell when the database lost commits it saw (a failover to an
-- asynchronous standby, a restore from a backup): the count it reads is then lower than the
-- one its last write returned, and it writes again everything it holds (cluster::outbox).
ALTER TABLE dicomgate_nodes
    ADD COLUMN IF NOT EXISTS commits bigint NOT NULL DEFAULT 0;
-- The release's deletion of done batches no row names any more looks rows up by batch.
CREATE INDEX IF NOT EXISTS dicomgate_instances_batch
    ON dicomgate_instances (batch_id) WHERE batch_id IS NOT NULL;
