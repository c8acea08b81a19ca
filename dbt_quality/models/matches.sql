-- The chosen matches of every shard.
select * from {{ source('pipeline', 'matches') }}
