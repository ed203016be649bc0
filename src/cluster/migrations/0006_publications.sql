-- dicomgate cluster schema, version 6 (issue 15): a count of the publication rounds each node
-- committed, raised in the statement that publishes the round, so that a node can tell when
-- the database lost commits it saw (a failover to an asynchronous standby, a restore from a
-- backup): the count it reads is then lower than the one its last round returned, and it
-- publishes again everything it holds (cluster::outbox).
ALTER TABLE dicomgate_nodes
    ADD COLUMN IF NOT EXISTS publications bigint NOT NULL DEFAULT 0;
