-- The judgements of every shard.
select * from {{ source('pipeline', 'judgements') }}
