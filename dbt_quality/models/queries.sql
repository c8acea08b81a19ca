-- The real user queries of every source.
select * from {{ source('pipeline', 'user_queries') }}
