-- dicomgate cluster schema, version 1 (issue 15, part 1): the nodes and their leases, the
-- patient partitions with their owners and fencing tokens, the published instance records,
-- and the batches claimed from them. Applied by cluster::migrate in one transaction.

CREATE TABLE dicomgate_settings (
    name  text PRIMARY KEY,
    value text NOT NULL
);

-- One row per node that ever joined. A node is live while lease_until (database time) is in
-- the future; it renews it every lease/3.
CREATE TABLE dicomgate_nodes (
    node_id     text PRIMARY KEY,
    lease_until timestamptz NOT NULL,
    joined_at   timestamptz NOT NULL DEFAULT now()
);

-- One row per partition (0 .. partitions-1). fencing grows at every change of owner, so a
-- claim made with an older token is refused.
CREATE TABLE dicomgate_partitions (
    partition integer PRIMARY KEY,
    owner     text,
    fencing   bigint NOT NULL DEFAULT 0,
    since     timestamptz
);

-- Instance records as the node that acknowledged them published them (idempotent by node and
-- SOP Instance UID: a re-send replaces). batch_id is set by the claim that took the record.
CREATE TABLE dicomgate_instances (
    node_id          text NOT NULL,
    sop_instance_uid text NOT NULL,
    partition        integer NOT NULL,
    grouping_key     bytea NOT NULL,
    study_uid        text,
    series_uid       text,
    location         text NOT NULL,
    bytes            bigint NOT NULL,
    inputs           bigint NOT NULL,
    received_ms      bigint NOT NULL,
    batch_id         text,
    PRIMARY KEY (node_id, sop_instance_uid)
);
CREATE INDEX dicomgate_instances_pending
    ON dicomgate_instances (partition, grouping_key) WHERE batch_id IS NULL;

-- Batches claimed, with the owner and token that claimed (or adopted) them and their stage.
CREATE TABLE dicomgate_batches (
    batch_id     text PRIMARY KEY,
    partition    integer NOT NULL,
    grouping_key bytea NOT NULL,
    owner        text NOT NULL,
    fencing      bigint NOT NULL,
    stage        text NOT NULL,
    claimed_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dicomgate_batches_partition ON dicomgate_batches (partition) WHERE stage <> 'done';
