-- The template bank: every template the pairs may point at.
select * from {{ source('pipeline', 'template_bank') }}
