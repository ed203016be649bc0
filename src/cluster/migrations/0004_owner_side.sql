-- dicomgate cluster schema, version 4 (issue 15 part 3, the owner side): what the rules read
-- about an instance, so that a partition's owner decides on records other nodes published,
-- and a publication number, so that the owner loads what is new since it last looked.
--
-- seq is taken from dicomgate_instances_seq at every insert and at every update that makes a
-- row pending again (a re-send); the owner reads pending rows of its partitions by seq, and
-- reads them all again now and then (a transaction that took a smaller seq may commit after
-- one that took a larger).
CREATE SEQUENCE IF NOT EXISTS dicomgate_instances_seq;
ALTER TABLE dicomgate_instances
    ADD COLUMN IF NOT EXISTS study_date            text,
    ADD COLUMN IF NOT EXISTS instance_number       integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS images_in_acquisition integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS number_of_slices      integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS seq bigint NOT NULL DEFAULT nextval('dicomgate_instances_seq');
CREATE INDEX IF NOT EXISTS dicomgate_instances_feed
    ON dicomgate_instances (partition, seq) WHERE batch_id IS NULL;
-- A node releases its copies of the instances of finished batches: found by its id.
CREATE INDEX IF NOT EXISTS dicomgate_instances_claimed
    ON dicomgate_instances (node_id, batch_id) WHERE batch_id IS NOT NULL;
