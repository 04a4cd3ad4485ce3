-- tokentally-patched-topic-delete
-- Replaces tansu-storage 0.6.0's src/sql/topic_delete_by.sql, which deletes every topic
-- of the cluster ($1) as soon as a topic named $2 exists in it (it filters topics by
-- cluster only). This deletes the one topic named $2 of cluster $1.
delete from topic
where topic.id in (
    select t.id
    from cluster c
    join topic t on t.cluster = c.id
    where c.name = $1
    and t.name = $2
);
