-- The final pairs of every shard, the table the export reads.
select * from {{ source('pipeline', 'fineinstructions') }}
