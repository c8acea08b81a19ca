-- The instantiations of every shard.
select * from {{ source('pipeline', 'instantiations') }}
