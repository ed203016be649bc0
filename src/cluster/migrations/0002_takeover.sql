-- dicomgate cluster schema, version 2 (issue 15, part 2's takeover): who is publishing a dead
-- node's records from its folder, until when, and for which of its deaths that was done.
--
-- A node is to be taken over once its lease ran out more than a lease ago (its partitions
-- have moved by then) and taken_over differs from its lease_until: taken_over is the
-- lease_until the last finished takeover (or the node's own clean leave, when it had nothing
-- left to publish) saw, so a node that came back and died again is taken over again.
-- takeover_by / takeover_until are the taker's lease on that work: another node may take it
-- over once takeover_until has passed (the taker died mid-way).
ALTER TABLE dicomgate_nodes
    ADD COLUMN takeover_by    text,
    ADD COLUMN takeover_until timestamptz,
    ADD COLUMN taken_over     timestamptz;
