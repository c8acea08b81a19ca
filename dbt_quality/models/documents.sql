-- The documents of every shard.
select * from {{ source('pipeline', 'documents') }}
