-- dicomgate cluster schema, version 5 (issue 15 item 3): open associations per node and
-- grouping key, so that the "last association closed" trigger works across nodes.
--
-- A row says that `open` associations which sent node `node_id` an instance of the patient
-- `grouping_key` are still open there. The node writes it when that number changes (a row is
-- deleted when it falls to 0) and deletes all its rows when its process starts. A partition's
-- owner reads the rows of its partitions whose node is live: a patient is open while any live
-- node has a row for it, so the rows of a node whose lease ran out count as closed.
CREATE TABLE IF NOT EXISTS dicomgate_associations (
    node_id      text NOT NULL,
    grouping_key bytea NOT NULL,
    partition    integer NOT NULL,
    open         integer NOT NULL CHECK (open > 0),
    PRIMARY KEY (node_id, grouping_key)
);
CREATE INDEX IF NOT EXISTS dicomgate_associations_partition
    ON dicomgate_associations (partition);
